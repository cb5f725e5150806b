"""Hostile inputs, made in the test: every bad file is a recorded reject, never a failed shard or a file read from
outside the input; and a running job listens on loopback only."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.io.images import DEFAULT_FORMATS, Rejected, decode_image, sniff_format
from pipeline.io.latent_shards import iter_latents, shard_paths
from tests.conftest import REPO, encode_image, png_header_only, rgb_image
from tests.hostile_corpus import DECODE_MEMORY_PROBE, lying_parquet, scan_bomb
from tests.test_precompute import RES, precompute, tar_digests

POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(/etc/passwd) (r) file\nshowpage\n"
DDS = encode_image(rgb_image(40), "DDS")
TEXT = b"<html><body>404 not found</body></html>\n"


def good(seed: int, fmt: str = "PNG") -> bytes:
    return encode_image(rgb_image(seed, (24, 20)), fmt)


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding_and_a_normal_progressive_one_decodes():
    with pytest.raises(Rejected) as err:
        decode_image(scan_bomb(500), RES, 10_000_000, 8)
    assert err.value.reason == "too_many_scans"
    buffer = io.BytesIO()
    rgb_image(9, (64, 48)).save(buffer, format="JPEG", progressive=True)
    assert decode_image(buffer.getvalue(), RES, 10_000_000, 8)[0].shape == (RES, RES, 3)


def test_a_jpeg_too_slow_for_the_time_limit_is_refused_from_its_header_and_fits_a_longer_limit():
    # 90 scans pass the scan cap; over 2800 x 2800 pixels they predict seconds of decoding, which libjpeg would spend
    # after reading the last byte, where no clock check can reach
    bomb = scan_bomb(80, 2800)  # 10 scans of its own and 80 repeats
    with pytest.raises(Rejected) as err:
        decode_image(bomb, RES, 10 ** 8, 8, max_decode_seconds=1.0)
    assert err.value.reason == "too_slow_to_decode" and "2800x2800" in err.value.detail
    assert decode_image(bomb, RES, 10 ** 8, 8, max_decode_seconds=30.0)[0].shape == (RES, RES, 3)


def test_a_decode_past_its_time_limit_stops_inside_the_decode_not_after_it():
    # a PNG of noise is megabytes of compressed rows the decoder pulls block by block: the clock stops it part way
    noise = np.random.default_rng(3).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    data = encode_image(Image.fromarray(noise), "PNG")
    with pytest.raises(Rejected) as err:
        decode_image(data, RES, 10 ** 8, 8, max_decode_seconds=1e-9)
    assert err.value.reason == "decode_too_slow"
    read = int(err.value.detail.split(" bytes read")[0].split(", ")[-1].split(" of ")[0])
    assert read < len(data) // 2, err.value.detail
    assert decode_image(data, RES, 10 ** 8, 8)[0].shape == (RES, RES, 3)  # the default limit decodes it


# ----------------------------------------------------------------------------------------- decoding, no Ray

@pytest.mark.parametrize("data, reason", [
    (POSTSCRIPT, "format_not_allowed"),  # never handed to the EPS reader (Ghostscript)
    (DDS, "format_not_allowed"),         # a format Pillow opens but the allow-list leaves out
    (good(41, "TIFF"), "format_not_allowed"),
    (TEXT, "not_an_image"),
    (gzip.compress(good(42)), "not_an_image"),
    (good(43)[:40], "corrupt_image"),    # a PNG cut inside its first chunk
])
def test_formats_off_the_allow_list_never_reach_a_decoder(data, reason):
    with pytest.raises(Rejected) as err:
        decode_image(data, RES, 10_000_000, 8)
    assert err.value.reason == reason
    assert sniff_format(POSTSCRIPT) == "EPS" and sniff_format(DDS) == "DDS"  # told apart before any decoding


def test_widening_the_allow_list_decodes_the_added_format():
    pixels, size = decode_image(good(44, "TIFF"), RES, 10_000_000, 8, formats=(*DEFAULT_FORMATS, "TIFF"))
    assert pixels.shape == (RES, RES, 3) and size == (24, 20)


# Each decoder's peak memory on a 4000 x 4000 image, in a fresh process (tests/hostile_corpus.DECODE_MEMORY_PROBE).
# Before ebd decoded to 8 bits in integer steps, the 16-bit PNG cost about 430 MB (float64 copies).


@pytest.mark.parametrize("mode, bytes_per_pixel", [("I;16", 7), ("RGBA", 10), ("RGB", 6)])
def test_decoding_a_large_image_holds_a_few_bytes_per_pixel(tmp_path, mode, bytes_per_pixel):
    side = 4000
    ramp = (np.arange(side, dtype=np.uint32)[:, None] * 16 + np.arange(side, dtype=np.uint32)[None, :]) % 65536
    if mode == "I;16":
        img = Image.fromarray(ramp.astype(np.uint16))
    else:
        img = Image.fromarray(np.stack([(ramp >> 8).astype(np.uint8)] * len(mode), axis=-1), mode)
    img.save(tmp_path / "big.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    del img, ramp
    result = subprocess.run([sys.executable, "-c", DECODE_MEMORY_PROBE, str(tmp_path / "big.png"),
                             str(tmp_path / "small.png"), "PNG"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    peak, width, height = map(int, result.stdout.split())
    assert (width, height) == (side, side)
    assert side * side < peak < bytes_per_pixel * side * side  # measured (at least a byte a pixel), and bounded


def test_exif_is_read_as_its_orientation_tag_alone(tmp_path):
    """A PNG whose eXIf block holds 40 arrays of a million values each pointing at the same 4 MB: its orientation is
    applied (the stored 96 x 64 image is shown 64 x 96, its left half on top), the rest of the block is never
    expanded (Pillow's exif_transpose held about 50 bytes per byte of such a block)."""
    from tests.hostile_corpus import expanding_exif

    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:, :48] = 255
    Image.fromarray(stored).save(tmp_path / "exif.png", exif=expanding_exif(4_000_000))
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    result = subprocess.run([sys.executable, "-c", DECODE_MEMORY_PROBE, str(tmp_path / "exif.png"),
                             str(tmp_path / "small.png"), "PNG"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    peak, width, height = map(int, result.stdout.split())
    assert (width, height) == (64, 96)
    assert peak < 12 * 2**20  # the file's bytes and a few small images; expanded, it is hundreds of MB
    pixels, _ = decode_image((tmp_path / "exif.png").read_bytes(), 32, 10**8, 8)
    assert pixels[0].mean() > 250 and pixels[-1].mean() < 5  # rotated: white (the left half) on top


FUZZ_FORMATS = {"PNG": {}, "JPEG": {"quality": 90}, "WEBP": {}, "BMP": {}, "GIF": {}, "TIFF": {}, "PPM": {},
                "TGA": {"compression": "tga_rle"}, "ICO": {}, "JPEG2000": {}, "DDS": {}, "PCX": {}, "SGI": {},
                "QOI": {}}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One hostile variant of a valid file: header bytes flipped, a size field maxed, cut short, or bytes spliced."""
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:    # a few header bytes flipped
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(64, len(b)))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a 2- or 4-byte header field set to its maximum (sizes, counts, offsets)
        at, width = rng.randrange(max(1, min(48, len(b) - 4))), rng.choice((2, 4))
        b[at:at + width] = b"\xff" * width
    elif kind == 2:  # cut short anywhere
        del b[rng.randrange(1, len(b)):]
    elif kind == 3:  # bytes anywhere replaced with noise
        at = rng.randrange(len(b))
        b[at:at + 8] = rng.randbytes(8)
    else:            # a chunk duplicated or dropped
        at, n = rng.randrange(len(b)), rng.randint(1, 32)
        b[at:at] = b[at:at + n] if rng.random() < 0.5 else b""
        if rng.random() >= 0.5:
            del b[at:at + n]
    return bytes(b)


def test_mutated_files_of_fourteen_formats_either_decode_or_are_rejected():
    """3500 seeded mutations: each one decodes to an image or is a Rejected with a reason; no other exception
    escapes, whatever the decoder raises."""
    rng = random.Random(1234)
    outcomes: dict[str, Counter] = {}
    for fmt, options in FUZZ_FORMATS.items():
        base = encode_image(Image.new("RGB", (24, 20), (200, 40, 90)).convert("RGB"), fmt, **options)
        seen = outcomes.setdefault(fmt, Counter())
        for _ in range(250):
            data = mutate(base, rng)
            try:
                pixels, _ = decode_image(data, RES, 1_000_000, 8, formats=tuple(FUZZ_FORMATS))
            except Rejected as r:
                assert r.reason in {"not_an_image", "corrupt_image", "too_many_pixels", "too_small", "empty_file",
                                    "format_not_allowed", "too_large_to_decode"}, (fmt, r)
                seen[r.reason] += 1
            else:
                assert pixels.shape == (RES, RES, 3) and pixels.dtype == np.uint8
                seen["decoded"] += 1
    for fmt, seen in outcomes.items():  # the fuzz reached both sides of every decoder
        assert seen["decoded"] > 0 and sum(seen.values()) - seen["decoded"] > 0, (fmt, seen)


# ------------------------------------------------------------------- precompute over hostile inputs, on Ray

def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mtime = kind, link, len(data) if kind == tarfile.REGTYPE else 0, 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def hostile_tars(root: Path, outside: Path) -> tuple[int, Counter]:
    """Tars mixing good samples with every kind of bad member and container. Returns (good count, reasons)."""
    root.mkdir()
    deep = b"[" * 5000 + b"]" * 5000
    with tarfile.open(root / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "000001.jpg", good(1, "JPEG"))
        add_member(tar, "000001.cls", b"7")
        add_member(tar, "000002.png", good(2))
        add_member(tar, "000002.json", json.dumps({"label": "dog"}).encode())
        add_member(tar, "000003.webp", good(3, "WEBP"))
        add_member(tar, "000003.json", b'{"label": "x", "nested": ' + deep + b"}")          # bad_sidecar
        add_member(tar, "000004.png", good(4))
        add_member(tar, "000004.json", b'{"pad": "' + b"x" * 70_000 + b'"}')               # bad_sidecar
        add_member(tar, "000005.png", TEXT)                                                 # not_an_image
        add_member(tar, "000006.png", POSTSCRIPT)                                           # format_not_allowed
        add_member(tar, "000007.png", DDS)                                                  # format_not_allowed
        add_member(tar, "000008.png", png_header_only(100_000, 100_000))                    # too_many_pixels
        add_member(tar, "000009.jpg", b"")                                                  # empty_file
        add_member(tar, "000010.txt", b"a caption and no image")                            # no_image_member
        add_member(tar, "000001.jpg", good(11, "JPEG"))                                     # duplicate_member
        add_member(tar, f"{outside}/abs.png", good(12))                                     # unsafe_member_name
        add_member(tar, "../../escape.png", good(13))                                       # unsafe_member_name
        add_member(tar, "link.png", kind=tarfile.SYMTYPE, link="/etc/passwd")               # not_a_regular_file
        add_member(tar, "hard.png", kind=tarfile.LNKTYPE, link="000002.png")                # not_a_regular_file
        add_member(tar, "somedir", kind=tarfile.DIRTYPE)                                    # not_a_regular_file
        add_member(tar, "fifo.png", kind=tarfile.FIFOTYPE)                                  # not_a_regular_file
        add_member(tar, "noextension", b"x")                                                # not_a_sample
        add_member(tar, "000011.gif", good(14, "GIF"))
        add_member(tar, "caf\udce9-\udcff.png", good(15))                                   # any bytes: read
        add_member(tar, "000012.jpg", scan_bomb(500))                                          # too_many_scans
    (root / "00001.tar").write_bytes(gzip.compress((root / "00000.tar").read_bytes()))  # not_a_tar
    (root / "00002.tar").write_bytes(b"")                                                # not_a_tar
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for i in range(3):
            add_member(tar, f"cut{i}.png", good(20 + i))
    (root / "00003.tar").write_bytes(whole.getvalue()[:2 * 512 + len(good(20)) + 700])  # truncated_container
    with tarfile.open(outside / "elsewhere.tar", "w") as tar:
        add_member(tar, "secret.png", good(16))
    (root / "00004.tar").symlink_to(outside / "elsewhere.tar")                          # outside_input
    os.mkfifo(root / "00005.tar")                                                       # not_a_regular_file
    nested = root / "a"
    for _ in range(70):
        nested = nested / "a"
    nested.mkdir(parents=True)
    (nested / "deep.tar").write_bytes((root / "00000.tar").read_bytes())                # too_deep (its folder)
    reasons = Counter(bad_sidecar=2, not_an_image=1, format_not_allowed=2, too_many_pixels=1, empty_file=1,
                      no_image_member=1, duplicate_member=1, unsafe_member_name=2, not_a_regular_file=5,
                      not_a_sample=1, not_a_tar=2, truncated_container=2,  # cut1 read short + the container line
                      too_many_scans=1, outside_input=1, too_deep=1)
    return 5, reasons  # 000001, 000002, 000011, the non-UTF-8 name and cut0 (read before the cut)


def hostile_folder(root: Path, outside: Path) -> tuple[int, Counter]:
    """A folder tree mixing good images with links out of it, special files and mislabelled bytes."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "deeper").mkdir(parents=True)
    (root / "cats" / "a.png").write_bytes(good(1))
    (root / "cats" / "b.jpg").write_bytes(good(2, "JPEG"))
    (root / "dogs" / "c.webp").write_bytes(good(3, "WEBP"))
    (root / "dogs" / "deeper" / "d.bmp").write_bytes(good(4, "BMP"))
    (root / "dogs" / "inside.png").symlink_to(root / "cats" / "a.png")   # a link that stays inside: read
    (outside / "secret.png").write_bytes(good(5))
    (root / "cats" / "out.png").symlink_to(outside / "secret.png")      # outside_input
    (root / "cats" / "zero.png").symlink_to("/dev/zero")                # outside_input (never read)
    (root / "cats" / "etc").symlink_to("/etc")                          # outside_input (a folder link)
    (root / "cats" / "dangling.png").symlink_to(root / "nowhere.png")   # read_error
    os.mkfifo(root / "cats" / "fifo.png")                               # not_a_regular_file
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "dogs" / "sock.png"))                        # not_a_regular_file
    server.close()
    (root / "dogs" / "text.png").write_bytes(TEXT)                      # not_an_image
    (root / "dogs" / "ps.png").write_bytes(POSTSCRIPT)                  # format_not_allowed
    (root / "dogs" / "dds.png").write_bytes(DDS)                        # format_not_allowed
    (root / "dogs" / "empty.jpg").write_bytes(b"")                      # empty_file
    (root / "dogs" / "cut.jpg").write_bytes(good(6, "JPEG")[:200])      # corrupt_image
    (root / "dogs" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))  # too_many_pixels
    (root / "dogs" / "notes.txt").write_text("not an image")           # unsupported_extension
    (root / "dogs" / "scans.jpg").write_bytes(scan_bomb(500))              # too_many_scans
    (root / "dogs" / "slow.jpg").write_bytes(scan_bomb(80, 2000))          # too_slow_to_decode: 1.8 s predicted > 1
    os.mkdir(os.fsencode(root) + b"/caf\xe9s")                          # names are bytes, not always UTF-8
    (Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9s")) / "\udcff\udcfe.png").write_bytes(good(7))
    (root / "cats" / "new\nline\x1b[31m.png").write_bytes(good(8))      # a name that would forge log lines
    deep = root / "deep"
    for _ in range(70):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "far.png").write_bytes(good(9))                             # too_deep (its folder, one line)
    reasons = Counter(outside_input=3, read_error=1, not_a_regular_file=2, not_an_image=1, format_not_allowed=2,
                      empty_file=1, corrupt_image=1, too_many_pixels=1, unsupported_extension=1, too_many_scans=1,
                      too_deep=1, too_slow_to_decode=1)
    return 7, reasons


def hostile_parquet(root: Path, outside: Path) -> tuple[int, Counter]:
    """Parquet files with good rows, wrongly typed cells, duplicate keys, and a file that is not parquet."""
    root.mkdir()
    pq.write_table(pa.table({"key": ["../x", "../x", "/abs", "k4", "k5"],
                             "image": [good(1), good(2), None, TEXT, POSTSCRIPT],
                             "label": ["cat", "dog", "cat", None, "dog"]}), root / "part-0.parquet")
    ints = pa.array([{"bytes": 5, "path": "a.png"}, {"bytes": 7, "path": "b.png"}],
                    type=pa.struct([("bytes", pa.int64()), ("path", pa.string())]))
    pq.write_table(pa.table({"key": ["i1", "i2"], "image": ints}), root / "part-1.parquet")  # missing_column:
    # a column that is not image bytes is refused from the schema, one line for the file
    strings = pa.array([{"bytes": "not bytes", "path": "a.png"}],
                       type=pa.struct([("bytes", pa.string()), ("path", pa.string())]))
    pq.write_table(pa.table({"key": ["s1"], "image": strings}), root / "part-2.parquet")
    pq.write_table(pa.table({"key": ["g1"], "image": [good(3, "WEBP")]}), root / "part-3.parquet")
    (root / "part-4.parquet").write_bytes(b"PAR1 this is not really parquet")
    pq.write_table(pa.table({"key": ["o1"], "image": [good(4)]}), outside / "elsewhere.parquet")
    (root / "part-5.parquet").symlink_to(outside / "elsewhere.parquet")  # outside_input: never read
    (root / "part-6.parquet").write_bytes(lying_parquet(2 ** 62))        # implausible_row_count, one line
    (root / "part-7.parquet").write_bytes(lying_parquet(100_000))        # implausible_row_count, one line
    zeros = bytes(3_000_000)  # compresses to a few KB: only its decoded size shows what it costs
    pq.write_table(pa.table({"key": ["z1", "z2", "z3"], "image": [zeros, good(6), zeros],
                             "label": ["ok", "x" * 3_000_000, "ok"]}), root / "part-8.parquet",
                   compression="zstd", row_group_size=1)  # 2 x file_too_large from the footer; z2 kept, label cut
    reasons = Counter(missing_bytes=1, not_an_image=1, format_not_allowed=1, missing_column=2, not_parquet=1,
                      outside_input=1, implausible_row_count=2, file_too_large=2)
    return 4, reasons


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("build, options", [
    (hostile_tars, {}),
    (hostile_folder, {"max_decode_seconds": 1.0}),
    (hostile_parquet, {"key_column": "key", "image_column": "image", "max_file_bytes": 1_000_000}),
], ids=["webdataset", "folder", "parquet"])
def test_precompute_over_hostile_inputs_encodes_the_good_and_records_each_bad_item(
        ray_cluster, vae_only_dir, tmp_path, build, options):
    outside = tmp_path / "outside"
    outside.mkdir()
    n_good, reasons = build(tmp_path / "in", outside)
    before = tree(tmp_path)

    manifest = precompute(tmp_path / "in", vae_only_dir, tmp_path / "out", **options)
    assert manifest["totals"]["encoded"] == n_good
    assert manifest["rejects_by_reason"] == dict(reasons)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert Counter(r["reason"] for r in rejects) == reasons  # one line per bad item, each with a reason
    assert all(r["detail"] and r["source"] for r in rejects)
    assert all(r["source"].isprintable() and len(r["source"]) <= 300 and r["detail"].isprintable() for r in rejects)
    latents = list(iter_latents(shard_paths(tmp_path / "out")))
    assert len(latents) == n_good and all(np.isfinite(s["latent"]).all() for s in latents)
    # nothing was written anywhere but the output folder
    assert {k: v for k, v in tree(tmp_path).items() if k.split("/")[0] != "out"} == before

    # a re-run into a new folder is byte-identical, and a resume in place rewrites nothing
    again = precompute(tmp_path / "in", vae_only_dir, tmp_path / "out2", **options)
    assert tar_digests(tmp_path / "out2") == tar_digests(tmp_path / "out")
    assert (tmp_path / "out2" / "rejects.jsonl").read_bytes() == (tmp_path / "out" / "rejects.jsonl").read_bytes()
    assert again["totals"] == manifest["totals"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    precompute(tmp_path / "in", vae_only_dir, tmp_path / "out", **options)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.name in stamps
            and p.suffix == ".tar"} == {k: v for k, v in stamps.items() if k.endswith(".tar")}


# ------------------------------------------------------------------------------------- listening sockets

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `root` and its descendants."""
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            found |= {(name, c.laddr.ip, c.laddr.port) for c in proc.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.integration
def test_a_generation_job_on_its_own_local_ray_listens_on_loopback_only(tmp_path):
    """The job as a user runs it on a laptop: no --address, no RAY_ADDRESS, so it starts its own Ray instance.
    Every socket any of its processes listens on (GCS, raylet, workers, agents, ebd's metrics endpoint) is
    loopback."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path / "home")  # a user without a Ray token yet: Ray makes one, and the job says where
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.generate", "--config", "configs/generate.yaml", "--model", "models/demo/ebm",
         "--vae", "models/demo", "--num-images", "16", "--output", str(tmp_path / "out"), "--metrics-port", "0",
         "--set", "sampler_actors=1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[tuple[str, str, int]] = set()
    root = psutil.Process(job.pid)
    while job.poll() is None:
        seen |= listening(root)
        time.sleep(0.2)
    output = job.stdout.read()
    assert job.returncode == 0, output[-3000:]
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names and len(seen) >= 5, seen  # the check saw Ray's servers come up
    assert {(n, ip, port) for n, ip, port in seen if ip not in LOOPBACK} == set()
    assert "listening on 127.0.0.1 only, token auth on, no dashboard" in output
    assert "Token authentication is enabled" not in output and "ERROR" not in output
    token = tmp_path / "home" / ".ray" / "auth_token"
    assert token.is_file() and f"created Ray's auth token in {token}" in output


def test_folders_of_any_depth_are_walked_without_recursion_and_the_too_deep_become_one_reject(tmp_path):
    """1,200 levels: Python's recursive walks (os.walk, rglob in 3.11) die at about 1,000 with RecursionError."""
    from pipeline.io import storage
    from pipeline.io.sources import plan_items

    levels = [tmp_path / "in"]
    levels[0].mkdir()
    for _ in range(1200):  # one level at a time: pathlib's mkdir(parents=True) itself recurses
        levels.append(levels[-1] / "d")
        levels[-1].mkdir()
    (levels[-1] / "x.png").write_bytes(good(1))
    (tmp_path / "in" / "top.png").write_bytes(good(2))
    try:
        walked = list(storage.walk_local(str(tmp_path / "in")))
        assert [p for p, problem in walked if problem is None] == [str(tmp_path / "in" / "top.png")]
        assert [problem for _, problem in walked if problem] == ["too_deep"]
        _, items = plan_items(tmp_path / "in")
        assert [(it.source, it.reject) for it in items][0] == ("top.png", None)
        assert items[1].reject == "too_deep" and len(items[1].source) <= 300 and len(items) == 2
        assert storage.list_files(str(tmp_path / "in"), ".png") == [str(tmp_path / "in" / "top.png")]
    finally:  # removed here, deepest first: pytest's own clean-up (shutil.rmtree) recurses and would die on it
        (levels[-1] / "x.png").unlink()
        for level in reversed(levels[1:]):
            level.rmdir()


@pytest.mark.integration
def test_resume_files_of_the_wrong_shape_are_redone_and_an_output_inside_its_input_resumes(
        ray_cluster, vae_only_dir, tmp_path):
    from pipeline.common.config import EbdError
    from tests.test_precompute import precompute

    images = tmp_path / "in"
    images.mkdir()
    for i in range(6):
        (images / f"{i}.png").write_bytes(good(i))
    out = images / "latents"  # inside its own input: a resume must not plan its own shards as inputs
    first = precompute(images, vae_only_dir, out)
    assert first["totals"] == {"seen": 6, "encoded": 6, "rejected": 0, "shards": 2}
    again = precompute(images, vae_only_dir, out)
    assert again["totals"] == first["totals"]

    markers = sorted((out / "stats").glob("latents-*.json"))
    forged = json.loads(markers[1].read_text()) | {"count": 1014, "seen": 1014}  # counts that add up, but lie
    markers[0].write_text("[]")
    markers[1].write_text(json.dumps(forged))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("latents-*.tar")}
    redone = precompute(images, vae_only_dir, out)
    assert redone["totals"] == first["totals"]  # 6 encoded of 6, from the shards, not the markers
    assert all(p.stat().st_mtime_ns != before[p.name] for p in out.glob("latents-*.tar"))  # both encoded again
    marker = json.loads(markers[0].read_text())
    del marker["rejects"]
    markers[0].write_text(json.dumps(marker))
    assert precompute(images, vae_only_dir, out)["totals"] == first["totals"]

    (out / "run.json").write_text("{garbage")
    with pytest.raises(EbdError, match=r"run.json is damaged"):
        precompute(images, vae_only_dir, out)
    elsewhere, linked = tmp_path / "elsewhere", tmp_path / "linked"
    elsewhere.mkdir()
    precompute(images, vae_only_dir, linked, shard_size=3)  # a run of ours, whose stats/ is then swapped for a link
    import shutil
    shutil.rmtree(linked / "stats")
    (linked / "stats").symlink_to(elsewhere)
    (linked / "latents-000001.tar").unlink()  # a shard to redo: its marker would land outside the folder
    with pytest.raises(EbdError, match=r"holds links \(stats\)"):
        precompute(images, vae_only_dir, linked, shard_size=3)
    assert not list(elsewhere.iterdir())


def test_configs_that_validate_but_would_misbehave_are_refused_in_one_line(tmp_path):
    """Sense, not only type: a resolution that reserves gigabytes per image, a CPU share Ray cannot count, a pixel
    bound past what decoding can hold; and a max_pixels above Pillow's own bomb limit really applies."""
    from pipeline.common.config import ConfigError, from_dict
    from pipeline.vae.precompute import PrecomputeConfig

    base = dict(input=str(tmp_path), vae=str(tmp_path), output=str(tmp_path / "o"))
    for bad, match in [({"resolution": 100_000}, "resolution must be in"),
                       ({"num_cpus_per_task": 0.00001}, "num_cpus_per_task must be in"),
                       ({"max_pixels": 10 ** 12}, "max_pixels must be at most")]:
        with pytest.raises(ConfigError, match=match) as err:
            from_dict(PrecomputeConfig, base | bad)
        assert "\n" not in str(err.value)
    with pytest.raises(Rejected) as err:  # 100 megapixels: past Pillow's 89.5, within the max_pixels asked for
        decode_image(png_header_only(10_000, 10_000), RES, 200_000_000, 8)
    assert err.value.reason == "corrupt_image"  # the header passed; the missing pixels did not
    with pytest.raises(Rejected) as err:
        decode_image(png_header_only(10_000, 10_000), RES, 50_000_000, 8)
    assert err.value.reason == "too_many_pixels"


def test_a_task_asking_more_gpus_than_the_cluster_has_is_refused_not_left_waiting(ray_cluster, vae_only_dir,
                                                                                    tmp_path):
    from pipeline.common.config import EbdError
    from tests.test_precompute import precompute

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(good(1))
    with pytest.raises(EbdError, match="num_gpus_per_task is 2 but the cluster has 1 GPUs"):
        precompute(tmp_path / "in", vae_only_dir, tmp_path / "out", num_gpus_per_task=2)


def test_a_shuffled_shard_reads_each_parquet_row_group_once(tmp_path, monkeypatch):
    """8 row groups of 16 rows, shuffled into one shard: its rows are read in file order, one pass per row group
    (before, a shuffled shard re-read its row group for almost every row), and the footer is parsed once."""
    from pipeline.io.reading import read_items
    from pipeline.io.shard_plan import shard_order, split_into_shards
    from pipeline.io.sources import plan_items

    pq.write_table(pa.table({"image": [good(i) for i in range(128)]}), tmp_path / "a.parquet", row_group_size=16)
    _, items = plan_items(tmp_path / "a.parquet")
    shard = split_into_shards(shard_order(items, seed=0), 128)[0]
    assert [it.locator[2:4] for it in shard] == sorted(it.locator[2:4] for it in items)
    passes = []
    real = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):  # a spy: counts the passes, reads as before
        passes.append(kwargs.get("row_groups"))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    footers, opened = [], pq.ParquetFile.__init__

    def counted_footer(self, *args, **kwargs):  # a spy: counts the footers parsed
        footers.append(1)
        return opened(self, *args, **kwargs)
    monkeypatch.setattr(pq.ParquetFile, "__init__", counted_footer)
    loaded = list(read_items(list(shard), 1 << 20))
    assert len(passes) == 8 and sorted(p[0] for p in passes) == list(range(8))
    assert len(footers) == 1  # one footer parse for the file, not one per row group
    assert [x.data for x in loaded] == [good(it.locator[3] + 16 * it.locator[2]) for it in shard]


@pytest.mark.parametrize("fmt, mode, side, bound_mib, reason", [
    ("WEBP", "RGB", 2000, 40, "too_large_to_decode"),   # 17 B/px x 4 Mpx = 65 MiB > 40
    ("PNG", "RGB", 2000, 40, None),                     # 5 B/px x 4 Mpx = 19 MiB: decoded
    ("PNG", "RGBA", 2000, 30, "too_large_to_decode"),   # 10 B/px x 4 Mpx = 38 MiB > 30
])
def test_the_memory_a_decoder_will_take_is_bounded_per_format_from_the_header(fmt, mode, side, bound_mib, reason):
    data = encode_image(Image.new(mode, (side, side), (10, 20, 30, 255)[:len(mode)]), fmt)
    if reason is None:
        assert decode_image(data, RES, 10 ** 8, 8, max_decode_bytes=bound_mib * 2 ** 20)[0].shape == (RES, RES, 3)
        return
    with pytest.raises(Rejected) as err:
        decode_image(data, RES, 10 ** 8, 8, max_decode_bytes=bound_mib * 2 ** 20)
    assert err.value.reason == reason and "MiB to decode" in err.value.detail


@pytest.mark.parametrize("case", list(__import__("tests.hostile_corpus", fromlist=["CASES"]).CASES))
def test_every_case_of_the_hostile_corpus_is_its_rejects_within_its_time(tmp_path, case):
    """The standing corpus (tests/hostile_corpus.py), small: planned, read and decoded as a precompute worker does,
    each case gives exactly its rejects, the rest decodes, and nothing takes more than a few seconds."""
    from pipeline.io.reading import read_items
    from pipeline.io.sources import plan_items
    from tests.hostile_corpus import CASES, SETTINGS

    root, outside = tmp_path / "in", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    expected = CASES[case](root, outside)
    started = time.monotonic()
    _, items = plan_items(root, max_cell_bytes=SETTINGS["max_file_bytes"])
    seen = Counter()
    for loaded in read_items(items, SETTINGS["max_file_bytes"]):
        tick = time.monotonic()
        try:
            if loaded.reject:
                raise Rejected(*loaded.reject)
            decode_image(loaded.data, RES, 89_478_485, 8, max_decode_bytes=SETTINGS["max_decode_bytes"],
                         max_decode_seconds=SETTINGS["max_decode_seconds"])
        except Rejected as r:
            seen[r.reason] += 1
        assert time.monotonic() - tick < 5, loaded.item.source
    assert seen == expected
    assert all(it.source.isprintable() and len(it.source) <= 300 for it in items)
    assert time.monotonic() - started < 20


def test_text_from_inputs_cannot_forge_a_line_of_an_error_or_a_reject(tmp_path):
    """A parquet column named with a newline and escape codes, in a file with no image column: the one-line error
    names it escaped; a 100,000-character tar member name is cut in its source."""
    from pipeline.common.config import ConfigError
    from pipeline.io.sources import plan_items

    pq.write_table(pa.table({"evil\nerror: forged line\x1b[31m": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError) as err:
        plan_items(tmp_path / "a.parquet")
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value) and "evil\\nerror" in str(err.value)
    with tarfile.open(tmp_path / "b.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "k" * 100_000 + ".png", good(1))
    _, items = plan_items(tmp_path / "b.tar")
    assert len(items) == 1 and len(items[0].source) <= 300 and len(items[0].key) <= 80


def test_a_null_key_costs_its_row_not_its_file(tmp_path):
    from pipeline.io.sources import plan_items

    pq.write_table(pa.table({"id": ["a", None, "c"], "image": [good(1), good(2), good(3)]}), tmp_path / "a.parquet")
    _, items = plan_items(tmp_path / "a.parquet", key_column="id")
    assert [(it.key, it.reject) for it in items] == [("a", None), ("a_000000001", "missing_key"), ("c", None)]
    assert "null" in items[1].detail


def test_an_input_edited_in_place_is_encoded_again_on_resume_and_a_mistyped_marker_is_redone(
        ray_cluster, vae_only_dir, tmp_path):
    """Resume compares the inputs' sizes and modification times, not only their names: the shard holding an image
    rewritten under the same name is encoded again (and matches a clean run), the other is kept; a done marker whose
    label_fields is of the wrong type is a shard to redo, not an error on every re-run."""
    from tests.test_precompute import precompute, tar_digests

    images = tmp_path / "in"
    images.mkdir()
    for i in range(6):
        (images / f"{i}.png").write_bytes(good(i))
    out = tmp_path / "out"
    precompute(images, vae_only_dir, out, shuffle=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("latents-*.tar")}
    (images / "0.png").write_bytes(good(100))  # same name, other pixels (and size)
    precompute(images, vae_only_dir, out, shuffle=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("latents-*.tar")}
    assert after["latents-000000.tar"] != before["latents-000000.tar"]  # holds 0.png: encoded again
    assert after["latents-000001.tar"] == before["latents-000001.tar"]  # its inputs unchanged: kept
    precompute(images, vae_only_dir, tmp_path / "clean", shuffle=False)
    assert tar_digests(out) == tar_digests(tmp_path / "clean")

    marker = out / "stats" / "latents-000001.json"
    marker.write_text(json.dumps(json.loads(marker.read_text()) | {"label_fields": ["not", "a", "mapping"]}))
    assert precompute(images, vae_only_dir, out, shuffle=False)["totals"]["encoded"] == 6
    assert (out / "latents-000001.tar").stat().st_mtime_ns != after["latents-000001.tar"]
    assert isinstance(json.loads(marker.read_text())["label_fields"], dict)


def _descendants(root: int) -> dict[int, str]:
    """{pid: command} of every live descendant of `root`, from /proc."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parents[int(entry.name)] = int(fields[1])
                    names[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
            except OSError:
                continue
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for child in (p for p, parent in parents.items() if parent == pid):
            found[child] = names[child]
            todo.append(child)
    return found


def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path):
    """kill -9 of a job's driver: Ray fate-shares its daemons, and the watchdog a local start leaves takes the agents
    the raylet started (about 200 MB that outlived the driver before)."""
    images = tmp_path / "in"
    images.mkdir()
    for i in range(40):
        (images / f"{i}.png").write_bytes(good(i))
    driver = subprocess.Popen([sys.executable, "-m", "jobs.precompute", "--config", "configs/precompute-demo.yaml",
                               "--input", str(images), "--vae", "models/demo", "--output", str(tmp_path / "out"),
                               "--set", "label_fields=[]", "--set", "min_side=8"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, family = time.monotonic() + 120, {}
    while time.monotonic() < deadline and not (any("RuntimeEnvAgent" in c for c in family.values())
                                               and any("import os, sys, time" in c for c in family.values())):
        family = _descendants(driver.pid)  # the agents, and the watchdog ray.init's return started
        time.sleep(0.2)
    assert any("RuntimeEnvAgent" in c for c in family.values()), family
    time.sleep(2)  # the watchdog notes the instance's processes once a second
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in family):
        time.sleep(0.5)
    alive = {pid: c for pid, c in family.items() if Path(f"/proc/{pid}/stat").exists()
             and (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z")}
    assert not alive
