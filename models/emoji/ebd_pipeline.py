"""diffusers reads this file to find the pipeline class model_index.json names: ebd's, as
installed."""
from pipeline.api import EBDPipeline  # noqa: F401
