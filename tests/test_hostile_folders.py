"""Configs, model folders and run folders are as untrusted as images: each hostile one is a one-line error (exit 2
from a job), found before anything large is built or read (issue: hostile inputs, round 3)."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common.config import ConfigError, EbdError, parse_yaml
from pipeline.io.weights import CONFIG_FILE, WEIGHTS_FILE
from pipeline.models import load_model

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "demo" / "ebm"


# ----------------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("text, says", [
    ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
     'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]', "aliases"),
    ("!!python/object/apply:os.system ['echo pwned']", "could not determine a constructor"),
    ("[" * 3000 + "]" * 3000, "nested more than 32 levels"),
    ("{" * 3000, "nested more than 32 levels"),
    ("a: [1, 2", "line 1, column 9"),
    (b"lr: \xff\xfe", "not UTF-8"),
    ("x" * 70_000, "more than the 65,536"),
])
def test_hostile_yaml_is_one_short_line(text, says):
    with pytest.raises(ConfigError, match=says) as err:
        parse_yaml(text)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_yaml_anchors_without_aliases_and_yaml_12_numbers_still_parse():
    assert parse_yaml("a: &x 1\nlr: 1e-4\nsampler: {levels: 13}") == {"a": 1, "lr": 1e-4, "sampler": {"levels": 13}}


def run_job(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_a_job_refuses_hostile_configs_with_exit_2_and_a_short_quote(tmp_path):
    """A billion-laughs --set, a custom tag in the file, a non-UTF-8 file and a megabyte value: exit 2, one line on
    stderr that quotes at most a couple of hundred characters."""
    (tmp_path / "tag.yaml").write_text("batch_size: !!python/object/apply:os.system ['echo pwned']\n")
    (tmp_path / "latin1.yaml").write_bytes(b"run_name: caf\xe9\n")
    laughs = "x=" + "{a: &a [1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a], c: [*b,*b,*b,*b,*b,*b,*b,*b]}"
    cases = [["--config", str(tmp_path / "tag.yaml")], ["--config", str(tmp_path / "latin1.yaml")],
             ["--config", "configs/train.yaml", "--set", laughs],
             ["--config", "configs/train.yaml", "--set", "lr=" + "9" * 50_000]]
    for extra in cases:
        done = run_job("jobs.train", "--latents", str(tmp_path), "--output", str(tmp_path / "out"), *extra)
        assert done.returncode == 2, (extra[-1][:80], done.stderr[-2000:])
        assert "Traceback" not in done.stderr and len(done.stderr) < 1000, done.stderr[-2000:]
        assert done.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- model folders

def copy_model(tmp_path: Path, name: str = "m") -> Path:
    folder = tmp_path / name
    shutil.copytree(SHIPPED, folder)
    return folder


def rewrite_weights(folder: Path, change) -> None:
    """Edits model.safetensors' JSON header with `change(header)`, keeps its data bytes, and drops the config's sha256
    (so only the header checks stand between the file and the loader)."""
    data = (folder / WEIGHTS_FILE).read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    change(header)
    raw = json.dumps(header).encode()
    (folder / WEIGHTS_FILE).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])
    edit_config(folder, lambda c: c.pop("weights_sha256"))


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    change(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def first_tensor(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def past_the_end(header):
    first_tensor(header)["data_offsets"][1] += 10**9


def lying_dtype(header):
    first_tensor(header)["dtype"] = "F64"


def overflowing_shape(header):
    first_tensor(header)["shape"] = [2**62, 2**62]


def unknown_dtype(header):
    first_tensor(header)["dtype"] = "OBJECT"


@pytest.mark.parametrize("change, says", [(past_the_end, "not inside the file"), (lying_dtype, "do not hold"),
                                          (overflowing_shape, "shape"), (unknown_dtype, "dtype 'OBJECT'")])
def test_forged_safetensors_headers_are_refused_before_a_tensor_is_built(tmp_path, change, says):
    folder = copy_model(tmp_path)
    rewrite_weights(folder, change)
    with pytest.raises(EbdError, match=says) as err:
        load_model(folder)
    assert "\n" not in str(err.value)


def wide_channels(config):
    config["model"]["channels"] = [1536, 1536]


def model_a_string(config):
    config["model"] = "big"


def sampler_a_list(config):
    config["sampler"] = [1, 2]


def negative_width(config):
    config["model"]["channels"] = [-16, 32]


@pytest.mark.parametrize("change, says", [
    (wide_channels, "does not fit its config.json .*wrong shape"), (model_a_string, "'model' must be a mapping"),
    (sampler_a_list, "'sampler' must be a mapping"),
    (negative_width, "channels must be|NoiseConditionalEnergy builds")])
def test_configs_that_do_not_fit_their_weights_are_one_line_without_building_the_network(tmp_path, change, says):
    folder = copy_model(tmp_path)
    edit_config(folder, lambda c: (c.pop("weights_sha256"), change(c)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EbdError, match=says) as err:
        load_model(folder)
    assert "\n" not in str(err.value) and len(str(err.value)) < 600
    # channels [1536, 1536] would be about 1.5 GB of float32 weights; built on the meta device it costs nothing
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000  # KiB


def test_deeply_nested_or_huge_model_configs_are_one_line(tmp_path):
    folder = copy_model(tmp_path)
    (folder / CONFIG_FILE).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(EbdError, match="not valid JSON"):
        load_model(folder)
    (folder / CONFIG_FILE).write_text(" " * (17 << 20))
    with pytest.raises(EbdError, match="more than a model config may have"):
        load_model(folder)


def test_generate_refuses_hostile_model_folders_and_samplers_with_exit_2(tmp_path):
    folder = copy_model(tmp_path)
    edit_config(folder, lambda c: (c.pop("weights_sha256"), wide_channels(c)))
    common = ["jobs.generate", "--config", "configs/generate.yaml", "--vae", "models/demo", "--num-images", "4"]
    cases = [(["--model", str(folder)], "does not fit"),
             (["--model", str(SHIPPED), "--set", "sampler={levels: 1000000000000}"], "levels must be in"),
             (["--model", str(SHIPPED), "--set", "sampler={name: langevin}"], "not 'langevin'"),
             (["--model", str(SHIPPED), "--set", "sampler.levles=10"], "did you mean 'levels'")]
    for extra, says in cases:
        done = run_job(*common, *extra, "--output", str(tmp_path / "out"))
        assert done.returncode == 2 and says in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and len(done.stderr) < 1000
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- run folders

@pytest.fixture(scope="module")
def small_run(ray_cluster, tmp_path_factory) -> Path:
    """8 images of the shipped demo energy in two parquet shards."""
    from pipeline.common.config import from_dict
    from pipeline.generation import GenerateConfig, run_generation

    out = tmp_path_factory.mktemp("run") / "gen"
    run_generation(from_dict(GenerateConfig, dict(model=str(SHIPPED), vae=str(REPO / "models" / "demo"),
                                                  output=str(out), num_images=8, images_per_shard=4,
                                                  format="parquet", progress_interval_s=0.0)))
    return out


def tampered(small_run: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "gen"
    shutil.copytree(small_run, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    replaced = change(folder, manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest if replaced is None else replaced))
    return folder


def claims_millions(folder, m):
    m["images"], m["shards"][0]["count"] = 300_000_000, 299_999_996


def points_elsewhere(folder, m):
    files = m["shards"][0]["files"]
    name = next(iter(files))
    files[f"../../{Path(folder).name}-other/{name}"] = files.pop(name)


def shard_missing(folder, m):
    (folder / next(iter(m["shards"][1]["files"]))).unlink()


def shard_replaced(folder, m):
    first, second = (next(iter(s["files"])) for s in m["shards"])
    shutil.copy(folder / second, folder / first)  # another run's (here: the other shard's) parquet, same name


def shard_truncated(folder, m):
    name, _ = next(iter(m["shards"][0]["files"].items()))
    data = (folder / name).read_bytes()[:-100]
    (folder / name).write_bytes(data)
    m["shards"][0]["files"][name] = __import__("hashlib").sha256(data).hexdigest()  # a consistent lie


def claims_more(folder, m):
    m["images"], m["shards"][0]["count"] = 1_000_004, 1_000_000  # within the caps, and adding up: the file tells


def wrong_latent_shape(folder, m):
    m["latents"]["shape"] = [4, 9, 9]


def huge_latent_shape(folder, m):
    m["latents"]["shape"] = [4, 100_000, 100_000]


def a_list(folder, m):
    return [m]


def no_model(folder, m):
    del m["model"]


@pytest.mark.parametrize("change, says", [
    (claims_millions, "shards must be a list"), (claims_more, "holds 4 rows, its manifest 1000000"),
    (points_elsewhere, "not a plain file name"),
    (shard_missing, "is missing"), (shard_replaced, "sha256 differs"), (shard_truncated, "does not read"),
    (wrong_latent_shape, "not of the manifest's shape"), (huge_latent_shape, "latents.shape must be"),
    (a_list, "not a generation manifest"), (no_model, "model and vae must each be")])
def test_hostile_run_folders_are_one_line_before_anything_large_is_read(small_run, tmp_path, change, says):
    from pipeline.io.image_shards import read_generated

    latents, images = read_generated(str(small_run))
    assert latents.shape == (8, 4, 8, 8) and images.shape[0] == 8  # the run as written reads
    folder = tampered(small_run, tmp_path, change)
    with pytest.raises(EbdError, match=says) as err:
        read_generated(str(folder))
    assert "\n" not in str(err.value) and len(str(err.value)) < 600


def test_a_tiff_or_oversized_image_cell_is_refused_by_evaluation(small_run, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.io.image_shards import read_generated

    def tiff_cell(folder, m):
        name = next(iter(m["shards"][0]["files"]))
        table = pq.read_table(folder / name)
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buffer, "TIFF")
        cells = table.column("image").to_pylist()
        cells[0] = {**cells[0], "bytes": buffer.getvalue()} if isinstance(cells[0], dict) else buffer.getvalue()
        table = table.set_column(table.schema.get_field_index("image"), "image",
                                 pa.array(cells, table.schema.field("image").type))
        pq.write_table(table, folder / name)
        m["shards"][0]["files"][name] = __import__("hashlib").sha256((folder / name).read_bytes()).hexdigest()

    with pytest.raises(EbdError, match="not a PNG ebd can read"):
        read_generated(str(tampered(small_run, tmp_path, tiff_cell)))
