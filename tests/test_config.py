"""The typed config and its command line."""

from __future__ import annotations

import json

import pytest
from paper_settings import PAPER_SETTING_IDS, PAPER_SETTINGS, check_setting

from fastmlgan.config import PRESETS, Config, build_config, config_from_dict, help_text, parse_args
from fastmlgan.errors import ConfigError


@pytest.mark.parametrize("option, quote, parse", PAPER_SETTINGS, ids=PAPER_SETTING_IDS)
def test_paper_defaults(option, quote, parse):
    # The dataclass defaults are §4.1's values: each checked against a sentence quoted from the paper.
    section, name = option.split(".")
    check_setting(option, quote, parse, getattr(getattr(Config(), section), name))


def test_overrides_are_typed_and_validated():
    cfg = parse_args(["--preset", "smoke", "--gan.gp_weight", "5", "--gan.conditional=false", "--gan.negative_sampling", "no", "--train.seed", "3"])
    assert cfg.gan.gp_weight == 5.0 and cfg.gan.conditional is False and cfg.train.seed == 3
    assert cfg.preset == "smoke" and cfg.data.image_size == PRESETS["smoke"]()["data.image_size"]
    with pytest.raises(ConfigError, match="--train.seed: expected int"):
        parse_args(["--train.seed", "x"])
    with pytest.raises(ConfigError, match="--gan.conditional: expected bool"):
        parse_args(["--gan.conditional", "maybe"])


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        parse_args(["--gan.gp_wieght", "5"])
    msg = str(e.value)
    assert "--gan.gp_wieght" in msg and "gan.gp_weight" in msg and "data.batch_size" in msg


def test_unknown_preset_and_choices():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*smoke"):
        parse_args(["--preset", "nope"])
    with pytest.raises(ConfigError, match="--model.backbone: 'resnet7' is not one of"):
        parse_args(["--model.backbone", "resnet7"])
    with pytest.raises(ConfigError, match="--data.on_bad_image"):
        parse_args(["--data.on_bad_image", "ignore"])
    with pytest.raises(ConfigError, match="--data.batch_size must be > 0"):
        parse_args(["--data.batch_size", "0"])


def test_round_trip_through_json():
    cfg = build_config({"gan.negative_sampling": "false", "optim.d_lr": "3e-4"}, preset="smoke")
    again = config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_help_lists_presets_and_options(capsys):
    assert parse_args(["--help"]) is None
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "--gan.gp_weight" in out and "lambda in eq. (4)" in out
    assert help_text("x").startswith("usage: x")


def test_unconditional_discriminator_needs_no_negative_sampling():
    # §4.2.3: Table 3 (d) is (c) with an unconditional D.
    with pytest.raises(ConfigError, match="--gan.negative_sampling false"):
        parse_args(["--gan.conditional", "false"])
    cfg = parse_args(["--gan.conditional", "false", "--gan.negative_sampling", "false"])
    assert not cfg.gan.conditional and not cfg.gan.negative_sampling


def test_compile_needs_the_explicit_penalty():
    with pytest.raises(ConfigError, match="--gan.penalty explicit"):
        parse_args(["--compile.enable", "true", "--gan.penalty", "autograd"])


def test_batch_size_must_divide_by_the_world_size():
    import torch

    from fastmlgan.distributed import DistInfo
    from fastmlgan.loaders.registry import per_rank_batch

    info = DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    assert per_rank_batch(33, info, "data.batch_size") == 11
    with pytest.raises(ConfigError, match="--data.batch_size 32 is not divisible by the world size 3"):
        per_rank_batch(32, info, "data.batch_size")
