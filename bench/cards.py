"""Renders each report's headline table into the Markdown that quotes it: every block between
`<!-- report: PATH -->` and `<!-- /report -->` in README.md, docs/ and the model cards becomes
`pipeline.evaluation.markdown.summary_table` of the report.json at PATH (relative to the repository).

    .venv/bin/python bench/cards.py            # rewrites the blocks; tests/test_yardstick.py fails when one drifts
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.evaluation.markdown import summary_table  # noqa: E402

BLOCK = re.compile(r"(<!-- report: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /report -->)", re.S)


def quoting_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "models").rglob("README.md"))]


def rendered(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + summary_table(json.loads((REPO / m.group("path")).read_text())) + "\n"
                     + m.group(4), text)


def main() -> None:
    for path in quoting_files():
        text = path.read_text()
        if BLOCK.search(text) and rendered(text) != text:
            path.write_text(rendered(text))
            print(f"updated {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
