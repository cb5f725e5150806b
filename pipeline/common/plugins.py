"""Plugins: modules a job config names in `plugins` (`plugins: [mypackage.my_kind]`), imported before the job runs,
in the driver and in every Ray worker, so the model kinds and objectives they register (`models.register`,
`training.objectives.register`) exist wherever a model is built or loaded. A model folder never names code: only
the user's own config does (docs/model-kinds.md)."""

from __future__ import annotations

import importlib

from .errors import ConfigError


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Imports each module (once: Python caches them); one line if one cannot be imported."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"plugin {name!r} cannot be imported: {e}") from None
