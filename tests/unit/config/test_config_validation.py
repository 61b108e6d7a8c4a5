"""Every number in the config is validated: NaN, inf and out-of-range values are a one-line
ConfigError naming the option, from Python and from the command line. A numeric field added
without validation fails ``test_every_numeric_field_rejects_nan_inf_and_negatives``."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from fastmlgan import config as config_module
from fastmlgan.config import PRESETS, Config, build_config, parse_args
from fastmlgan.errors import ConfigError

SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(
    typing.get_type_hints(Config)[f.name])}

# Numeric fields for which a value below has a meaning by design: (field, value) -> why.
# (None at present: every count, seed, rate and weight of the kit is non-negative.)
VALID_BY_DESIGN: dict[tuple[str, float], str] = {}


def numeric_fields() -> list[tuple[str, type, dataclasses.Field]]:
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                out.append((section, cls, f))
    return out


def test_the_enumeration_sees_every_section_and_the_new_fields():
    keys = {f"{s}.{f.name}" for s, _, f in numeric_fields()}
    assert set(SECTIONS) == set(config_module.SECTIONS)
    assert {"optim.d_lr", "optim.beta1", "train.seed", "gan.gp_weight", "data.dali_hw_decoder_load"} <= keys
    assert {"checkpoint.keep", "checkpoint.every_steps", "checkpoint.every_minutes", "train.loss_explosion_ratio"} <= keys
    assert len(keys) >= 35


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1, -1.0, -1e-9])
@pytest.mark.parametrize("section, cls, f", numeric_fields(), ids=lambda x: getattr(x, "name", None) or "")
def test_every_numeric_field_rejects_nan_inf_and_negatives(section, cls, f, bad):
    key = f"{section}.{f.name}"
    if (key, bad) in VALID_BY_DESIGN:
        cls(**{f.name: bad})
        return
    with pytest.raises(ConfigError) as info:
        cls(**{f.name: bad})
    message = str(info.value)
    assert message.startswith(f"--{key} ") and "\n" not in message, message


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "-1", "1e999"])
@pytest.mark.parametrize("section, cls, f", numeric_fields(), ids=lambda x: getattr(x, "name", None) or "")
def test_every_numeric_option_from_the_command_line(section, cls, f, bad):
    key = f"{section}.{f.name}"
    with pytest.raises(ConfigError) as info:
        parse_args([f"--{key}", bad])
    message = str(info.value)
    assert f"--{key}" in message and "\n" not in message, message


@pytest.mark.parametrize(
    "section, cls, f",
    [(s, c, f) for s, c, f in numeric_fields() if typing.get_type_hints(c)[f.name] is int],
    ids=lambda x: getattr(x, "name", None) or "",
)
def test_integer_fields_refuse_fractions_and_bools(section, cls, f):
    for bad in (1.5, 2.0, True):
        with pytest.raises(ConfigError, match=f"--{section}.{f.name} "):
            cls(**{f.name: bad})


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--optim.d_lr", "nan"], "--optim.d_lr must be a finite number in (0, 1e+10], got nan"),
        (["--optim.bce_lr", "inf"], "--optim.bce_lr must be a finite number in (0, 1e+10], got inf"),
        (["--optim.beta1", "1.5"], "--optim.beta1 must be a finite number in [0, 1), got 1.5"),
        (["--optim.beta2", "1"], "--optim.beta2 must be a finite number in [0, 1), got 1.0"),
        (["--optim.weight_decay", "-1"], "--optim.weight_decay must be a finite number >= 0, got -1.0"),
        (["--train.seed", "-1"], "--train.seed must be an integer in [0, 4294967295], got -1"),
        (["--train.seed", "4294967296"], "--train.seed must be an integer in [0, 4294967295]"),
        (["--train.max_steps_per_epoch", "-1"], "--train.max_steps_per_epoch must be an integer >= 0, got -1"),
        (["--gan.gp_weight", "-10"], "--gan.gp_weight must be a finite number >= 0, got -10.0"),
        (["--gan.inv_temperature", "nan"], "--gan.inv_temperature must be a finite number > 0, got nan"),
        (["--gan.negative_slope", "1.5"], "--gan.negative_slope must be a finite number in [0, 1]"),
        (["--data.dali_hw_decoder_load", "1.5"], "--data.dali_hw_decoder_load must be a finite number in [0, 1]"),
        (["--data.embedded_image_size", "8"], "--data.embedded_image_size must be an integer in [16, 4096], got 8"),
        (["--train.loss_explosion_ratio", "0.5"], "--train.loss_explosion_ratio must be 0 (off) or a finite number > 1"),
        (["--checkpoint.keep", "0"], "--checkpoint.keep must be > 0, got 0"),
        (["--checkpoint.every_minutes", "nan"], "--checkpoint.every_minutes must be a finite number >= 0, got nan"),
        (["--dist.timeout_s", "0"], "--dist.timeout_s must be an integer in [1, 2147483647], got 0"),
        (["--train.seed", "nan"], "--train.seed: expected int, got 'nan'"),
    ],
)
def test_the_issue_cases_name_the_option(args, fragment):
    with pytest.raises(ConfigError) as info:
        parse_args(args)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.beta1", "0"), ("optim.beta2", "0.999"), ("optim.weight_decay", "0"), ("gan.gp_weight", "0"),
        ("gan.bce_weight", "0"), ("gan.negative_slope", "0"), ("gan.negative_slope", "1"), ("train.seed", "0"),
        ("train.seed", "4294967295"), ("train.max_steps_per_epoch", "0"), ("train.loss_explosion_ratio", "0"),
        ("train.loss_explosion_ratio", "1.5"), ("checkpoint.every_minutes", "0"), ("checkpoint.every_minutes", "0.5"),
        ("checkpoint.every_steps", "0"), ("checkpoint.keep", "1"), ("data.dali_hw_decoder_load", "0"),
        ("data.dali_hw_decoder_load", "1"), ("data.num_workers", "0"), ("train.bce_epochs", "0"),
        ("optim.g_lr", "1e-12"), ("data.embedded_image_size", "16"),
    ],
)
def test_boundary_values_are_accepted(key, value):
    cfg = parse_args([f"--{key}", value])
    section, _, name = key.partition(".")
    assert getattr(getattr(cfg, section), name) == float(value)


def test_every_preset_still_builds():
    for name in PRESETS:
        build_config(preset=name)


def test_a_bad_number_stops_the_cli_before_anything_is_written(tmp_path, capsys):
    from fastmlgan.commands.train import main

    out = tmp_path / "run"
    assert main(["--optim.d_lr", "nan", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --optim.d_lr must be a finite number in (0, 1e+10], got nan"
    assert not out.exists()
