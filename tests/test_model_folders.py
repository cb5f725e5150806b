"""Model folders appear whole or not at all, and a folder whose weights and config do not belong together is refused."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.common.config import EbdError
from pipeline.io.weights import CONFIG_FILE, WEIGHTS_FILE
from pipeline.models import load_model
from pipeline.models.short_run_energy import EnergyModel, EnergyModelConfig


def tiny(seed: int) -> EnergyModel:
    torch.manual_seed(seed)
    return EnergyModel(EnergyModelConfig([4, 8, 8], [8]), {})


def test_a_new_folder_is_written_beside_its_name_and_renamed_into_place(tmp_path, monkeypatch):
    def crash(src, dst):  # the process dies at the last step of the export
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny(0).save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()  # nothing a reader could take for a model
    monkeypatch.undo()

    folder = tiny(0).save_pretrained(tmp_path / "model")  # the re-run replaces the stale staging folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = load_model(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny(0).state_dict().values()))


def test_weights_replaced_without_their_config_are_refused_in_one_line(tmp_path):
    folder = tiny(0).save_pretrained(tmp_path / "model")
    assert "weights_sha256" in json.loads((folder / CONFIG_FILE).read_text())
    tiny(1).save_pretrained(tmp_path / "other")
    # an export over an existing folder killed between its two files: new weights, the old config
    (folder / WEIGHTS_FILE).write_bytes((tmp_path / "other" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(EbdError, match="is not the file .*config.json was written with") as err:
        load_model(folder)
    assert "\n" not in str(err.value)
    tiny(1).save_pretrained(folder)  # exported again over it: whole again
    assert load_model(folder).metadata == {}  # the weights' record is the folder's, not the model's metadata
