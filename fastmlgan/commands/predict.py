"""``fastmlgan predict MODEL PATH... [options]``: score image files with a trained G, one row per image.

MODEL is an exported model folder (``fastmlgan export``), a run directory or a checkpoint file.
PATH is an image file, or a folder searched recursively for image files (.jpg .jpeg .png .bmp
.gif .webp .tif .tiff, in sorted order). ``--list FILE`` adds the paths in FILE, one a line
(blank lines and lines starting with # are skipped; relative paths are relative to FILE's
folder; ``--list -`` reads standard input, relative to the current folder).

Each image is fed to G exactly as evaluation feeds it (§4.1: the whole image resized to
image_size x image_size, ImageNet-normalised; G in eval mode, fp32). A row holds the path, the
predicted labels (scores strictly above the threshold, as ``fastmlgan.metrics`` counts them, or
the ``--top-k`` highest; highest score first, joined by ";" in CSV), an error message for an image
that cannot be read (its scores are empty) and one score, σ(logit), per class. Scores are written
as the shortest decimals that read back to the exact float32 values.

The threshold: by default the one the run chose on its validation split (``--data.val_fraction``;
its global threshold), 0.5 for a model trained without one (said in one log line); ``--threshold
global`` or ``per-class`` picks a stored one, a number in [0, 1] any other. A checkpoint of a run
with ``--train.ema_decay`` holds G's raw weights and their average: ``--weights auto`` (the default)
takes the ones that won on validation.

Rows go to standard output or ``--out``; progress and messages go to standard error only. ``--out``
is written to a temporary file beside it and renamed over it when every row is written, so a failed
or interrupted run leaves an earlier file as it was; it never replaces one of the input images or
model files, nor a file inside a run or export folder (``last.pt`` is a hard link to a step file:
writing into it would destroy the final model).
Exit status: 0 every image was scored; 1 some images could not be read (each has its row with an
error, the others are scored); 2 bad arguments or model, nothing written.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastmlgan.classifier import (
    IMAGE_EXTENSIONS,
    SIDECAR,
    WEIGHT_CHOICES,
    WEIGHTS,
    load_model,
    parse_threshold,
    preprocess_image,
    thresholds_for,
)
from fastmlgan.errors import ConfigError, DataError, FastMLGANError
from fastmlgan.logs import Progress, setup_logging
from fastmlgan.safeio import describe_os_error, read_text, regular_or_absent, replace_atomically, stdout_failed
from fastmlgan.scoring import generator_scores
from fastmlgan.train.rundir import is_run_dir

logger = logging.getLogger("fastmlgan.predict")

FORMATS = ("csv", "jsonl")
FIXED_COLUMNS = ("path", "labels", "error")


def gather_paths(paths: list[str], lists: list[str]) -> tuple[list[str], list[str]]:
    """Image files from PATH arguments (files as given, folders walked) and list files, in order;
    and the folders that held no image file."""
    out: list[str] = []
    empty: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                empty.append(raw)
            out += found
        else:
            out.append(raw)  # a missing or unreadable file gets its error row
    for list_file in lists:
        out += _read_list(list_file)
    return out, empty


def _read_list(list_file: str) -> list[str]:
    if list_file == "-":
        lines, base = sys.stdin.read().splitlines(), Path(".")
    else:
        try:  # a FIFO or a device: refused, not waited on
            lines = read_text(list_file, "--list").splitlines()
        except DataError as e:
            raise DataError(f"--list {list_file}: cannot read it ({str(e).removeprefix(f'--list {list_file}').strip(': ')})") from None
        base = Path(list_file).parent
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(str(p if p.is_absolute() or list_file == "-" else base / p))
    return out


class ImageFiles(Dataset):
    """Image files as G's evaluation inputs; an unreadable one yields zeros and its error message."""

    def __init__(self, paths: list[str], image_size: int) -> None:
        self.paths = paths
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            image, error = preprocess_image(self.paths[i], self.image_size), ""
        except DataError as e:
            image, error = torch.zeros(3, self.image_size, self.image_size), str(e)
        return {"image": image, "index": i, "error": error}


def select_labels(scores: np.ndarray, class_names: list[str], threshold, top_k: int | None) -> list[str]:
    """The predicted labels of one row, highest score first (ties: the lower class index).
    ``threshold``: one number, or one per class."""
    order = np.argsort(-scores, kind="stable")
    if top_k is not None:
        chosen = order[:top_k]
    else:
        per_class = np.broadcast_to(np.asarray(threshold, dtype=np.float64), scores.shape)
        chosen = [c for c in order if scores[c] > per_class[c]]  # strictly greater, as fastmlgan.metrics
    return [class_names[c] for c in chosen]


def format_score(x: float) -> str:
    """The shortest decimal that reads back to the same float32 (numpy's float32 repr)."""
    return str(np.float32(x))


class RowWriter:
    """Writes rows as CSV (a header, one column per class) or JSON lines."""

    def __init__(self, stream: IO[str], fmt: str, class_names: list[str]) -> None:
        self.stream, self.fmt, self.class_names = stream, fmt, class_names
        if fmt == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow([*FIXED_COLUMNS, *class_names])

    def write(self, path: str, labels: list[str], scores: np.ndarray | None, error: str) -> None:
        if self.fmt == "csv":
            cells = [""] * len(self.class_names) if scores is None else [format_score(s) for s in scores]
            self.csv.writerow([path, ";".join(labels), error, *cells])
        else:
            record = {
                "path": path,
                "labels": labels,
                # float(shortest decimal) prints as that decimal: JSON keeps the float32 value exactly.
                "scores": None if scores is None else {n: float(format_score(s)) for n, s in zip(self.class_names, scores)},
                "error": error or None,
            }
            self.stream.write(json.dumps(record) + "\n")


def check_out(out: str, inputs: list[str], model_files: list[str]) -> None:
    """``ConfigError`` when writing ``--out`` would replace something that must survive: a file
    that is not a regular file, one of the inputs (an image, a list file, the model), or a file in a
    run or export folder. A new file is fine anywhere."""
    why = regular_or_absent(out)
    if why:
        raise ConfigError(f"--out {out}: cannot write rows there ({why})")
    if not os.path.exists(out):
        if not Path(out).resolve().parent.is_dir():
            raise ConfigError(f"--out {out}: cannot write it (its folder does not exist)")
        return
    target = os.stat(out)
    for path in [*model_files, *inputs]:
        try:
            same = os.path.samestat(os.stat(path), target)
        except (OSError, ValueError):  # a missing input (its row will say so), a NUL in its name
            continue
        if same:
            raise ConfigError(f"--out {out} is {path}, an input of this command: give another --out")
    for folder in Path(out).resolve().parents:
        if is_run_dir(folder) or (folder / SIDECAR).is_file():
            raise ConfigError(
                f"--out {out} is a file inside the run or export folder {folder}: it is not replaced; give another --out"
            )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to this process; use --device cpu (or auto)")
    return torch.device(name)


@torch.no_grad()
def predict_rows(
    generator: torch.nn.Module, paths: list[str], image_size: int, device: torch.device, batch_size: int, num_workers: int
) -> Iterator[tuple[str, np.ndarray | None, str]]:
    """(path, σ(G(x)) or None, error) per image, in input order, batch by batch."""
    loader = DataLoader(
        ImageFiles(paths, image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    # channels_last as in the Trainer on a GPU (cuDNN's faster convolution layout); values unchanged.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    generator = generator.to(device, memory_format=memory_format).eval()
    progress = Progress(len(loader), "predict")
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        scores = generator_scores(generator, x, None).cpu().numpy()
        for j, i in enumerate(batch["index"].tolist()):
            error = batch["error"][j]
            yield paths[i], (None if error else scores[j]), error
        progress.update(1)
    progress.close()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser(prog: str = "fastmlgan predict") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="exported model folder, run directory or checkpoint file")
    parser.add_argument("paths", metavar="PATH", nargs="*", help="image files or folders (searched recursively)")
    parser.add_argument("--list", action="append", default=[], metavar="FILE", help="file of image paths, one a line (- = stdin); repeatable")
    choose = parser.add_mutually_exclusive_group()
    choose.add_argument("--threshold", default=None, metavar="T",
                        help="labels with a score above it: a number in [0, 1], global or per-class (the thresholds the run "
                        "chose on its validation split); default: the run's global one, 0.5 for a model without")
    choose.add_argument("--top-k", type=int, default=None, metavar="K", help="the K highest-scoring labels instead")
    parser.add_argument("--format", choices=FORMATS, default="csv", help="csv (default) or jsonl")
    parser.add_argument("--out", default="", metavar="FILE", help="write rows to FILE instead of standard output")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch (default 64)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU when there is one")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                        help="a checkpoint's weights: auto (default: those that won on validation) | raw | ema")
    parser.add_argument("--num-workers", type=int, default=2, metavar="N", help="decoding worker processes (default 2; 0 = in this process, as for a single batch)")
    return parser


def run(args: argparse.Namespace) -> int:
    choice = parse_threshold(args.threshold)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    if not args.paths and not args.list:
        raise ConfigError("no images given: pass image files or folders after MODEL, or --list FILE")
    device = resolve_device(args.device)
    model = load_model(args.model, args.weights)
    if args.top_k is not None and not 1 <= args.top_k <= len(model.class_names):
        raise ConfigError(f"--top-k must be in [1, {len(model.class_names)}] (the model's classes), got {args.top_k}")
    image_size = model.image_size
    paths, empty = gather_paths(args.paths, args.list)
    extensions = " ".join(IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"no image files ({extensions}) found in {' '.join(args.paths + args.list)}")
    for folder in empty:
        logger.warning("%s: no image files (%s) in this folder", folder, extensions)
    if args.out:
        check_out(args.out, [*paths, *(f for f in args.list if f != "-")], model_files(args.model))
    described = f"the {args.top_k} highest"
    if args.top_k is None:  # last of the checks: an error stays the one line on stderr
        args.threshold, described = thresholds_for(choice, model.thresholds, len(model.class_names), model.source)
    logger.info(
        "%s: %s G (%s weights), %d classes, %d px, labels: %s; %d images on %s",
        model.source, model.generator.backbone, model.weights, len(model.class_names), image_size, described, len(paths), device,
    )
    # One batch has nothing to overlap: worker start-up would only add to it.
    workers = args.num_workers if len(paths) > args.batch_size else 0
    rows = predict_rows(model.generator, paths, image_size, device, args.batch_size, workers)
    if args.out:
        try:
            with replace_atomically(args.out) as out:
                num_failed = write_rows(out, rows, args, model.class_names)
        except OSError as e:
            raise ConfigError(f"--out {args.out}: cannot write it ({describe_os_error(e)}); an earlier file there is untouched") from None
    else:
        num_failed = write_rows(sys.stdout, rows, args, model.class_names)
        sys.stdout.flush()
    logger.info("%d images scored, %d unreadable%s", len(paths) - num_failed, num_failed, f"; rows in {args.out}" if args.out else "")
    return 1 if num_failed else 0


def write_rows(out: IO[str], rows, args: argparse.Namespace, class_names: list[str]) -> int:
    """Every row to ``out``; returns how many images could not be read."""
    num_failed = 0
    writer = RowWriter(out, args.format, class_names)
    for path, scores, error in rows:
        if scores is None:
            num_failed += 1
            logger.warning("%s", error)
            writer.write(path, [], None, error)
        else:
            writer.write(path, select_labels(scores, class_names, args.threshold, args.top_k), scores, "")
    return num_failed


def model_files(model: str) -> list[str]:
    """The files of a MODEL argument that --out must not replace."""
    p = Path(model)
    if p.is_dir():
        return [str(f) for f in (p / SIDECAR, p / WEIGHTS, p / "checkpoints" / "last.pt") if f.exists()]
    return [model]


def main(argv: list[str] | None = None) -> int:
    # Messages go to standard error: standard output carries only the rows.
    setup_logging(stream="stderr", level=logging.WARNING, fmt="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastmlgan").setLevel(logging.INFO)  # not the exporters' own INFO chatter
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except FastMLGANError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into head: the reader has what it wanted
        stdout_failed(BrokenPipeError())  # stdout to /dev/null: the interpreter's final flush must not fail again
        return 0
    except OSError as e:  # standard output on a full disk (or /dev/full)
        print(stdout_failed(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
