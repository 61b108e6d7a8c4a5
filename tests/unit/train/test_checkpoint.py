"""Checkpoints: integrity record and fallback, keep-K, finiteness, leftovers, full or read-only
disks, resume compatibility, and checkpoints that lack a key."""

from __future__ import annotations

import errno
import logging
import os
import random
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmlgan.config import build_config, config_from_dict
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.train import checkpoint as ckpt
from fastmlgan.train.checkpoint import CheckpointError, NonFiniteStateError


def make_state(step: int, size: int = 64) -> dict:
    """A stand-in trainer state with every required key; values depend on ``step``."""
    g = torch.Generator().manual_seed(step)
    state = {key: None for key in ckpt.RESUME_KEYS}
    weight = torch.randn(size, generator=g)
    state.update(
        config=build_config(preset="smoke").to_dict(),
        class_names=["a", "b"],
        phase="bce",
        epoch=step // 10,
        global_step=step,
        generator={"fc.weight": weight, "fc.bias": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(step)},
        discriminator={"w": torch.ones(3, 3) * step},
        opt_g={"state": {0: {"step": torch.tensor(float(step)), "exp_avg": weight * 0.1}}, "param_groups": []},
        opt_d={"state": {}, "param_groups": []},
        rng=ckpt.rng_state(),
    )
    return state


def flip_bit(path: Path, pos: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_round_trip_and_record(tmp_path):
    path = ckpt.save_checkpoint(make_state(7), tmp_path, step=7, keep=2)
    assert path == tmp_path / "checkpoints" / "step-000000007.pt"
    last = tmp_path / "checkpoints" / "last.pt"
    assert last.read_bytes() == path.read_bytes()
    # torch and zipfile read it; the record is the zip comment, the CRC of everything before it.
    assert zipfile.ZipFile(last).testzip() is None
    comment = zipfile.ZipFile(last).comment
    assert comment.startswith(b"fastmlgan-crc32 ") and len(comment) == 24
    data = last.read_bytes()
    # As bytes: eight lowercase hex digits (a parse with int(..., 16) would also take 'A' for 'a').
    assert comment[-8:] == b"%08x" % zlib.crc32(data[: -len(comment) - 2])
    state, used, skipped = ckpt.load_latest_good(tmp_path)
    assert used == last and skipped == []
    assert torch.equal(state["generator"]["fc.weight"], make_state(7)["generator"]["fc.weight"])
    assert torch.load(last, weights_only=True)["global_step"] == 7  # plain torch.load still works


def test_every_single_bit_flip_is_detected(tmp_path):
    """Every byte of a small checkpoint, one bit each: the zip CRCs alone miss about a third
    (headers, padding, the central directory); the whole-file record catches all of them."""
    good = tmp_path / "good.pt"
    ckpt.save_atomic({"w": torch.arange(20.0), "config": {"a": 1}}, good)
    data = good.read_bytes()
    undetected = []
    fd = os.open(good, os.O_RDWR)
    try:
        for pos in range(len(data)):
            os.pwrite(fd, bytes([data[pos] ^ (1 << (pos % 8))]), pos)  # flipped in place, then restored
            try:
                ckpt.verify(good)
                undetected.append(pos)
            except CheckpointError:
                pass
            os.pwrite(fd, data[pos : pos + 1], pos)
    finally:
        os.close(fd)
    assert undetected == [], f"{len(undetected)} of {len(data)} flips undetected, first at byte {undetected[:5]}"
    ckpt.verify(good)


HEX_DIGITS = b"0123456789abcdefABCDEF"


def test_a_record_digit_changed_to_any_other_hex_digit_is_detected(tmp_path):
    """Each of the record's eight digits replaced by every other hex digit, one at a time: all
    valid hex, so only a comparison of the digits themselves sees them, and an uppercase copy of a
    lowercase letter has the same value, so a comparison of parsed values would take it."""
    # A record holding a letter (probability 1 - (10/16)^8 per file): the case flip needs one.
    for n in range(1, 40):
        good = tmp_path / f"good{n}.pt"
        ckpt.save_atomic({"w": torch.arange(float(n)), "config": {"a": n}}, good)
        digits = good.read_bytes()[-8:]
        if any(c in b"abcdef" for c in digits):
            break
    else:
        raise AssertionError("no record with a letter among 39 files")
    data = good.read_bytes()
    assert data[-24:-8] == b"fastmlgan-crc32 " and digits == b"%08x" % zlib.crc32(data[:-26])
    ckpt.verify(good)
    changed = 0
    for k in range(8):
        pos = len(data) - 8 + k
        for digit in HEX_DIGITS:
            if digit == data[pos]:
                continue
            edited = tmp_path / "edited.pt"
            edited.write_bytes(data[:pos] + bytes([digit]) + data[pos + 1 :])
            with pytest.raises(CheckpointError, match="CRC-32 mismatch"):
                ckpt.verify(edited)
            changed += 1
    assert changed == 8 * (len(HEX_DIGITS) - 1)


def _draws() -> dict:
    """A few values from every stream rng_state covers."""
    out = {
        "python": [random.random() for _ in range(3)] + [random.gauss(0.0, 1.0)],
        "numpy": np.random.rand(3).tolist(),
        "torch": torch.rand(3).tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.rand(3, device="cuda").tolist()
    return out


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    """rng_state() saved in a checkpoint, every stream disturbed, set_rng_state() of the loaded
    state: the next draws are those that followed the capture (python random, with the cached
    second Gaussian of random.gauss; numpy's global stream; torch CPU; CUDA where present)."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0.0, 1.0)  # leaves a cached second value (the state's python_pos)
    np.random.rand(5)
    torch.rand(5)
    state = make_state(4)  # rng=ckpt.rng_state() here
    expected = _draws()
    ckpt.save_checkpoint(state, tmp_path, step=4, keep=2)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)  # also reseeds CUDA
    disturbed = _draws()
    assert all(disturbed[k] != expected[k] for k in expected)
    loaded = ckpt.load(tmp_path)
    ckpt.set_rng_state(loaded["rng"])
    assert _draws() == expected
    # Restoring twice gives the same draws again (the state is a copy, not consumed).
    ckpt.set_rng_state(loaded["rng"])
    assert _draws() == expected


def test_flipped_bit_in_last_falls_back_to_the_previous_good_checkpoint(tmp_path, caplog):
    for step in (10, 20, 30):
        ckpt.save_checkpoint(make_state(step, size=50_000), tmp_path, step=step, keep=3)
    last = tmp_path / "checkpoints" / "last.pt"
    flip_bit(last, last.stat().st_size // 2)  # tensor data: a hard link also corrupts step 30
    with caplog.at_level(logging.WARNING, logger="fastmlgan.train.checkpoint"):
        state, used, skipped = ckpt.load_latest_good(tmp_path / "checkpoints" / "last.pt")
    assert used.name == "step-000000020.pt" and state["global_step"] == 20
    assert [p.name for p, _ in skipped] == ["last.pt"]
    assert "CRC-32 mismatch" in skipped[0][1] and "step-000000030.pt" in skipped[0][1]
    assert "skipped checkpoint" in caplog.text and "last.pt" in caplog.text and "step-000000020.pt" in caplog.text
    assert ckpt.load(tmp_path)["global_step"] == 20


def test_fallback_with_copies_instead_of_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    for step in (1, 2):
        ckpt.save_checkpoint(make_state(step), tmp_path, step=step, keep=2)
    last = tmp_path / "checkpoints" / "last.pt"
    step2 = tmp_path / "checkpoints" / "step-000000002.pt"
    assert not os.path.samefile(last, step2) and last.read_bytes() == step2.read_bytes()
    last.write_bytes(last.read_bytes()[:-100])  # torn copy
    state, used, skipped = ckpt.load_latest_good(tmp_path)
    assert used == step2 and state["global_step"] == 2 and "zip end record" in skipped[0][1]


def test_explicit_file_is_not_replaced_and_no_good_file_is_one_line(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(make_state(step), tmp_path, step=step, keep=2)
    one = tmp_path / "checkpoints" / "step-000000001.pt"
    flip_bit(one, one.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="step-000000001.pt: CRC-32 mismatch"):
        ckpt.load_latest_good(one)
    flip_bit(tmp_path / "checkpoints" / "last.pt", 40)
    with pytest.raises(CheckpointError) as info:
        ckpt.load(tmp_path)
    message = str(info.value)
    assert "no good checkpoint in" in message and "\n" not in message
    assert "last.pt" in message and "step-000000001.pt" in message
    with pytest.raises(CheckpointError, match="checkpoint nowhere not found"):
        ckpt.load("nowhere")


@pytest.mark.parametrize("drop", ["config", "generator", "class_names", "rng", "opt_d"])
def test_missing_key_is_a_one_line_error_naming_file_and_key(tmp_path, drop):
    state = make_state(3)
    del state[drop]
    folder = tmp_path / "checkpoints"
    ckpt.save_atomic(state, folder / "last.pt")
    with pytest.raises(CheckpointError) as info:
        ckpt.load(tmp_path, ckpt.RESUME_KEYS)  # what a resume reads
    assert f"no {drop!r} key" in str(info.value) and "last.pt" in str(info.value)
    if drop in ckpt.REQUIRED_KEYS:  # what evaluate/predict read
        with pytest.raises(CheckpointError, match=f"no {drop!r} key"):
            ckpt.load(tmp_path)
    else:
        assert ckpt.load(tmp_path)["global_step"] == 3
    # A plain torch file (no record) and a file that is no dict either.
    torch.save([1, 2], folder / "last.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        ckpt.load(tmp_path)


def test_resume_without_config_key_through_the_cli(tmp_path, capsys):
    from fastmlgan.commands.train import main

    state = make_state(3)
    del state["config"]
    ckpt.save_atomic(state, tmp_path / "run" / "checkpoints" / "last.pt")
    assert main(["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'config'" in err and "last.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_keep_k_and_an_abandoned_continuation(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in range(1, 6):
        ckpt.save_checkpoint(make_state(step), tmp_path, step=step, keep=2)
    assert sorted(os.listdir(folder)) == ["last.pt", "step-000000004.pt", "step-000000005.pt"]
    assert os.path.samefile(folder / "last.pt", folder / "step-000000005.pt")
    ckpt.save_checkpoint(make_state(5), tmp_path, step=5, keep=2)  # the same step again (a phase switch)
    assert sorted(os.listdir(folder)) == ["last.pt", "step-000000004.pt", "step-000000005.pt"]
    # Resumed from step 4 and saved at 4.5 -> "step 6" in the old numbering: 5 is abandoned.
    ckpt.save_checkpoint(make_state(40), tmp_path, step=4, keep=2)
    assert sorted(os.listdir(folder)) == ["last.pt", "step-000000004.pt"]
    assert ckpt.load(tmp_path)["global_step"] == 40
    with pytest.raises(ConfigError, match="--checkpoint.keep 0"):
        ckpt.save_checkpoint(make_state(1), tmp_path, step=1, keep=0)


@pytest.mark.parametrize(
    "where, name",
    [
        (lambda s: s["opt_g"]["state"][0]["exp_avg"], "opt_g/state/0/exp_avg"),
        (lambda s: s["generator"]["fc.weight"], "generator/fc.weight"),
        (lambda s: s["discriminator"]["w"], "discriminator/w"),
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_state_is_never_saved(tmp_path, where, name, value):
    ckpt.save_checkpoint(make_state(1), tmp_path, step=1, keep=2)
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()
    state = make_state(2)
    where(state).view(-1)[5] = value
    with pytest.raises(NonFiniteStateError) as info:
        ckpt.save_checkpoint(state, tmp_path, step=2, keep=2)
    assert info.value.tensor == name
    message = str(info.value)
    assert f"{name} has 1 non-finite values" in message and "index 5" in message and str(last) in message
    assert last.read_bytes() == before and not (tmp_path / "checkpoints" / "step-000000002.pt").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["last.pt", "step-000000001.pt"]


def test_finite_check_reports_the_first_bad_tensor_and_ignores_integers():
    state = {"a": torch.tensor([1.0, 1e38]) * 4, "b": {"c": torch.tensor([float("nan")])}}
    with pytest.raises(NonFiniteStateError) as info:
        ckpt.assert_finite_state(state)
    assert info.value.tensor == "a"  # 4e38 overflows float32 to inf
    ckpt.assert_finite_state({"n": torch.tensor([2**62]), "h": torch.tensor([6e4], dtype=torch.float16), "x": 1.0})
    ckpt.assert_finite_state({"metrics": {"mAP": float("nan")}})  # plain floats are not weights


def test_leftover_temporary_files_are_removed_at_save_and_resume(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    old = [folder / ".last.pt.k2j4x_q1.tmp", folder / ".step-000000003.pt.abcdefgh.tmp"]
    keep = [folder / ".notes.tmp", folder / "last.pt.tmp", folder / "mine.txt"]
    # "Earlier process" means older than this process's start (the test process may be minutes old).
    earlier = ckpt._PROCESS_START - 3600
    for path in old + keep:
        path.write_bytes(b"torn")
        os.utime(path, (earlier, earlier))
    fresh = folder / ".last.pt.zzzzzzzz.tmp"  # newer than this process: a live writer's
    fresh.write_bytes(b"in progress")
    ckpt.save_checkpoint(make_state(1), tmp_path, step=1, keep=2)
    assert not any(p.exists() for p in old) and all(p.exists() for p in keep) and fresh.exists()
    again = folder / ".last.pt.00000000.tmp"
    again.write_bytes(b"torn")
    os.utime(again, (ckpt._PROCESS_START - 60, ckpt._PROCESS_START - 60))
    ckpt.load_latest_good(tmp_path)
    assert not again.exists()


def _tmp_fd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp")
    except OSError:
        return False


def test_disk_full_names_folder_and_bytes_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(make_state(1, size=100_000), tmp_path, step=1, keep=2)
    folder = tmp_path / "checkpoints"
    before = (folder / "last.pt").read_bytes()
    real_write = os.write

    def full_disk(fd, data):
        if _tmp_fd(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(CheckpointError) as info:
        ckpt.save_checkpoint(make_state(2, size=100_000), tmp_path, step=2, keep=2)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and "no space left in" in message and str(folder) in message
    needed = int(message.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    size = len(before)
    assert size <= needed <= size + 200_000, (needed, size)  # 400 KB of tensors, an estimate above it
    assert f"{folder / 'last.pt'} (untouched)" in message
    assert (folder / "last.pt").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["last.pt", "step-000000001.pt"]  # no temporary file left


def test_read_only_folder_is_a_one_line_error(tmp_path, monkeypatch):
    ckpt.save_checkpoint(make_state(1), tmp_path, step=1, keep=2)
    folder = tmp_path / "checkpoints"
    before = (folder / "last.pt").read_bytes()
    os.chmod(folder, 0o555)
    try:
        if os.access(folder, os.W_OK):  # root ignores the mode: make the file system say it instead
            real_open = os.open

            def read_only(path, flags, *args, **kwargs):
                if Path(os.fsdecode(path)).parent == folder and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    raise OSError(errno.EROFS, "Read-only file system", str(path))
                return real_open(path, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", read_only)
        with pytest.raises(CheckpointError) as info:
            ckpt.save_checkpoint(make_state(2), tmp_path, step=2, keep=2)
    finally:
        monkeypatch.undo()
        os.chmod(folder, 0o755)
    message = str(info.value)
    assert "\n" not in message and f"in {folder}" in message and "bytes needed" in message
    assert (folder / "last.pt").read_bytes() == before


# ----------------------------------------------------------------------------------------------
# resume compatibility


def test_every_shape_or_data_option_change_is_refused():
    saved = build_config(preset="smoke")
    for key in ckpt.SHAPE_AND_DATA_OPTIONS:
        section, _, name = key.partition(".")
        old = getattr(getattr(saved, section), name)
        choices = {"model.backbone": "resnet18", "data.dataset": "coco", "data.nuswide_split": "official"}
        new_value = choices.get(key, (not old) if isinstance(old, bool) else (old + 1 if isinstance(old, int) else (
            round(old * 0.5, 3) or 0.5 if isinstance(old, float) else f"{old}x")))
        d = saved.to_dict()
        d[section][name] = new_value
        if key == "gan.conditional":
            d["gan"]["negative_sampling"] = False  # an unconditional D needs it (Table 3 (d))
        with pytest.raises(ConfigError) as info:
            ckpt.check_resume_compatible(saved, config_from_dict(d))
        message = str(info.value)
        assert message.startswith(f"--{key} {new_value!r}:") and repr(old) in message and "--out" in message, key


def test_other_changes_and_equivalent_paths_are_allowed(tmp_path):
    saved = build_config({"data.root": str(tmp_path / "data")}, preset="smoke")
    same = build_config(
        {"data.root": str(tmp_path / "." / "data"), "train.gan_epochs": "5", "optim.g_lr": "3e-4", "train.seed": "4"},
        preset="smoke",
    )
    ckpt.check_resume_compatible(saved, same)


def test_resume_that_changes_the_width_fails_before_writing(tmp_path, capsys):
    from fastmlgan.commands.train import main

    run = tmp_path / "run"
    ckpt.save_checkpoint(make_state(3), run, step=3, keep=2)
    (run / "config.json").write_text("{}")
    assert main(["--resume", str(run), "--model.width", "16"]) == 2
    err = capsys.readouterr().err
    assert "--model.width 16" in err and "with 8" in err and "Traceback" not in err
    assert (run / "config.json").read_text() == "{}"  # not rewritten


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_finite_check_and_save_on_the_gpu(tmp_path):
    state = make_state(1)
    state["generator"] = {k: v.cuda() for k, v in state["generator"].items()}
    ckpt.save_checkpoint(state, tmp_path, step=1, keep=1)
    assert torch.equal(ckpt.load(tmp_path)["generator"]["fc.weight"], state["generator"]["fc.weight"].cpu())
    state["generator"]["fc.bias"][1] = float("nan")
    with pytest.raises(NonFiniteStateError, match="generator/fc.bias"):
        ckpt.save_checkpoint(state, tmp_path, step=2, keep=1)


def test_errors_are_fastmlgan_errors():
    # train.main prints FastMLGANError messages as one line (exit 2) instead of a traceback.
    assert issubclass(CheckpointError, FastMLGANError) and issubclass(NonFiniteStateError, CheckpointError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_check_finds_one_bad_element_anywhere(dtype):
    # One reduction (min and max) per tensor: it must see an element in every position, including
    # the vectorised loop's tail and non-contiguous views.
    for n in (1, 7, 33, 1000, 4099):
        for pos in sorted({0, n // 2, n - 1}):
            for value in (float("nan"), float("inf"), -float("inf")):
                t = torch.randn(n, dtype=torch.float64).to(dtype)
                t[pos] = value
                with pytest.raises(NonFiniteStateError):
                    ckpt.assert_finite_state({"t": t})
        t = torch.randn(n, 3).to(dtype).t()
        t[1, n - 1] = float("nan")
        with pytest.raises(NonFiniteStateError):
            ckpt.assert_finite_state({"t": t})
    ckpt.assert_finite_state({"t": torch.full((5,), 1e300, dtype=torch.float64), "e": torch.empty(0)})
