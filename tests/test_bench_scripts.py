"""The benchmark scripts that must not rot while no one runs them: bench/gpu_check.py (a GPU is lent only now and
then, so it runs here on the CPU in its dry mode) and bench/emoji_data.py (the real image set's builder, on a small
package made here in the npm tarball's layout)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO


@pytest.mark.integration
def test_the_gpu_check_runs_every_section_in_its_dry_mode(tmp_path):
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--output", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert text.splitlines()[2] == "**Dry run on a CPU: no figure here is a GPU's.**"
    sections = json.loads(out.with_suffix(".json").read_text())["sections"]
    assert list(sections) == ["environment", "precision", "repeat", "memory", "out of memory", "shares", "tests",
                              "rates"]
    assert not [name for name, s in sections.items() if "error" in s["result"]]
    assert sections["environment"]["result"]["tf32_under_float32"] == {"matmul": False, "cudnn": False}
    rows = sections["precision"]["result"]["rows"]
    assert rows["float32"]["latent_max_abs_diff"] == 0.0 and rows["bfloat16"]["latent_rms_diff"] > 0
    assert sections["repeat"]["result"] == {"chains": 4, "same_process_identical": True,
                                            "fresh_process_identical": True}
    assert sections["out of memory"]["result"]["each_once"] and sections["out of memory"]["result"]["shrinks"]
    memory = sections["memory"]["result"]
    assert memory["sampler"]["batch_size"] >= 1 and memory["decoder"]["batch_size"] >= 1


def _png(rgba) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 4), rgba, dtype=np.uint8), "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_emoji_builder_writes_one_folder_per_category_and_reads_nothing_else(tmp_path):
    """A stand-in for emoji-datasource-google: two emoji (one with a skin-tone variant), an image emoji.json does not
    list, a member escaping the package, and a link: only the listed images are written, by category."""
    emoji = [{"image": "1f600.png", "category": "Smileys & Emotion", "has_img_google": True},
             {"image": "1f44b.png", "category": "People & Body", "has_img_google": True,
              "skin_variations": {"1F3FB": {"image": "1f44b-1f3fb.png", "has_img_google": True}}},
             {"image": "1f9ff.png", "category": "Objects", "has_img_google": False}]
    package = tmp_path / "emoji.tgz"
    with tarfile.open(package, "w:gz") as tar:
        def add(name: str, data: bytes, kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("package/emoji.json", json.dumps(emoji).encode())
        for name in ("1f600.png", "1f44b.png", "1f44b-1f3fb.png", "1f9ff.png", "ffff.png"):
            add(f"package/img/google/64/{name}", _png((200, 30, 30, 255)))
        add("package/img/google/64/../../../../evil.png", _png((0, 0, 0, 255)))
        link = tarfile.TarInfo("package/img/google/64/1f601.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    out = tmp_path / "images"
    done = subprocess.run([sys.executable, "bench/emoji_data.py", "--package", str(package), "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # a variant is named after its design, so precompute's name rule groups them (io/twins.py)
    assert written == ["people-body/1f44b.png", "people-body/1f44b~1f44b-1f3fb.png", "smileys-emotion/1f600.png"]
    assert Image.open(out / "smileys-emotion/1f600.png").size == (64, 64)
    assert not (tmp_path / "evil.png").exists() and not list(tmp_path.glob("images.partial*"))
    again = subprocess.run([sys.executable, "bench/emoji_data.py", "--package", str(package), "--output", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to do" in again.stdout
