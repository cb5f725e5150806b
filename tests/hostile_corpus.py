"""A generator of hostile inputs, one case a function: each writes its files into an empty folder (and, where the
case needs one, a folder outside it) and returns the reject reasons precompute must record, one per bad item.

Used by tests/test_hostile_inputs.py (every case through plan, read and decode, in seconds: `make test`) and by
bench/hostile.py (every case through the real precompute job, with its wall time and peak memory: `make hostile`).
`scale` grows the cases that cost time or memory (the bench runs them larger); `SETTINGS` are the precompute limits
both run them under.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SETTINGS = {"max_file_bytes": 1_000_000, "max_decode_bytes": 40 * 2 ** 20, "max_decode_seconds": 2.0}

# Peak memory of decoding one file, in a fresh process: `python -c DECODE_MEMORY_PROBE BIG SMALL FORMATS` prints the
# peak bytes above the process's resident set before decoding, then the image's width and height. The peak is VmHWM
# after resetting it (clear_refs 5): ru_maxrss would carry a large parent's peak across exec and read 0.
DECODE_MEMORY_PROBE = """
import sys
from pipeline.io.images import decode_image
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
formats = tuple(sys.argv[3].split(","))
decode_image(open(sys.argv[2], "rb").read(), 16, 10**8, 8, formats=formats)  # plugins loaded, allocator warm
data = open(sys.argv[1], "rb").read()
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
pixels, size = decode_image(data, 256, 10**8, 64, formats=formats, max_decode_bytes=1 << 40)
print(status("VmHWM:") - base, *size)
"""


def good_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def scan_bomb(scans: int, side: int = 64) -> bytes:
    """A progressive JPEG whose last scan repeats: small, valid to a decoder, each scan a pass over the image."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rfind(b"\xff\xda")
    return data[:-2] + data[last:-2] * scans + data[-2:]


def lying_parquet(rows_claimed: int) -> bytes:
    """A one-row parquet file whose footer (and row group) claims `rows_claimed` rows: the Thrift-encoded num_rows
    fields (field header 0x16, then a zigzag varint) rewritten, the footer length fixed."""
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": [good_png(5)]}), buffer)
    data = buffer.getvalue()
    length = int.from_bytes(data[-8:-4], "little")
    footer, value, varint = data[-8 - length:-8], rows_claimed * 2, b""
    while True:
        varint += bytes([(value & 0x7F) | (0x80 if value >> 7 else 0)])
        value >>= 7
        if not value:
            break
    lie = footer.replace(b"\x16\x02", b"\x16" + varint)
    return data[:-8 - length] + lie + len(lie).to_bytes(4, "little") + b"PAR1"


def expanding_exif(data_bytes: int, tags: int = 40, orientation: int = 6) -> bytes:
    """An EXIF block (little-endian TIFF) whose first IFD has `tags` LONG arrays that all point at the same
    `data_bytes` of distinct values, and an orientation tag: small on disk, `tags` x data_bytes / 4 Python ints to a
    reader that expands every tag (Pillow's getexif, and exif_transpose re-serialising it)."""
    import struct

    entries = [(0x0112, 3, 1, orientation)]
    data_at = 8 + 2 + 12 * (tags + 1) + 4
    entries += [(0xF000 + i, 4, data_bytes // 4, data_at) for i in range(tags)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in sorted(entries)) + bytes(4)
    values = np.arange(1000, 1000 + data_bytes // 4, dtype="<u4").tobytes()
    return b"II*\x00" + struct.pack("<I", 8) + ifd + values


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------------------- the cases

def jpeg_scans(root: Path, outside: Path, scale: int = 1) -> Counter:
    (root / "scans.jpg").write_bytes(scan_bomb(500 * scale, 64 * scale))
    return Counter(too_many_scans=1)


def jpeg_slow_scans(root: Path, outside: Path, scale: int = 1) -> Counter:
    """Scans under the cap over enough pixels that decoding would outlast the time limit (predicted from its header)."""
    (root / "slow.jpg").write_bytes(scan_bomb(80, 2400))  # 90 scans x 5.8 megapixels: about 2.6 s > 2
    return Counter(too_slow_to_decode=1)


def webp_pixels(root: Path, outside: Path, scale: int = 1) -> Counter:
    """A small WebP of many pixels (Pillow decodes it at about 16 bytes a pixel)."""
    side = 2000 * scale
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (30, 60, 90)).save(buffer, "WEBP", quality=10)
    (root / "wide.webp").write_bytes(buffer.getvalue())
    return Counter(too_large_to_decode=1)


def any_file_name(root: Path, outside: Path, scale: int = 1) -> Counter:
    folder = Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9s"))
    folder.mkdir()
    (folder / "\udcff\udcfe.png").write_bytes(good_png(1))
    (root / "new\nline\x1b[31m.png").write_bytes(good_png(2))
    return Counter()


def deep_folder(root: Path, outside: Path, scale: int = 1) -> Counter:
    deep = root
    for _ in range(70 * scale):
        deep = deep / "d"
        deep.mkdir()
    (deep / "far.png").write_bytes(good_png(3))
    return Counter(too_deep=1)


def linked_containers(root: Path, outside: Path, scale: int = 1) -> Counter:
    write_tar(outside / "elsewhere.tar", {"secret.png": good_png(4)})
    write_tar(root / "00000.tar", {"a.png": good_png(5)})
    (root / "00001.tar").symlink_to(outside / "elsewhere.tar")
    os.mkfifo(root / "00002.tar")
    return Counter(outside_input=1, not_a_regular_file=1)


def long_member_name(root: Path, outside: Path, scale: int = 1) -> Counter:
    write_tar(root / "00000.tar", {"k" * (100_000 * scale) + ".png": good_png(6), "fine.png": good_png(7)})
    return Counter()


def parquet_footer(root: Path, outside: Path, scale: int = 1) -> Counter:
    (root / "a.parquet").write_bytes(lying_parquet(2 ** 62))
    (root / "b.parquet").write_bytes(lying_parquet(100_000))
    pq.write_table(pa.table({"image": [good_png(8)]}), root / "c.parquet")
    return Counter(implausible_row_count=2)


def parquet_cells(root: Path, outside: Path, scale: int = 1) -> Counter:
    """Compressed cells that decode to more than max_file_bytes (bench: 4 x 250 MB from a few hundred KB), refused
    from the footer before a cell is read: one row a group (a.parquet) loses only those rows; a group of three that
    holds one (b.parquet) loses its three."""
    big = bytes(min(3_000_000 * scale ** 2, 250_000_000))
    pq.write_table(pa.table({"image": [big, good_png(9), big, big, big][:2 + min(scale, 3)]}), root / "a.parquet",
                   compression="zstd", row_group_size=1)
    pq.write_table(pa.table({"image": [good_png(10), big, good_png(11)]}), root / "b.parquet", compression="zstd")
    return Counter(file_too_large=1 + min(scale, 3), row_group_too_large=3)


def parquet_label(root: Path, outside: Path, scale: int = 1) -> Counter:
    """A label cell of 20 MB (bench: 500 MiB) of one letter, a few KB on disk: its row group's rows are refused from
    the footer, never converted to Python (2.3 GB in the driver when it was)."""
    huge = "x" * (20_000_000 if scale == 1 else 500 * 2 ** 20)
    pq.write_table(pa.table({"image": [good_png(12), good_png(13)], "label": [huge, "ok"]}), root / "a.parquet",
                   compression="zstd")
    pq.write_table(pa.table({"image": [good_png(14)], "label": ["fine"]}), root / "b.parquet")
    return Counter(labels_too_large=2)


def parquet_wrong_struct(root: Path, outside: Path, scale: int = 1) -> Counter:
    """An image column of struct<bytes: list<int16>> (bench: 100 M zeros in a few hundred bytes): refused from the
    schema, no cell read (a worker reached 2.4 GB before wrong_type when cells were converted first)."""
    n = 1_000_000 * scale ** 2 * 25
    cells = pa.StructArray.from_arrays([pa.array([np.zeros(n, np.int16)], pa.list_(pa.int16()))], ["bytes"])
    pq.write_table(pa.table({"image": cells}), root / "a.parquet", compression="zstd")
    pq.write_table(pa.table({"image": [good_png(16)]}), root / "b.parquet")  # alone, the job would refuse in one line
    return Counter(missing_column=1)


def parquet_row_groups(root: Path, outside: Path, scale: int = 1) -> Counter:
    """2,000 one-row row groups (bench: 10,000): every row read, the footer parsed once per file per reader (each
    group re-parsed it before: 10,000 groups took 167 s against 29 s in one group)."""
    rows = 2_000 * (5 if scale > 1 else 1)
    cell = good_png(15)
    pq.write_table(pa.table({"image": [cell] * rows}), root / "a.parquet", row_group_size=1)
    return Counter()


def exif_expansion(root: Path, outside: Path, scale: int = 1) -> Counter:
    """A 64 x 64 PNG whose eXIf chunk (900 KB, under max_file_bytes at every scale) expands to 9 million values when
    read whole (a 48 MiB one took a worker to 1.9 GB and 22 s): decoded, its orientation applied, the rest never
    read."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, "PNG", exif=expanding_exif(900_000))
    (root / "exif.png").write_bytes(buffer.getvalue())
    return Counter()


CASES = {fn.__name__: fn for fn in (jpeg_scans, jpeg_slow_scans, webp_pixels, any_file_name, deep_folder,
                                    linked_containers, long_member_name, parquet_footer, parquet_cells,
                                    parquet_label, parquet_wrong_struct, parquet_row_groups, exif_expansion)}
