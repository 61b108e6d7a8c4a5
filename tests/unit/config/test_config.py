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


def test_unknown_option_suggests_the_nearest_valid_ones():
    # Issue 10: the nearest options (difflib), not all 69 of them.
    with pytest.raises(ConfigError) as e:
        parse_args(["--gan.gp_wieght", "5"])
    msg = str(e.value)
    assert "--gan.gp_wieght" in msg and "did you mean --gan.gp_weight" in msg and "data.batch_size" not in msg


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

    from fastmlgan.data.factory import per_rank_batch
    from fastmlgan.distributed import DistInfo

    info = DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    assert per_rank_batch(33, info, "data.batch_size") == 11
    with pytest.raises(ConfigError, match="--data.batch_size 32 is not divisible by the world size 3"):
        per_rank_batch(32, info, "data.batch_size")


# ---------------------------------------------------------------- issue 10: the command line


def test_bare_boolean_flag_means_true_and_does_not_swallow_the_next_option():
    cfg = parse_args(["--gan.enable", "--out", "X", "--compile.enable", "--log.tensorboard"])
    assert cfg.gan.enable is True and cfg.out == "X" and cfg.compile.enable is True and cfg.log.tensorboard is True
    cfg = parse_args(["--preset", "smoke", "--gan.enable", "false", "--out", "X", "--gan.gumbel"])
    assert cfg.gan.enable is False and cfg.out == "X" and cfg.gan.gumbel is True
    assert parse_args(["--overwrite"]).overwrite is True
    # A bare non-boolean option still needs its value.
    with pytest.raises(ConfigError, match="--train.seed needs a value"):
        parse_args(["--train.seed", "--out", "X"])
    with pytest.raises(ConfigError, match="--out needs a value"):
        parse_args(["--out"])


@pytest.mark.parametrize(
    "argv, suggested",
    [
        (["--data.batchsize", "3"], "--data.batch_size"),
        (["--batch_size", "3"], "--data.batch_size"),  # the right name without its section
        (["--train.bce_weight", "3"], "--gan.bce_weight"),  # in another section
        (["--log.tensorbord"], "--log.tensorboard"),
    ],
)
def test_unknown_option_suggestions(argv, suggested):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    msg = str(e.value)
    assert f"unknown option {argv[0]}" in msg and suggested in msg
    assert msg.count("--") <= 6  # a few suggestions, never the whole list


def test_unknown_option_without_a_near_one_lists_its_section_only():
    with pytest.raises(ConfigError) as e:
        parse_args(["--gan.zzz", "1"])
    msg = str(e.value)
    assert "--gan.gp_weight" in msg and "--data." not in msg


def test_help_shows_each_default_once_and_the_preset_value_where_it_differs(capsys):
    text = help_text("x")
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  --") and "(default" in line}
    assert lines["--data.batch_size"].strip() == "--data.batch_size (default 32)"  # embedded: also 32
    assert lines["--data.image_size"].strip() == "--data.image_size (default 224; embedded: 40)"
    assert lines["--gan.enable"].strip() == "--gan.enable (default true)"
    assert "[" not in "".join(lines.values())
    # --preset before --help: that preset's values.
    assert parse_args(["--preset", "smoke", "--help"]) is None
    out = capsys.readouterr().out
    assert "--data.batch_size (default 32; smoke: 16)" in out and "--log.tensorboard (default false)" in out


def test_config_file_round_trip_and_later_options_win(tmp_path):
    cfg = build_config({"gan.gp_weight": "3", "train.seed": "7", "log.tensorboard": "true"}, preset="smoke")
    # A run's config.json: the config plus a "run" record, which --config ignores.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg.to_dict(), "run": {"command": "x", "world_size": 2}}))
    again = parse_args(["--config", str(path)])
    assert again == cfg
    later = parse_args(["--config", str(path), "--gan.gp_weight", "4", "--out", "elsewhere"])
    assert later.gan.gp_weight == 4.0 and later.out == "elsewhere" and later.train.seed == 7
    # An option before --config still wins: options override the file wherever they stand.
    assert parse_args(["--train.seed", "9", "--config", str(path)]).train.seed == 9
    # The file's preset is the base for keys it does not set.
    path.write_text(json.dumps({"preset": "smoke", "gan": {"gp_weight": 2}}))
    partial = parse_args(["--config", str(path)])
    assert partial.preset == "smoke" and partial.data.batch_size == 16 and partial.gan.gp_weight == 2.0


def test_config_file_never_resumes_or_overwrites(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**build_config(preset="smoke").to_dict(), "resume": "runs/a", "overwrite": True}))
    cfg = parse_args(["--config", str(path)])
    assert cfg.resume == "" and cfg.overwrite is False
    with pytest.raises(ConfigError, match="--config does not go with --resume"):
        parse_args(["--config", str(path), "--resume", "runs/a"])


@pytest.mark.parametrize(
    "content, message",
    [
        ({"gan": {"gp_wieght": 1}}, "unknown option --gan.gp_wieght; did you mean --gan.gp_weight"),
        ({"gam": {"gp_weight": 1}}, "unknown option --gam"),
        ({"data": {"batch_size": 3.5}}, "--data.batch_size: expected int, got 3.5"),
        ({"gan": {"enable": 1}}, "--gan.enable: expected bool, got 1"),
        ({"data": {"root": 5}}, "--data.root: expected a string"),
        ({"gan": 3}, "section 'gan' must be an object"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_config_file_errors_name_the_file_and_the_key(tmp_path, content, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(path)])
    assert message in str(e.value) and "mine.json" in str(e.value)


def test_config_file_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--config", str(tmp_path / "absent.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.json: not JSON \(line 1"):
        parse_args(["--config", str(bad)])


def test_typed_values_are_checked_not_passed_through():
    # Python callers and --config files give typed values; a wrong type is an error naming the option.
    assert build_config({"optim.g_lr": 1}).optim.g_lr == 1.0  # an int where a float goes is fine
    with pytest.raises(ConfigError, match="--train.seed: expected int, got True"):
        build_config({"train.seed": True})
