"""diffusers reads this file to find the class of the model in this folder: every kind ebd knows
(pipeline.models.KINDS), as installed."""
from pipeline.models import KINDS


def __getattr__(name):
    if name in KINDS:
        return KINDS[name]
    raise AttributeError(name)
