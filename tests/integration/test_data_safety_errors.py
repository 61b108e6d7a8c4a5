"""Issue 18's list of tracebacks: each input that gave one now gives one line naming the file or
option (exit status 2), or is handled as documented."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from safety_helpers import error_line, make_read_only, run_cli, smoke_args, undo_read_only
from trained_model import restored_logging

from fastmlgan.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    from fastmlgan.data.sources import embedded

    root = tmp_path_factory.mktemp("smoke-data") / "data"
    embedded.ensure(root, num_train=256, num_val=64, image_size=40, seed=0)
    return root


def _in_process(main, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with restored_logging():
        code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _train(argv, capsys):
    from fastmlgan.commands.train import main

    return _in_process(main, argv, capsys)


def _deep_json(path: Path, depth: int = 100_000) -> Path:
    path.write_text("[" * depth + "]" * depth)
    return path


@pytest.mark.parametrize("case", ["nested config", "NUL in --out", "NUL in a config path", "bce_lr 1e38", "image_size 1",
                                  "cache_dir is a file", "huge d_steps", "huge D"])
def test_bad_options_are_one_line(tmp_path, smoke_data, capsys, case):
    out = tmp_path / "run"
    argv = {
        "nested config": ["--config", str(_deep_json(tmp_path / "deep.json")), "--out", str(out)],
        "NUL in --out": smoke_args(Path(f"{out}\x00x"), smoke_data),
        "NUL in a config path": ["--config", str(tmp_path / "c.json"), "--out", str(out)],
        "bce_lr 1e38": smoke_args(out, smoke_data, "--optim.bce_lr", "1e38"),
        "image_size 1": smoke_args(out, smoke_data, "--data.image_size", "1"),
        "cache_dir is a file": smoke_args(out, smoke_data, "--data.backend", "cache", "--data.cache_dir", "/etc/hostname"),
        "huge d_steps": smoke_args(out, smoke_data, "--gan.d_steps", "1000"),
        "huge D": smoke_args(out, smoke_data, "--gan.hidden_dim", "65536", "--gan.num_layers", "1000"),
    }[case]
    (tmp_path / "c.json").write_text(json.dumps({"data": {"root": "a\u0000b"}}))
    code, _, err = _train(argv, capsys)
    assert code == 2
    fragment = {
        "nested config": "JSON nested too deeply", "NUL in --out": "contains a NUL character",
        "NUL in a config path": "--data.root: 'a\\x00b' contains a NUL character",
        "bce_lr 1e38": "--optim.bce_lr must be a finite number in (0, 1e+10], got 1e+38",
        "image_size 1": "--data.image_size must be an integer in [2, 4096], got 1",
        "cache_dir is a file": "--data.cache_dir /etc/hostname: cannot build the cache there (it is not a folder)",
        "huge d_steps": "phase 2 draws 3001 batches per G update",
        "huge D": "D would have 4,2",
    }[case]
    error_line(err, fragment)
    assert not out.exists()


def test_a_read_only_cache_dir_is_one_line(tmp_path, smoke_data, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_read_only(cache)
    try:
        code, _, err = _train(smoke_args(tmp_path / "run", smoke_data, "--data.backend", "cache", "--data.cache_dir", str(cache)), capsys)
    finally:
        undo_read_only(cache)
    assert code == 2
    error_line(err, f"--data.cache_dir {cache}: cannot build the cache there (Read-only file system)")


def test_a_symlink_loop_in_the_coco_folder_is_not_a_traceback(tmp_path, capsys):
    from fastmlgan.commands.check import main as check_main
    from fastmlgan.data.sources.coco import read_coco

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    (images / "loop1").symlink_to(images / "loop2")
    (images / "loop2").symlink_to(images / "loop1")
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "loop1"}],
           "categories": [{"id": 1, "name": "x"}], "annotations": [{"image_id": i, "category_id": 1} for i in (1, 2)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    read = read_coco(tmp_path / "ann.json", images)
    assert read.paths == [str(images / "a.jpg")] and read.missing == [str(images / "loop1")]
    args = ["--data.dataset", "coco", "--data.train_annotations", str(tmp_path / "ann.json"), "--data.train_images", str(images)]
    code, out, err = _in_process(check_main, args, capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{images / 'loop1'}: cannot open it (a symbolic link loop" in out


def test_a_dangling_step_link_is_skipped_by_name(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    import torch

    ckpt.save_checkpoint({"config": {}, "class_names": [], "generator": {"w": torch.zeros(2)}}, tmp_path / "run", 3, keep=2)
    (folder / "step-000000009.pt").symlink_to(folder / "gone.pt")
    os.unlink(folder / "last.pt")
    state, path, skipped = ckpt.load_latest_good(tmp_path / "run")
    assert path.name == "step-000000003.pt" and [p.name for p, _ in skipped] == ["step-000000009.pt"]


def test_a_dataloader_workers_error_is_one_line(tmp_path, smoke_data, capsys):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(smoke_data, data)
    victim = sorted((data / "train2017").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    argv = smoke_args(tmp_path / "run", data, "--data.num_workers", "1", "--data.on_bad_image", "error",
                      "--data.backend", "torch")
    code, _, err = _train(argv, capsys)
    assert code == 2
    line = error_line(err, f"{victim}: cannot decode image")
    assert "DataLoader worker" not in line and "Original Traceback" not in err


@pytest.mark.parametrize("case", ["huge seeds", "negative threads", "corrupt harness.json", "results.jsonl rows",
                                  "out is a file"])
def test_reproduce_bad_input_is_one_line(tmp_path, capsys, case):
    from fastmlgan.commands.reproduce import main

    out = tmp_path / "out"
    argv = ["--preset", "smoke", "--out", str(out), "--seeds", "1"]
    if case == "huge seeds":
        argv[-1] = str(10**12)
    elif case == "negative threads":
        argv += ["--threads", "-1"]
    elif case == "out is a file":
        out.write_text("")
    else:
        out.mkdir()
        if case == "corrupt harness.json":
            (out / "harness.json").write_text('{"config": ')
        else:
            (out / "harness.json").write_text('{"config": {}}')  # another configuration: refused by name
            (out / "results.jsonl").write_text('[1]\n{"seed": [1]}\n"x"\n')
    code, _, err = _in_process(main, argv, capsys)
    assert code == 2
    fragment = {"huge seeds": "--seeds 1000000000000: at most 1000 seeds", "negative threads": "--threads must be in [0, 1024]",
                "corrupt harness.json": "harness.json: not JSON (line 1", "results.jsonl rows": "holds results of another configuration",
                "out is a file": "is not a folder"}[case]
    error_line(err, fragment)


def test_reproduce_skips_malformed_result_rows_with_a_warning(tmp_path):
    from fastmlgan.reproduce.runner import RecordFile

    path = tmp_path / "results.jsonl"
    path.write_text('[1]\n{"seed": [1], "variant": "baseline"}\n{"seed": 1, "variant": ["x"]}\n"x"\n{"seed": 1\n')
    assert RecordFile(path).load() == {}


def test_check_json_to_a_path_it_cannot_write_is_one_line(tmp_path, capsys):
    from fastmlgan.commands.check import main

    (tmp_path / "ro").mkdir()
    make_read_only(tmp_path / "ro")
    try:
        for target in (tmp_path, tmp_path / "ro" / "report.json", tmp_path / "absent" / "report.json"):
            code, _, err = _in_process(main, ["--preset", "smoke", "--data.root", str(tmp_path / "d"), "--json", str(target)], capsys)
            assert code == 2
            error_line(err, f"--json {target}: cannot write")
    finally:
        undo_read_only(tmp_path / "ro")


@pytest.mark.slow
def test_train_nproc_shows_the_kits_line_only(tmp_path):
    """torchrun printed its own traceback and failure summary after the ranks' error lines."""
    done = run_cli(["train", "--nproc", "2", "--preset", "smoke", "--optim.bce_lr", "nan", "--out", str(tmp_path / "r")])
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --optim.bce_lr must be a finite number in (0, 1e+10], got nan"
