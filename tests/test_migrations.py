"""Configs and records from older versions load as today's, through the one migrations module, and nothing past
loading sees an old key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.common import migrations
from pipeline.common.config import from_dict
from pipeline.generation import GenerateConfig
from pipeline.sampling.settings import NoiseLevelSettings, sampler_settings, with_overrides
from pipeline.training.config import TrainConfig


def test_an_old_generate_config_loads_with_its_langevin_keys_in_todays_places():
    cfg = from_dict(GenerateConfig, {"model": "m", "vae": "v", "output": "o", "langevin_actors": 3,
                                     "langevin_cpus": 2.0, "langevin_steps": 60, "langevin_step_size": 0.05})
    assert (cfg.sampler_actors, cfg.sampler_cpus) == (3, 2.0)
    assert cfg.sampler == {"steps": 60, "step_size": 0.05}


def test_an_old_flat_train_config_loads_into_its_objective_and_sampler_sections():
    cfg = from_dict(TrainConfig, {"latents": "l", "output": "o", "objective": "dsm", "channels": [32, 64],
                                  "sampler": "ipndm", "sampler_levels": 12})
    assert cfg.objective.name == "dsm" and list(cfg.objective.channels) == [32, 64]
    assert cfg.sampler == {"name": "ipndm", "levels": 12}


def test_a_saved_ddim_record_means_the_models_timesteps_and_an_override_of_steps_means_levels():
    saved = sampler_settings({"name": "ddim", "steps": 30, "eta": 0.5})
    assert (saved.levels, saved.schedule, saved.eta) == (30, "model", 0.5)
    karras = NoiseLevelSettings("ddim", 20)
    changed = with_overrides(karras, {"steps": 8})
    assert (changed.levels, changed.schedule) == (8, "karras")  # the schedule stays the model's saved one


def test_a_run_folders_langevin_batch_size_reads_as_the_sampler_stages():
    assert migrations.batch_sizes({"langevin": 32, "decode": 8}) == {"sampler": 32, "decode": 8}
    assert migrations.batch_sizes(None) is None


def test_a_run_folders_sampler_precision_kept_among_its_batch_sizes_reads_as_its_own_key():
    older = {"batch_sizes": {"sampler": 8, "decode": 8, "sampler_precision": "bfloat16"}}
    assert migrations.sampler_precision(older) == "bfloat16"
    assert migrations.batch_sizes(older["batch_sizes"]) == {"sampler": 8, "decode": 8}
    assert migrations.sampler_precision({"batch_sizes": {"sampler": 8}, "sampler_precision": "float32"}) == "float32"
    assert migrations.sampler_precision({"batch_sizes": {"sampler": 8, "decode": 8}}) is None  # before the setting
    assert migrations.sampler_precision({}) is None


def test_formats_are_a_list_an_older_one_word_format_still_loads_and_run_json_keeps_its_word():
    from pipeline.io.output_formats import FORMATS, format_label, output_formats

    both = from_dict(GenerateConfig, {"model": "m", "vae": "v", "output": "o", "format": "both"})
    tars = from_dict(GenerateConfig, {"model": "m", "vae": "v", "output": "o", "format": "webdataset"})
    assert both.formats == ["parquet", "webdataset"] and tars.formats == ["webdataset"]
    # run.json's one word, as every earlier version wrote it, so their folders resume
    assert format_label(tuple(both.formats)) == "both" and format_label(tuple(tars.formats)) == "webdataset"
    assert output_formats(["webdataset", "parquet"]) == tuple(FORMATS)[:2]  # written and read in one order


def test_a_done_marker_an_older_version_wrote_reads_in_todays_keys(tmp_path):
    """A generated shard whose marker times its sampler stage as `langevin_batch_seconds` (before the stage had its
    name) is complete, and its seconds count as the sampler's."""
    import json

    import numpy as np

    from pipeline.io.image_shards import completed_shard, stage_seconds, stats_path, write_image_shard

    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    write_image_shard(str(tmp_path), 0, ("parquet",), ["a", "b"], images, [1, 2], np.zeros(2), "m",
                      extra_stats={"sampler_batch_seconds": [0.5, 0.25]})
    marker = Path(stats_path(str(tmp_path), 0))
    old = json.loads(marker.read_text())
    old["langevin_batch_seconds"] = old.pop("sampler_batch_seconds")
    marker.write_text(json.dumps(old))
    stats = completed_shard(str(tmp_path), 0, ("parquet",))
    assert stats is not None and "langevin_batch_seconds" not in stats
    assert stage_seconds(stats, "sampler") == [0.5, 0.25]


# ------------------------------------------------------------------------------------------ configs of old versions

_LEGACY = sorted((Path(__file__).parent / "legacy").glob("*.yaml"))  # the shipped configs as older versions wrote them
_MOVED = {"format": ("formats", {"both": ["parquet", "webdataset"]})}  # a key whose value changed form as it moved


def _places(values: dict) -> list[tuple[str, object]]:
    """Every (key, value) of a config, nested sections included."""
    found = []
    for key, value in values.items():
        found.append((key, value))
        if isinstance(value, dict):
            found += _places(value)
    return found


@pytest.mark.parametrize("path", _LEGACY, ids=[p.name for p in _LEGACY])
def test_a_config_of_an_older_version_loads_with_every_setting_in_its_new_place(path):
    """Each flat key an older version wrote (`langevin_steps`, `sampler_levels`, `channels`, `ddim_steps`, `format`,
    ...) is migrated once, on load, to where today's config keeps it, with its value; a key left unset (None) is
    today's default. The files' comments cite the modules of their day."""
    from pipeline.common.config import load_config, to_dict

    cls, sets = (GenerateConfig, ["model=m", "vae=v", "output=o"]) if path.name.startswith("generate") else \
        (TrainConfig, ["latents=l", "output=o"])
    raw = yaml.safe_load(path.read_text())
    legacy = {k: v for k, v in raw.items() if k not in {f.name for f in dataclasses.fields(cls)} and v is not None}
    assert legacy, f"{path.name} holds no key of an older version"
    found = _places(to_dict(load_config(cls, path, sets)))
    for key, value in legacy.items():
        stem = key.removeprefix("langevin_").removeprefix("sampler_").removeprefix("ddim_")
        names, expected = {key, stem, f"sampler_{stem}"}, value
        if key in _MOVED:
            names, expected = {_MOVED[key][0]}, _MOVED[key][1].get(value, value)
        assert any(k in names and v == expected for k, v in found), (path.name, key, value)
