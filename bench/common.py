"""Shared by the benchmarks: where results go and how they are written."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_result(path: str | Path, result: dict) -> None:
    """Prints the result and writes it as JSON (the folder is created as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)
