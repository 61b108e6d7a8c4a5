"""Issue 18, items 1-9: the training side of "nothing lost, nothing silent". Each test reproduces
the fault as the issue found it (a full tmpfs, ``ulimit -f``, two runs at once, an edited or
truncated cache, a signal outside the training loop, a kill while ``baseline.pt`` is written, the
run folder removed or made read-only, a phase-2 batch that does not fit, ``check`` on data that
cannot train) and fails on the code before the fix."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safety_helpers import (
    env,
    error_line,
    make_read_only,
    run_cli,
    run_python,
    small_tmpfs,
    smoke_args,
    undo_read_only,
)
from trained_model import restored_logging

from fastmlgan.config import DataConfig, build_config, config_from_dict
from fastmlgan.errors import ConfigError
from fastmlgan.safeio import RunInUse, RunLock
from fastmlgan.train import checkpoint as ckpt
from fastmlgan.train.runlog import RunLog


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    """The smoke preset's embedded set (256 + 64 images at 40 px), written once."""
    from fastmlgan.data.sources import embedded

    root = tmp_path_factory.mktemp("smoke-data") / "data"
    embedded.ensure(root, num_train=256, num_val=64, image_size=40, seed=0)
    return root


def train_in_process(argv: list[str]) -> int:
    from fastmlgan.commands import train

    with restored_logging():
        return train.main(argv)


# ----------------------------------------------------------------------------------------------
# 1. disk full through torch's zip writer


def test_disk_full_through_torchs_zip_writer_is_one_line(tmp_path):
    """torch.save turns the ENOSPC of our writer into RuntimeError("unexpected pos"): it must come
    out as the one-line CheckpointError naming the folder and the bytes, the old file untouched."""
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        ckpt.save_atomic({"w": torch.zeros(1000)}, disk / "last.pt")
        before = (disk / "last.pt").read_bytes()
        with pytest.raises(ckpt.CheckpointError) as info:
            ckpt.save_atomic({"w": torch.randn(200_000)}, disk / "last.pt")  # 800 KB
        message = str(info.value)
        assert message.startswith(f"no space left in {disk} to write last.pt: it needs about 866,")
        assert "bytes free" in message and "\n" not in message
        assert (disk / "last.pt").read_bytes() == before and sorted(p.name for p in disk.iterdir()) == ["last.pt"]


def test_the_file_size_limit_is_one_line(tmp_path):
    """``ulimit -f``: the same zip-writer path with EFBIG (Python ignores SIGXFSZ)."""
    code = (
        "import resource, torch\nfrom fastmlgan.train import checkpoint as ckpt\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        f"try:\n    ckpt.save_atomic({{'w': torch.randn(200_000)}}, {str(tmp_path / 'x.pt')!r})\n"
        "except ckpt.CheckpointError as e:\n    print('ONE LINE:', e)\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ONE LINE: cannot write x.pt in" in done.stdout and "file size limit" in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary left behind


@pytest.mark.faults
def test_training_onto_a_full_disk_ends_with_one_line(tmp_path, smoke_data):
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        done = run_cli(["train", *smoke_args(disk / "run", smoke_data)])
        assert done.returncode == 2
        assert "space left" in error_line(done.stderr).lower()


# ----------------------------------------------------------------------------------------------
# 2. two runs on one --out


def test_the_run_lock_names_the_running_process(tmp_path):
    first = RunLock(tmp_path / "sub" / "run").acquire()
    try:
        with pytest.raises(RunInUse) as info:
            RunLock(tmp_path / "sub" / "run").acquire()
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(info.value)
        assert "--out " in str(info.value) and "\n" not in str(info.value)
    finally:
        first.release()
    RunLock(tmp_path / "sub" / "run").acquire().release()  # free again
    assert list(tmp_path.iterdir()) == []  # the lock file and the folder made for it are gone


def test_two_runs_started_together_on_one_out(tmp_path, smoke_data):
    """Before: both exited 0 and metrics.jsonl interleaved them. Now one runs, the other is refused
    with one line naming it."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fastmlgan", "train", *smoke_args(out, smoke_data)]
    runs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
            for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in runs]
    codes = [p.returncode for p in runs]
    assert sorted(codes) == [0, 2], errs
    error_line(errs[codes.index(2)], f"--out {out} is in use by another fastmlgan run (pid ", f"on {socket.gethostname()}")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one run's records, in order


# ----------------------------------------------------------------------------------------------
# 3. an edited or truncated cache


def _smoke_images(data: Path):
    from fastmlgan.data.sources.coco import read_coco

    return read_coco(data / "annotations" / "instances_train.json", data / "train2017", name="smoke")


def test_an_edited_cache_is_refused_when_a_run_opens_it(tmp_path, smoke_data):
    from fastmlgan.data.imagecache.build import ensure_cache
    from fastmlgan.data.imagecache.format import PREAMBLE_BYTES, CacheError, Geometry

    images = _smoke_images(smoke_data)
    cache = ensure_cache(images, Geometry("eval", 16), tmp_path, progress=False)
    path = cache.path
    del cache
    with open(path, "r+b") as f:  # one pixel of row 100, as a hand edit would change it
        f.seek(PREAMBLE_BYTES + 100 * 16 * 16 * 3 + 7)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CacheError, match=r"pixel rows 0-255 fail their checksum \(corrupt or edited\)"):
        ensure_cache(images, Geometry("eval", 16), tmp_path, progress=False)


def test_a_cache_truncated_while_a_run_reads_it_is_one_line_not_sigbus(tmp_path, smoke_data):
    code = f"""
import os
from fastmlgan.data.imagecache.format import Geometry
from fastmlgan.data.imagecache.build import ensure_cache
from fastmlgan.data.imagecache.loader import CacheLoader
from fastmlgan.data.sources.coco import read_coco
images = read_coco({str(smoke_data / 'annotations' / 'instances_train.json')!r}, {str(smoke_data / 'train2017')!r})
cache = ensure_cache(images, Geometry("train", 16), {str(tmp_path)!r}, progress=False)
loader = CacheLoader(cache, 16, 8, 0, 1, train=True, num_threads=1)
os.truncate(cache.path, 4096 + 5000)
try:
    for batch in loader:
        pass
except Exception as e:
    print("ERROR", type(e).__name__, e)
"""
    done = run_python(code)
    assert done.returncode == 0, f"killed by signal {-done.returncode}" if done.returncode < 0 else done.stderr[-2000:]
    assert "ERROR CacheError" in done.stdout and "the file was truncated while this run read it" in done.stdout


# ----------------------------------------------------------------------------------------------
# 4. resume compatibility


@pytest.mark.parametrize("key", [f"data.{f.name}" for f in dataclasses.fields(DataConfig) if f.name.startswith("labelsets_")])
def test_a_resume_that_changes_the_labelsets_data_is_refused(key):
    saved = build_config(preset="smoke")
    changed = saved.to_dict()
    name = key.partition(".")[2]
    old = changed["data"][name]
    changed["data"][name] = (old + 1) if isinstance(old, int) else (0.5 if isinstance(old, float) else f"{old}x")
    with pytest.raises(ConfigError, match=f"^--{key} "):
        ckpt.check_resume_compatible(saved, config_from_dict(changed))


def test_every_data_option_is_fixed_or_allowed_to_change_on_resume():
    """A new data.* option must be put in one list or the other (the labelsets ones were in neither)."""
    fixed, free = set(ckpt.SHAPE_AND_DATA_OPTIONS), set(ckpt.DATA_OPTIONS_A_RESUME_MAY_CHANGE)
    for f in dataclasses.fields(DataConfig):
        key = f"data.{f.name}"
        assert (key in fixed) != (key in free), key


# ----------------------------------------------------------------------------------------------
# 5. signals outside the training loop, 6. a kill while baseline.pt is written

DRIVER = """
import os, signal, sys
from pathlib import Path
from fastmlgan.commands import train
{patch}
sys.exit(train.main({argv!r}))
"""

PATCHES = {
    "start-up": "import fastmlgan.train.trainer as r\norig = r.build_splits\n"
                "def hook(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return orig(*a, **k)\nr.build_splits = hook",
    "cache build": "import fastmlgan.data.imagecache.build as c\norig = c._ROW_SOURCES['cpu']\n"
                   "def hook(*a, **k):\n    for i, chunk in enumerate(orig(*a, **k)):\n"
                   "        os.kill(os.getpid(), signal.SIGTERM)\n        yield chunk\nc._ROW_SOURCES['cpu'] = hook",
    "final writing": "import fastmlgan.train.runlog as r\norig = r.RunLog.finish\n"
                     "def hook(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return orig(*a, **k)\nr.RunLog.finish = hook",
}


@pytest.mark.faults
@pytest.mark.parametrize("where", list(PATCHES))
def test_sigterm_outside_the_training_loop_is_one_line(tmp_path, smoke_data, where):
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = smoke_args(out, smoke_data, *(["--data.backend", "cache", "--data.cache_dir", str(cache)] if where == "cache build" else []))
    done = run_python(DRIVER.format(patch=PATCHES[where], argv=argv))
    assert done.returncode == 143, f"rc {done.returncode}: {done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("SIGTERM: ")]
    assert len(lines) == 1, done.stderr[-2000:]
    if where == "final writing":
        assert "while writing the results; the final checkpoint is" in lines[0] and f"--resume {out}" in lines[0]
        assert train_in_process(["--resume", str(out)]) == 0  # writes them
        assert "per_class" in json.loads((out / "metrics.json").read_text())
    else:
        assert "stopped during start-up, before training began" in lines[0]
        assert not out.exists() and not list(cache.glob(".*.tmp"))  # nothing half-made left


@pytest.mark.faults
def test_a_kill_while_baseline_pt_is_written_is_redone_on_resume(tmp_path, smoke_data):
    out = tmp_path / "run"
    patch = ("from fastmlgan.train import checkpoint as ck\norig = ck.save_atomic\n"
             "def hook(state, path):\n    if Path(path).name == 'baseline.pt':\n        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return orig(state, path)\nck.save_atomic = hook")
    done = run_python(DRIVER.format(patch=patch, argv=smoke_args(out, smoke_data)))
    assert done.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "baseline.pt").exists()
    assert train_in_process(["--resume", str(out)]) == 0
    baseline = torch.load(out / "checkpoints" / "baseline.pt", weights_only=True)
    assert baseline["global_step"] == 8 and baseline["phase"] == "gan"  # the end of phase 1: 2 epochs of 4 steps


# ----------------------------------------------------------------------------------------------
# 7. the run folder removed or made read-only mid-run


@pytest.mark.parametrize("fault", ["removed", "read-only"])
def test_a_run_folder_removed_or_made_read_only_mid_run_is_one_line(tmp_path, smoke_data, monkeypatch, capsys, fault):
    out = tmp_path / "run"
    calls = []
    write = RunLog.write

    def hook(self, record, *args, **kwargs):
        calls.append(record)
        if len(calls) == 2:
            shutil.rmtree(self.out_dir) if fault == "removed" else make_read_only(self.out_dir)
        return write(self, record, *args, **kwargs)

    monkeypatch.setattr(RunLog, "write", hook)
    try:
        assert train_in_process(smoke_args(out, smoke_data)) == 2
    finally:
        if fault == "read-only":
            undo_read_only(out)
    reason = "No such file or directory" if fault == "removed" else "Read-only file system"
    error_line(capsys.readouterr().err, f"cannot write {out / 'metrics.jsonl'} ({reason})", "removed, made read-only")


# ----------------------------------------------------------------------------------------------
# 8. the phase-2 batch check


def test_a_phase2_batch_that_does_not_fit_is_refused_before_phase1(tmp_path, smoke_data, capsys):
    out = tmp_path / "run"
    assert train_in_process(smoke_args(out, smoke_data, "--data.batch_size", "32")) == 2
    error_line(capsys.readouterr().err, "phase 2 draws 10 batches per G update (1 + --gan.d_steps 3 x 3 pair kinds): "
               "320 images per rank with --data.batch_size 32", "gets 256 of the 256", "--data.batch_size 25 or less")
    assert not out.exists()  # before phase 1, not after it
    # With a validation split the message counts the rows it took and names the option.
    assert train_in_process(smoke_args(out, smoke_data, "--data.batch_size", "24", "--data.val_fraction", "0.25")) == 2
    error_line(capsys.readouterr().err, "240 images per rank with --data.batch_size 24",
               "gets 192 of the 192 training images (64 more held out by --data.val_fraction 0.25)",
               "--data.batch_size 19 or less", "a smaller --data.val_fraction")
    assert not out.exists()


def test_gan_epochs_0_needs_no_phase2_batch(tmp_path, smoke_data):
    out = tmp_path / "run"
    assert train_in_process(smoke_args(out, smoke_data, "--data.batch_size", "32", "--train.gan_epochs", "0")) == 0
    assert json.loads((out / "metrics.json").read_text())["gan"] is not None


# ----------------------------------------------------------------------------------------------
# 9. check on data that cannot train


def _coco_split(tmp_path: Path, data: Path, annotate: bool, missing: bool) -> list[str]:
    images = [{"id": i, "file_name": f"{'absent-' if missing else ''}{i:06d}.jpg"} for i in range(1, 6)]
    ann = [{"image_id": i, "category_id": 1} for i in range(1, 6)] if annotate else []
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "categories": [{"id": 1, "name": "x"}], "annotations": ann}))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, f in enumerate(sorted((data / "train2017").iterdir())[:5], 1):
        shutil.copy(f, folder / f"{i:06d}.jpg")
    return ["--data.dataset", "coco", "--data.train_annotations", str(path), "--data.train_images", str(folder)]


@pytest.mark.parametrize("case", ["all unlabelled", "all missing", "image folder is a symlink loop"])
def test_check_says_training_would_fail_when_nothing_is_usable(tmp_path, smoke_data, capsys, case):
    from fastmlgan.commands.check import main

    args = _coco_split(tmp_path, smoke_data, annotate=case != "all unlabelled", missing=case == "all missing")
    if case == "image folder is a symlink loop":
        shutil.rmtree(tmp_path / "images")
        (tmp_path / "images").symlink_to(tmp_path / "loop")
        (tmp_path / "loop").symlink_to(tmp_path / "images")
    with restored_logging():
        assert main(args) == 1
    report = capsys.readouterr().out
    assert "training would FAIL" in report and "train: no usable image among the 5 listed" in report


@pytest.mark.faults
def test_sigterm_to_train_nproc_stops_every_rank_with_one_line(tmp_path, smoke_data):
    """``train --nproc`` now runs torchrun in its own process: a SIGTERM to it still reaches the
    ranks through torchrun's agent, each finishes its step, rank 0 checkpoints, and the one line
    names the checkpoint; the run resumes."""
    import time

    out = tmp_path / "run"
    argv = ["train", "--nproc", "2", *smoke_args(out, smoke_data, "--train.bce_epochs", "30", "--train.log_every", "1")]
    run = subprocess.Popen([sys.executable, "-m", "fastmlgan", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env=env())
    log = out / "metrics.jsonl"
    while run.poll() is None and not (log.is_file() and log.read_text().strip()):
        time.sleep(0.2)  # the first logged step: training has begun
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 143 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "stopped after step" in line]  # any rank's
    assert len(lines) == 1 and lines[0].startswith("SIGTERM: ") and f"continue with --resume {out}" in lines[0], err[-3000:]
    assert "/checkpoints/step-" in lines[0]
    done = run_cli(["train", "--nproc", "2", "--resume", str(out), "--train.bce_epochs", "2"], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
