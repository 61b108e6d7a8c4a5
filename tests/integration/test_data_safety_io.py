"""Issue 18, items 10-16 and the tracebacks it lists: what the commands read and write. Each test
reproduces the fault as a new user met it and fails on the code before the fix."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safety_helpers import env, error_line, run_cli
from trained_model import embedded_val_images, restored_logging, smoke_run

import fastmlgan
from fastmlgan import export as export_library
from fastmlgan.commands import export, predict
from fastmlgan.errors import DataError, FastMLGANError

pytestmark = pytest.mark.slow  # one smoke training per session (trained_model.smoke_run)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return smoke_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    with restored_logging():
        assert export.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    return out


def _main(main, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with restored_logging():
        code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _predict(argv, capsys):
    return _main(predict.main, [*argv, "--num-workers", "0"], capsys)


def _bytes_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# 10. predict --out


def test_predict_out_never_replaces_an_input_image(run, exported, tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    shutil.copy(embedded_val_images(run)[0], image)
    before = image.read_bytes()
    code, _, err = _predict([str(exported), str(image), "--out", str(image)], capsys)
    assert code == 2 and image.read_bytes() == before
    error_line(err, f"--out {image} is {image}, an input of this command")


def test_predict_out_never_replaces_a_file_in_a_run_folder(run, exported, tmp_path, capsys):
    """last.pt is a hard link to the newest step file: writing rows into it destroyed the model."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    os.unlink(copy / "checkpoints" / "last.pt")  # copytree copied the link's content: link it again
    step = sorted((copy / "checkpoints").glob("step-*.pt"))[-1]
    os.link(step, copy / "checkpoints" / "last.pt")
    before = _bytes_of(copy)
    image = embedded_val_images(run)[0]
    for target in (copy / "checkpoints" / "last.pt", copy / "metrics.json"):
        code, _, err = _predict([str(exported), image, "--out", str(target)], capsys)
        assert code == 2
        error_line(err, f"--out {target} is a file inside the run or export folder {copy}")
    assert _bytes_of(copy) == before


def test_predict_out_is_replaced_only_after_every_row_is_written(run, exported, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rows.csv"
    out.write_text("an earlier result\n")
    images = embedded_val_images(run)[:3]
    write = predict.RowWriter.write

    def fail_on_the_second_row(self, path, *args):
        if path == images[1]:
            raise KeyboardInterrupt  # Ctrl-C half-way
        return write(self, path, *args)

    monkeypatch.setattr(predict.RowWriter, "write", fail_on_the_second_row)
    with pytest.raises(KeyboardInterrupt):
        _predict([str(exported), *images, "--out", str(out)], capsys)
    assert out.read_text() == "an earlier result\n" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]
    monkeypatch.setattr(predict.RowWriter, "write", write)
    assert _predict([str(exported), *images, "--out", str(out)], capsys)[0] == 0
    assert len(list(csv.reader(io.StringIO(out.read_text())))) == 4  # the header and three rows


@pytest.mark.parametrize("command", ["predict", "metrics"])
def test_writing_to_a_full_standard_output_is_one_line(run, exported, tmp_path, command):
    if command == "predict":
        args = [sys.executable, "-m", "fastmlgan", "predict", str(exported), embedded_val_images(run)[0]]
    else:
        np.save(tmp_path / "s.npy", np.array([[0.9, 0.1], [0.2, 0.8]]))
        np.save(tmp_path / "t.npy", np.array([[1, 0], [0, 1]]))
        args = [sys.executable, "-m", "fastmlgan", "metrics", str(tmp_path / "s.npy"), str(tmp_path / "t.npy")]
    with open("/dev/full", "w") as full:
        done = subprocess.run(args, stdout=full, stderr=subprocess.PIPE, text=True, env=env(), timeout=300)
    assert done.returncode == 2
    error_line(done.stderr, "cannot write to standard output (No space left on device)")


# ----------------------------------------------------------------------------------------------
# 11. a stray quote in a list file


def test_a_stray_quote_is_an_error_not_rows_silently_dropped(tmp_path, capsys):
    from fastmlgan.commands.check import main as check_main
    from fastmlgan.data.sources.listfile import read_list

    (tmp_path / "names.txt").write_text("cat\ndog\n")
    rows = [f"img{i:02d}.jpg,{'cat' if i % 2 else 'dog'}" for i in range(16)]
    rows[2] = '"' + rows[2]  # one stray quote: the csv module reads the other 14 rows into one field
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    for i in range(16):
        Image.new("RGB", (8, 8)).save(tmp_path / f"img{i:02d}.jpg")
    with pytest.raises(DataError, match=r"train.csv:3: a quoted field runs from line 3 to line 16 \(a stray"):
        read_list(tmp_path / "train.csv", tmp_path / "names.txt")
    args = ["--data.dataset", "list", "--data.list_train", str(tmp_path / "train.csv"), "--data.label_names",
            str(tmp_path / "names.txt")]
    code, out, _ = _main(check_main, args, capsys)
    assert code == 1 and "training would FAIL" in out


# ----------------------------------------------------------------------------------------------
# 12. export --overwrite


def test_export_overwrite_never_deletes_a_users_file(run, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.onnx").write_text("the user's own model")
    code, _, err = _main(export.main, ["--checkpoint", str(run), "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and (out / "model.onnx").read_text() == "the user's own model"
    error_line(err, "is not empty and holds no fastmlgan export")
    # Beside an earlier export, a file it did not write is not replaced either.
    (out / "model.onnx").unlink()
    assert _main(export.main, ["--checkpoint", str(run), "--out", str(out)], capsys)[0] == 0
    (out / "model.pt2").write_text("the user's own program")
    argv = ["--checkpoint", str(run), "--out", str(out), "--overwrite", "--torch-export"]
    code, _, err = _main(export.main, argv, capsys)
    assert code == 2 and (out / "model.pt2").read_text() == "the user's own program"
    error_line(err, "model.pt2 is not part of the earlier export")


def test_a_failed_overwrite_keeps_the_previous_export(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model"
    assert _main(export.main, ["--checkpoint", str(run), "--out", str(out)], capsys)[0] == 0
    before = _bytes_of(out)

    def broken(*args):
        raise FastMLGANError("model.pt2: its logits differ from G's by 1 (> 0.001) on a check batch")

    monkeypatch.setattr(export_library, "_export_torch", broken)
    argv = ["--checkpoint", str(run / "checkpoints" / "baseline.pt"), "--out", str(out), "--overwrite", "--torch-export"]
    code, _, err = _main(export.main, argv, capsys)
    assert code == 2 and "logits differ" in error_line(err)
    assert _bytes_of(out) == before  # no temporary left, nothing replaced
    fastmlgan.load_classifier(out)


# ----------------------------------------------------------------------------------------------
# 13. decoding: EXIF, 16-bit, float


def _decoders(path: Path):
    """The one decode as each command sees it: training and predict (decode_rgb), the cache build
    (rows_cpu: decode and the first resize), check (inspect_image)."""
    from fastmlgan.data.check import inspect_image
    from fastmlgan.data.geometry import decode_rgb, resize
    from fastmlgan.data.imagecache.decode import rows_cpu
    from fastmlgan.data.types import LabeledImages

    images = LabeledImages(name="x", paths=[str(path)], labels=np.ones((1, 1), np.uint8), class_names=["a"])
    ((_, (row,)),) = list(rows_cpu(images, 8, 4, 1))
    return decode_rgb, row, inspect_image(str(path)), resize


def test_16_bit_and_float_pixels_are_scaled_and_exif_applied_everywhere(tmp_path):
    from fastmlgan.classifier import preprocess_image
    from fastmlgan.data.geometry import normalize

    grey16 = (np.arange(12 * 16, dtype=np.uint32).reshape(12, 16) * 341).astype(np.uint16)  # 0 .. 65,131
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    floats = np.linspace(0, 1, 12 * 16, dtype=np.float32).reshape(12, 16)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tif")
    upright = np.zeros((12, 16, 3), np.uint8)
    upright[:, :4] = 255  # a white band on the left, stored turned 90 degrees with EXIF orientation 8
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_270)
    exif = stored.getexif()
    exif[0x0112] = 8
    stored.save(tmp_path / "exif.png", exif=exif.tobytes())
    expected = {
        "g16.png": np.rint(grey16 / 257.0).astype(np.uint8)[..., None].repeat(3, 2),  # by hand: 65535 -> 255
        "f.tif": np.rint(floats * 255.0).astype(np.uint8)[..., None].repeat(3, 2),
        "exif.png": upright,
    }
    for name, want in expected.items():
        decode_rgb, row, problem, resize = _decoders(tmp_path / name)
        got = decode_rgb(tmp_path / name)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want, err_msg=name)
        np.testing.assert_array_equal(row, resize(torch.from_numpy(want).permute(2, 0, 1), 8).permute(1, 2, 0).numpy())
        assert problem[0] == "non_jpeg", (name, problem)  # decodable: the torch loader trains on it
        x = preprocess_image(tmp_path / name, 8)  # predict
        assert torch.equal(x, normalize(resize(torch.from_numpy(want).permute(2, 0, 1), 8)))


def test_pixels_without_a_known_white_level_are_refused_by_name(tmp_path):
    from fastmlgan.data.check import inspect_image
    from fastmlgan.data.geometry import decode_rgb

    Image.fromarray(np.full((4, 4), 3.0, np.float32), mode="F").save(tmp_path / "hdr.tif")
    Image.fromarray(np.full((4, 4), 70000, np.int32), mode="I").save(tmp_path / "i32.tif")
    for name, fragment in (("hdr.tif", "float pixels (PIL mode F) outside [0, 1] (min 3, max 3)"),
                           ("i32.tif", "32-bit integer pixels (PIL mode I)")):
        with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / name}: {fragment}")):
            decode_rgb(tmp_path / name)
        kind, detail = inspect_image(str(tmp_path / name))
        assert kind == "unreadable" and fragment in detail


# ----------------------------------------------------------------------------------------------
# 14. exported models: integrity record, class names


def test_a_flipped_bit_in_the_weights_is_refused(exported, run, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-3] ^= 0x40  # an exponent bit of the last weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    code, out, err = _predict([str(copy), embedded_val_images(run)[0]], capsys)
    assert code == 2 and out == ""
    error_line(err, "model.safetensors: its SHA-256 differs from files.weights_sha256 in fastmlgan.json")


def _sidecar_variants():
    drop = ["class_names", "model", "model.backbone", "model.num_labels", "model.feature_dim", "model.width",
            "model.depth", "preprocessing", "preprocessing.input", "preprocessing.image_size", "files",
            "files.weights", "files.weights_sha256"]
    cases = [(f"no {key}", key, None) for key in drop]
    cases += [(f"{key} of the wrong type", key, value) for key, value in (
        ("class_names", "cat"), ("class_names", [1, 2]), ("model", []), ("model.backbone", 3), ("model.num_labels", "16"),
        ("model.width", 2.5), ("model.depth", True), ("preprocessing.image_size", "32"), ("preprocessing.input", None),
        ("files", "model.safetensors"), ("files.weights", ["model.safetensors"]), ("files.weights_sha256", 12))]
    return cases


@pytest.mark.parametrize("name,key,value", _sidecar_variants(), ids=[c[0] for c in _sidecar_variants()])
def test_sidecar_fields_missing_or_of_the_wrong_type_are_one_line(exported, run, tmp_path, capsys, name, key, value):
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    sidecar = json.loads((copy / "fastmlgan.json").read_text())
    *parents, last = key.split(".")
    holder = sidecar
    for part in parents:
        holder = holder[part]
    if value is None and name.startswith("no "):
        del holder[last]
    else:
        holder[last] = value
    (copy / "fastmlgan.json").write_text(json.dumps(sidecar))
    code, out, err = _predict([str(copy), embedded_val_images(run)[0]], capsys)
    assert code == 2 and out == ""
    assert f"'{key}'" in error_line(err, str(copy / "fastmlgan.json"))


def test_a_sidecar_with_more_class_names_than_outputs_is_refused(exported, run, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    sidecar = json.loads((copy / "fastmlgan.json").read_text())
    sidecar["class_names"].append("unicorn")
    (copy / "fastmlgan.json").write_text(json.dumps(sidecar))
    code, out, err = _predict([str(copy), embedded_val_images(run)[0]], capsys)
    assert code == 2 and out == ""
    error_line(err, "17 class names for a model of 16 outputs")


# ----------------------------------------------------------------------------------------------
# 15. FIFOs and devices: no hang, no endless read


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # /dev/zero read to the end fails here, not the machine


def test_a_fifo_or_a_device_named_as_input_never_hangs(run, exported, tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(embedded_val_images(run)[0], images / "a.jpg")
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": str(fifo)},
                      {"id": 3, "file_name": "/dev/zero"}],
           "categories": [{"id": 1, "name": "x"}], "annotations": [{"image_id": i, "category_id": 1} for i in (1, 2, 3)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    check = ["check", "--data.dataset", "coco", "--data.train_annotations", str(tmp_path / "ann.json"),
             "--data.train_images", str(images), "--data.allow_outside_root", "true"]
    kwargs = {"preexec_fn": _limit_memory, "timeout": 240}
    done = run_cli(check, **kwargs)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{fifo}: is a FIFO (named pipe), not a regular file" in done.stdout
    assert "/dev/zero: is a device, not a regular file" in done.stdout
    done = run_cli(["predict", str(exported), str(images / "a.jpg"), str(fifo), "/dev/zero"], **kwargs)
    assert done.returncode == 1 and len(done.stdout.splitlines()) == 4  # header, one scored row, two error rows
    done = run_cli(["train", "--config", str(fifo), "--out", str(tmp_path / "run")], **kwargs)
    assert done.returncode == 2
    error_line(done.stderr, f"--config {fifo} is a FIFO (named pipe), not a regular file")


# ----------------------------------------------------------------------------------------------
# 16. paths outside their folder


@pytest.mark.parametrize("relative", [True, False], ids=["../", "absolute"])
def test_annotation_paths_stay_inside_their_folder(tmp_path, relative):
    from fastmlgan.data.sources.coco import read_coco
    from fastmlgan.data.sources.listfile import read_list

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.jpg")
    name = "../outside.jpg" if relative else str(tmp_path / "outside.jpg")
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": name}],
           "categories": [{"id": 1, "name": "x"}], "annotations": [{"image_id": i, "category_id": 1} for i in (1, 2)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"images\[1\] 'file_name': path .* points outside its folder .*--data.allow_outside_root true"):
        read_coco(tmp_path / "ann.json", tmp_path / "images")
    outside = read_coco(tmp_path / "ann.json", tmp_path / "images", allow_outside_root=True)
    assert len(outside.paths) == 2 and outside.paths[1].endswith("outside.jpg")
    (tmp_path / "names.txt").write_text("x\n")
    (tmp_path / "images" / "list.csv").write_text(f"a.jpg,x\n{name},x\n")
    with pytest.raises(DataError, match=r"list.csv:2: path .* points outside its folder .*--data.allow_outside_root"):
        read_list(tmp_path / "images" / "list.csv", tmp_path / "names.txt")


def test_a_sidecar_weights_path_outside_the_export_is_not_followed(exported, run, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    shutil.copy(copy / "model.safetensors", tmp_path / "x.safetensors")
    sidecar = json.loads((copy / "fastmlgan.json").read_text())
    sidecar["files"]["weights"] = "../x.safetensors"
    (copy / "fastmlgan.json").write_text(json.dumps(sidecar))
    code, _, err = _predict([str(copy), embedded_val_images(run)[0]], capsys)
    assert code == 2
    error_line(err, "files.weights: path '../x.safetensors' points outside its folder", "must name a file in that folder")


def test_dali_applies_exif_orientation_as_decode_rgb_does(tmp_path):
    """DALI's decoder (its CPU pipeline here) turns an EXIF-rotated JPEG upright like decode_rgb;
    before, ``adjust_orientation=False`` fed the stored, sideways pixels."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install '.[dali]')")
    from loader_helpers import MAX_ABS_TOLERANCE, MEAN_ABS_TOLERANCE, denormalize

    from fastmlgan.data.backends.dali import build_dali_eval_loader
    from fastmlgan.data.geometry import decode_rgb, eval_resize
    from fastmlgan.data.types import LabeledImages

    upright = np.zeros((48, 64, 3), np.uint8)
    upright[:, :16] = 255  # a white band on the left
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    stored.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    assert decode_rgb(tmp_path / "r.jpg").shape == (3, 48, 64)
    images = LabeledImages(name="r", paths=[str(tmp_path / "r.jpg")] * 2, labels=np.ones((2, 1), np.uint8), class_names=["a"])
    image = next(iter(build_dali_eval_loader(images, 32, 2, 0, 1)))["image"][0]
    want = eval_resize(decode_rgb(tmp_path / "r.jpg"), 32).long()
    diff = (denormalize(image) - want).abs()
    assert diff.float().mean() <= MEAN_ABS_TOLERANCE and diff.max() <= MAX_ABS_TOLERANCE
    sideways = eval_resize(torch.from_numpy(np.asarray(stored)).permute(2, 0, 1).contiguous(), 32).long()
    assert (denormalize(image) - sideways).abs().float().mean() > 20  # the stored pixels are far from it
