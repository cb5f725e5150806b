"""A pipeline folder in diffusers' layout: model_index.json naming each component's subfolder and class.

    FOLDER/model_index.json   {"_class_name": ["ebd_pipeline", "EBDPipeline"], "vae": ["diffusers", "AutoencoderKL"],
                               "ebm": ["ebd_model", "<the model's class>"], "sampler": {...}}
    FOLDER/vae/               the AutoencoderKL (diffusers' own format)
    FOLDER/ebm/               the ebd model (config.json + model.safetensors)
    FOLDER/ebd_pipeline.py, FOLDER/ebm/ebd_model.py

diffusers' loader finds classes from outside diffusers only through a Python file in the folder it loads, read when
the caller passes trust_remote_code=True; these two name ebd's installed classes and hold no other code. ebd's own
loader (`EBDPipeline.from_pretrained`) reads the folder without them.
"""

from __future__ import annotations

from pathlib import Path

from .files import atomic_write_json, read_json
from .storage import write_bytes

INDEX_FILE = "model_index.json"
MODEL_DIR = "ebm"
PIPELINE_FILE, MODEL_FILE = "ebd_pipeline.py", "ebd_model.py"
PIPELINE_CLASS = [PIPELINE_FILE[:-3], "EBDPipeline"]
PIPELINE_SHIM = '''"""diffusers reads this file to find the pipeline class model_index.json names: ebd's, as
installed."""
from pipeline.api import EBDPipeline  # noqa: F401
'''
MODEL_SHIM = '''"""diffusers reads this file to find the class of the model in this folder: every kind ebd knows
(pipeline.models.KINDS), as installed."""
from pipeline.models import KINDS


def __getattr__(name):
    if name in KINDS:
        return KINDS[name]
    raise AttributeError(name)
'''


def write_pipeline_index(root: str | Path, **entries) -> dict:
    """Adds `entries` (component name -> [library, class], or a config value) to ROOT/model_index.json, keeping what
    it lists already, and writes the files diffusers' loader needs for the components it names."""
    import diffusers

    root = Path(root)
    index = read_json(root / INDEX_FILE) if (root / INDEX_FILE).is_file() else {}
    index |= {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__} | entries
    write_bytes(root / PIPELINE_FILE, PIPELINE_SHIM.encode())
    if MODEL_DIR in index:
        index[MODEL_DIR] = [MODEL_FILE[:-3], index[MODEL_DIR][1]]
        write_bytes(root / MODEL_DIR / MODEL_FILE, MODEL_SHIM.encode())
    atomic_write_json(root / INDEX_FILE, index)
    return index
