"""Job configs: a dataclass per job, loaded from YAML, overridden by CLI flags and `--set key=value`.

Every job validates its whole config before it touches the output folder, so a typo costs one clear line on
stderr (exit code 2) and writes nothing:

    cfg = load_config(PrecomputeConfig, "configs/precompute.yaml", sets=["batch_size=8"], input="imgs/")
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import ConfigError, EbdError
from .plugins import import_plugins

MAX_CONFIG_BYTES = 1 << 20  # a config file (the shipped ones are under 4 KiB)
MAX_SET_BYTES = 64 << 10  # one --set value
MAX_CONFIG_DEPTH = 32  # nesting of mappings and lists (the shipped configs nest 3 deep)
QUOTE_CHARS = 200  # the most of a value an error message quotes


class _Refused(yaml.YAMLError):
    """A YAML document ebd refuses to compose (an alias, too deep): configs are untrusted input."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (`1e-4` is a number, not the string PyYAML 1.1 makes of a
    mantissa without a dot), no aliases (a 256-byte "billion laughs" expands to gigabytes) and at most
    MAX_CONFIG_DEPTH levels of nesting (the composer recurses once a level). Custom tags (`!!python/object`) are
    the safe loader's ConstructorError."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _Refused(f"YAML aliases (*{self.peek_event().anchor[:40]}) are not accepted in a config: write the "
                           "value out")
        self.depth = getattr(self, "depth", 0) + 1
        try:
            if self.depth > MAX_CONFIG_DEPTH:
                raise _Refused(f"nested more than {MAX_CONFIG_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str | bytes, what: str = "a --set value", max_bytes: int = MAX_SET_BYTES):
    """A YAML document (a config file, a --set value, a conditions file) with YAML 1.2's numbers, through the safe
    loader, refused in one line (ConfigError) when it is too large, not UTF-8, not YAML, uses an alias or a custom
    tag, or nests too deep."""
    if len(text) > max_bytes:
        raise ConfigError(f"{what} is {len(text):,} bytes, more than the {max_bytes:,} a config may have")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{what} is not UTF-8 text (byte {e.start} is {text[e.start]:#04x})") from None
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{what} is not valid YAML{where}: {quote_text(str(problem))}") from None
    except RecursionError:
        raise ConfigError(f"{what} nests too deep to parse") from None
    except ValueError as e:  # a number Python will not convert (an integer of more than 4,300 digits)
        raise ConfigError(f"{what} holds a value Python cannot read: {quote_text(str(e))}") from None


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters: a value from a config or an input may be
    megabytes long."""
    if isinstance(value, (list, tuple, dict)) and not _small(value):
        return f"<a {type(value).__name__} of {len(value):,} items>"
    try:
        return quote_text(repr(value), limit)
    except ValueError:  # an integer too long for repr
        return f"<an integer of {value.bit_length():,} bits>" if isinstance(value, int) else "<an unprintable value>"


def quote_text(text: str, limit: int = QUOTE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _small(value: list | tuple | dict, items: int = 64, depth: int = 4) -> bool:
    """Whether `value` is a short, shallow container whose repr is cheap to build."""
    if len(value) > items or depth == 0:
        return False
    children = value.values() if isinstance(value, dict) else value
    return all(_small(c, items, depth - 1) for c in children if isinstance(c, (list, tuple, dict)))


class JobConfig:
    """Base of the job configs: frozen dataclasses (values, never changed once built), validated when constructed,
    so a config built in Python with a bad value raises ConfigError at once, as one loaded from YAML does.

    `validate()` is pure: no I/O, no imports, no rewriting. A section that has a typed form (the training objective's
    settings, the sampler's keys) names its parser in the field's metadata (`field(metadata={"parse": fn})`): `fn`
    is pure and turns the value given into the value kept, once, as the config is built. What needs I/O (plugins, a
    conditions file) is done by the driver: `load_config` imports plugins before building; a job reads its files
    after."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            parse = f.metadata.get("parse")
            if parse is not None:
                object.__setattr__(self, f.name, parse(getattr(self, f.name)))  # a frozen value's construction
        self.validate()

    def validate(self) -> None:
        pass


C = TypeVar("C")


def load_config(cls: type[C], path: str | Path | None = None, sets: list[str] | None = None,
                **overrides: Any) -> C:
    """Builds `cls` from a YAML file, then `--set key=value` strings, then keyword overrides (CLI flags).

    Keyword overrides that are None are ignored, so argparse defaults of None leave the file's value alone.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(Path(path)))
    migrate = getattr(cls, "migrate", None)
    if migrate is not None:  # an older config's keys in today's places, before --set names today's keys
        values = migrate(values)
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {quote(item)}")
        section, dot, name = key.strip().partition(".")
        value = parse_yaml(raw, f"--set {quote_text(key.strip(), 60)}") if raw.strip() else None
        if dot:  # section.key: one key of a mapping-valued key (`--set objective.sigma_max=30`)
            current = values.get(section)
            if isinstance(current, str):  # a section given by its name alone, e.g. objective: dsm
                current = {"name": current}
            values[section] = dict(current or {}) | {name: value}
        else:
            values[key.strip()] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    if SHOW_CONFIG:
        print(describe_config(cls, values))
        raise SystemExit(0)
    plugins = values.get("plugins")
    if isinstance(plugins, list) and all(isinstance(m, str) for m in plugins):  # (from_dict refuses other values)
        import_plugins(plugins)  # they register the objectives and model kinds the config may name
    return from_dict(cls, values)


SHOW_CONFIG = False  # set by run_cli for `--show-config`: load_config prints the effective config and exits
HIDDEN_KEYS = ("simulate_oom_above", "simulate_gpu_memory_gb")  # test hooks: accepted, never listed


def describe_config(cls: type, values: dict[str, Any]) -> str:
    """The effective config of a job: each key's value (from the file, --set and flags, else the default), with
    the comment its dataclass gives it."""
    comments = _field_comments(cls)
    lines = [f"# {cls.__name__}: the effective config (defaults where nothing set a key)"]
    for f in dataclasses.fields(cls):
        if f.name in HIDDEN_KEYS:
            continue
        if f.name in values:
            value = values[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        text = yaml.safe_dump({f.name: value}, default_flow_style=True, width=10**6).strip()[1:-1]
        note = comments.get(f.name, "")
        lines.append(f"{text:<40}  # {note}" if note else text)
    return "\n".join(lines)


def _field_comments(cls: type) -> dict[str, str]:
    """name -> the comment on its line, or the comment block just above it, in the dataclass's source."""
    import inspect

    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        name = stripped.split(":", 1)[0]
        if name.isidentifier() and ":" in stripped:
            code, _, trailing = stripped.partition("  #")
            block = " ".join(above)
            comments[name] = trailing.strip() or (block.split(". ")[0].rstrip(".") + "." if block else "")
        above = []
    return comments


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Type-checks `values` against the dataclass `cls` and calls its `validate()` if it has one; a class with a
    `migrate(values)` classmethod first turns an older config's keys into today's."""
    migrate = getattr(cls, "migrate", None)
    if migrate is not None:
        values = migrate(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        raise ConfigError(f"unknown config key {quote(unknown[0], 80)} for {cls.__name__}"
                          + (f": did you mean {close[0]!r}?" if close else "")
                          + " (--show-config lists every key)")
    hints = typing.get_type_hints(cls)
    checked = {name: _coerce(name, value, hints[name]) for name, value in values.items()}
    try:
        cfg = cls(**checked)
    except TypeError as e:  # a required field is missing
        missing = [n for n, f in fields.items() if n not in checked and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"missing required config key {quote(missing[0], 80)}" if missing else str(e)) from None
    if hasattr(cfg, "validate") and not isinstance(cfg, JobConfig):  # a JobConfig validated itself
        cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def require(condition: bool, message: str) -> None:
    """Raises ConfigError(message) unless condition holds: keeps `validate()` methods one line per rule."""
    if not condition:
        raise ConfigError(message)


def require_at_least(config, minimum: float, *names: str, strictly: bool = False) -> None:
    """One rule for several numeric keys: each set (not None) value must be >= minimum (> when `strictly`)."""
    bad = [n for n in names if (v := getattr(config, n)) is not None and (v <= minimum if strictly else v < minimum)]
    require(not bad, f"{', '.join(bad)} must be {'>' if strictly else '>='} {minimum:g}, got "
                     f"{', '.join(repr(getattr(config, n)) for n in bad)}")


# The shipped configs: pipeline/configs links to the repository's configs/ and a built wheel holds the files, so
# `--config NAME.yaml` works from a checkout and after `pip install` alike.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def find_config(path: Path) -> Path:
    """`path` as given, else the shipped config of that name when the path names one (`NAME.yaml` or
    `configs/NAME.yaml`), so `ebd train --config configs/train.yaml` works from any working directory; a path in any
    other folder is only ever itself (a typo in a folder name is an error, never another file)."""
    if path.is_file() or path.is_absolute() or path.parent not in (Path("."), Path("configs")):
        return path
    candidate = CONFIGS / path.name
    return candidate if candidate.is_file() else path


def _read_yaml(path: Path) -> dict[str, Any]:
    path = find_config(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size:,} bytes, more than the {MAX_CONFIG_BYTES:,} a "
                          "config may have")
    data = parse_yaml(path.read_bytes(), f"config file {path}", MAX_CONFIG_BYTES)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of key: value")
    return data


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Accepts `value` for a field annotated `hint`, converting int->float; raises ConfigError otherwise."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(name, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {name!r}: {quote(value)} is not one of the accepted types "
                          f"({_describe(hint)})")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {name!r} must be null")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise ConfigError(f"config key {name!r} must be one of {', '.join(map(repr, choices))}, got {quote(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r} must be a list, got {quote(value)}")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        return [_coerce(name, v, item_hint) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} must be a mapping, got {quote(value)}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key {name!r} must be a finite number, got {quote(value)}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key {name!r} must be {_describe(hint)}, got {quote(value)}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def job_parser(module: str, doc: str, address: bool = True, config: type | None = None, flags: tuple[str, ...] = (),
               required: tuple[str, ...] = ()):
    """An argparse parser with the flags every job shares: --config, --set KEY=VALUE, --show-config and, for jobs
    that run on a Ray cluster, --address; plus a `--key` flag for each config key in `flags` (its type and choices
    from the field, its help from the field's comment; `required` ones say so). `load_job_config` reads them."""
    import argparse

    prog = sys.argv[0] if sys.argv[0].startswith("ebd ") else f"python -m {module}"  # the `ebd` command, or -m
    parser = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0])
    name = module.rsplit(".", 1)[-1].replace("_", "-")
    examples = sorted(p.name for p in CONFIGS.glob(f"{name}*.yaml"))
    parser.add_argument("--config", help="YAML config" + (f" (e.g. configs/{examples[0]})" if examples else ""))
    if address:
        parser.add_argument("--address", help="Ray cluster address: host:port, or auto for the cluster `ray start` "
                                              "left here (default: RAY_ADDRESS, else a new local instance on "
                                              "127.0.0.1)")
        parser.add_argument("--dashboard", action="store_true",
                            help="start the Ray dashboard (on 127.0.0.1) with a local instance")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--show-config", action="store_true",
                        help="print the effective config (defaults, then --config, --set and flags) and exit")
    if config is not None:
        hints, comments = typing.get_type_hints(config), _field_comments(config)
        for key in flags:
            hint = hints[key]
            many = typing.get_origin(hint) is list  # a list key takes its values after one flag
            kind, choices = _flag_type(typing.get_args(hint)[0] if many else hint)
            note = ("(required) " if key in required else "") + (comments.get(key) or f"the config key {key}")
            parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, choices=choices,
                                nargs="+" if many else None, help=note.replace("%", "%%"))
        parser.set_defaults(config_class=config, config_flags=tuple(flags))
    return parser


def load_job_config(args, **more: Any):
    """The job's config from a `job_parser` parser's arguments: the file, then --set, then the config flags given
    (and `more` keys a job reads its own way, e.g. a repeatable flag)."""
    flags = {k: getattr(args, k) for k in args.config_flags}
    return load_config(args.config_class, args.config, args.set, **flags, **more)


def _flag_type(hint: Any) -> tuple[type, list | None]:
    """A config field's command-line type: its Literal's choices, else int, float or str (a mapping is a file)."""
    options = [h for h in typing.get_args(hint) if h is not type(None)] \
        if typing.get_origin(hint) in (Union, types.UnionType) else [hint]
    for option in options:
        if typing.get_origin(option) is Literal:
            return str, list(typing.get_args(option))
        if option in (int, float):
            return option, None
    return str, None


def run_cli(main) -> None:
    """Runs a job's `main()`, turning EbdError into one line on stderr and exit code 2 (no traceback wall)."""
    from .logs import configure_logging

    global SHOW_CONFIG
    SHOW_CONFIG = "--show-config" in sys.argv[1:]
    configure_logging()
    try:
        code = main()
    except EbdError as e:  # capped: a message may quote an input, and stderr stays readable whatever it was
        print(f"error: {quote_text(str(e), 2000)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
