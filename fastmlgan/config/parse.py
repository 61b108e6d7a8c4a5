"""The command line and config files: ``--section.key value`` options, ``--preset``, ``--config
FILE`` (a run's config.json works), the help text, and the one-line messages for unknown or
mistyped options."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import typing
from pathlib import Path
from typing import Any

from fastmlgan.config.presets import PRESETS
from fastmlgan.config.schema import NOT_FROM_FILE, SECTION_TYPES, SECTIONS, TOP_LEVEL, Config
from fastmlgan.errors import ConfigError
from fastmlgan.safeio import read_json


def valid_keys() -> list[str]:
    keys = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(SECTION_TYPES[s])]
    return keys + list(TOP_LEVEL)


def _field_type(cls: type, name: str) -> type:
    hints = typing.get_type_hints(cls)
    return hints[name]


def _key_type(key: str) -> type | None:
    """The type of option ``key`` (``section.name`` or a top-level name); None when there is no such option."""
    if key in TOP_LEVEL:
        return _field_type(Config, key)
    section, _, name = key.partition(".")
    cls = SECTION_TYPES.get(section)
    if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
        return None
    return _field_type(cls, name)


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _convert(key: str, raw: Any, typ: type) -> Any:
    """``raw`` as option ``key``'s type: strings (the command line) are parsed; typed values (a
    --config JSON file, Python callers) must already have the type (an int is taken for a float)."""
    if isinstance(raw, str):
        try:
            if typ is bool:
                return BOOL_WORDS[raw.lower()]
            if typ is int:
                return int(raw)
            if typ is float:
                return float(raw)
        except (KeyError, ValueError):
            raise ConfigError(f"--{key}: expected {typ.__name__}, got {raw!r}") from None
        return raw
    # bool is a subclass of int: true must not pass for 1, nor 1 for true.
    if typ is bool and isinstance(raw, bool):
        return raw
    if typ is int and isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if typ is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    expected = "a string" if typ is str else typ.__name__
    raise ConfigError(f"--{key}: expected {expected}, got {raw!r}")


def unknown_option_message(key: str, where: str = "") -> str:
    """``unknown option --key`` with the nearest valid options (difflib), not all of them."""
    keys = valid_keys()
    section, dot, name = key.partition(".")
    # The right name in another (or no) section first (--batch_size, --train.batch_size), then
    # near spellings.
    close = [k for k in keys if k.rpartition(".")[2] == (name if dot else key)]
    close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.6) if k not in close]
    if close:
        hint = "did you mean " + " or ".join(f"--{k}" for k in close[:3]) + "?"
    elif dot and section in SECTION_TYPES:
        hint = f"the {section}.* options are " + ", ".join(f"--{k}" for k in keys if k.startswith(f"{section}."))
    else:
        top = ", ".join(f"--{k}" for k in (*TOP_LEVEL, "config"))
        hint = f"options are --SECTION.KEY with SECTION one of {', '.join(SECTIONS)}, or {top}"
    return f"{where}unknown option --{key}; {hint} (--help lists every option)"


def build_config(overrides: dict[str, Any] | None = None, preset: str | None = None) -> Config:
    """A validated Config from a preset and ``{"section.key": value}`` overrides (strings are parsed)."""
    preset = preset or "embedded"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    merged = {**PRESETS[preset](), **(overrides or {})}
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    top: dict[str, Any] = {"preset": preset}
    for key, raw in merged.items():
        if key == "preset":
            continue
        typ = _key_type(key)
        if typ is None:
            raise ConfigError(unknown_option_message(key))
        value = _convert(key, raw, typ)
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(f"--{key}: {value!r} contains a NUL character")
        if key in TOP_LEVEL:
            top[key] = value
        else:
            section, _, name = key.partition(".")
            sections[section][name] = value
    cfg = Config(**{s: SECTION_TYPES[s](**v) for s, v in sections.items()}, **top)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it over: give one of them")
    return cfg


def load_config_file(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """The preset and ``{"section.key": value}`` options of a JSON config file: the layout of a run's
    config.json (``{"data": {...}, "gan": {...}, "preset": ..., "out": ...}``); every key it sets
    must be an option. Its ``run`` record (versions, command line) is ignored, and so are
    ``resume`` and ``overwrite`` (see NOT_FROM_FILE)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise ConfigError(f"--config {path}: no such file")
    data = read_json(path, "--config", ConfigError)  # a FIFO, a device or 100,000 nested levels: one line
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of sections, got {type(data).__name__}")
    where = f"{path}: "
    preset = None
    options: dict[str, Any] = {}
    for key, value in data.items():
        if key == "run" or key in NOT_FROM_FILE:
            continue
        if key == "preset":
            if not isinstance(value, str):
                raise ConfigError(f"{where}preset must be a string, got {value!r}")
            preset = value
        elif key in TOP_LEVEL:
            options[key] = _convert_from_file(path, key, value)
        elif key in SECTION_TYPES:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}section {key!r} must be an object of options, got {value!r}")
            for name, item in value.items():
                option = f"{key}.{name}"
                if _key_type(option) is None:
                    raise ConfigError(unknown_option_message(option, where))
                options[option] = _convert_from_file(path, option, item)
        else:
            raise ConfigError(unknown_option_message(key, where))
    return preset, options


def _convert_from_file(path: Path, key: str, value: Any) -> Any:
    try:
        return _convert(key, value, _key_type(key))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None

def help_text(prog: str, preset: str = "embedded") -> str:
    """Every preset and option: ``(default X)`` is the dataclass default; the value ``preset``
    sets follows only where it differs."""
    lines = [
        f"usage: {prog} [--preset NAME] [--config FILE] [--out DIR] [--resume DIR | --overwrite] [--section.key VALUE ...]",
        "",
        "Adversarial learning of label dependency (Tsai & Lee): BCE pretraining of the generator,",
        "then WGAN-GP training against a conditional discriminator.",
        "",
        "Options are --section.key VALUE or --section.key=VALUE; a boolean option alone means true",
        "(--gan.enable is --gan.enable true). Later options override earlier ones, and options",
        "override the --config file, which overrides the preset.",
        "",
        "presets:",
    ]
    for name, fn in PRESETS.items():
        lines.append(f"  {name:<22} {(fn.__doc__ or '').strip().splitlines()[0]}")
    preset_values = PRESETS[preset]() if preset in PRESETS else {}
    lines += [
        "",
        "  --preset NAME     start from a preset (default embedded)",
        "  --config FILE     start from a JSON config (a run's config.json works; its resume and overwrite are not taken)",
        "  --out DIR         run directory (default runs/<preset>); must be empty or absent",
        "  --resume DIR      continue the run in DIR from its last checkpoint (options given override the saved ones)",
        "  --overwrite       start over in a non-empty run directory: its old content is moved to DIR.replaced-<time>",
        "",
        f"options (default; the value of the {preset!r} preset follows where it differs):",
    ]
    for s in SECTIONS:
        cls = SECTION_TYPES[s]
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            key = f"{s}.{f.name}"
            shown = f"default {_show(f.default)}"
            if key in preset_values and preset_values[key] != f.default:
                shown += f"; {preset}: {_show(preset_values[key])}"
            lines.append(f"  --{key} ({shown})")
            if docs.get(f.name):
                lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)

def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal after each field) read from the source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(getattr(node, "value", None), ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = node.value.value.strip()
    return docs


def parse_args(argv: list[str], prog: str = "fastmlgan train") -> Config | None:
    """Parse ``[--preset NAME] [--config FILE] --section.key value ...``; returns None after
    printing --help. A boolean option followed by another option (or nothing) means true."""
    overrides: dict[str, Any] = {}
    preset = None
    config_file = None
    wants_help = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            wants_help = True
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key value (see --help)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):  # no value follows
                typ = str if key == "config" else _key_type(key)
                if typ is None:
                    raise ConfigError(unknown_option_message(key))
                if typ is not bool:
                    raise ConfigError(f"--{key} needs a value")
                value = "true"
            else:
                value = argv[i + 1]
                i += 1
        i += 1
        if key == "preset":
            preset = value
        elif key == "config":
            config_file = value
        else:
            overrides[key] = value
    if wants_help:
        print(help_text(prog, preset if preset in PRESETS else "embedded"))
        return None
    if config_file is not None:
        if overrides.get("resume"):
            raise ConfigError("--config does not go with --resume: a resumed run keeps its own config (give changed options directly)")
        file_preset, file_options = load_config_file(config_file)
        preset = preset or file_preset
        overrides = {**file_options, **overrides}
    return build_config(overrides, preset)
