"""``fastmlgan export --checkpoint CKPT --out DIR [--onnx] [--torch-export] [--overwrite]``: the
generator G of a training checkpoint as a model to use (``fastmlgan.export``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from fastmlgan import export
from fastmlgan.classifier import SIDECAR, WEIGHT_CHOICES, WEIGHTS
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.export import export_checkpoint
from fastmlgan.logs import setup_logging
from fastmlgan.safeio import describe_os_error

DESCRIPTION = export.__doc__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser(prog: str = "fastmlgan export") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint file or a run directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must be empty or absent)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (needs onnx and onnxscript)")
    parser.add_argument("--torch-export", action="store_true", help="also write model.pt2 (torch.export)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR, replacing an earlier export")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                        help="auto (default: the weights that won on the run's validation split; raw without one) | "
                        "raw (G's own) | ema (their average, --train.ema_decay)")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging(stream="stderr", level=logging.WARNING, fmt="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastmlgan").setLevel(logging.INFO)  # not the exporters' own INFO chatter
    try:
        args = build_parser().parse_args(argv)
        sidecar = export_checkpoint(args.checkpoint, args.out, args.onnx, args.torch_export, args.overwrite, args.weights)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except FastMLGANError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.out}: {describe_os_error(e)}", file=sys.stderr)
        return 2
    source = sidecar["source"]
    written = [WEIGHTS, SIDECAR] + [e["file"] for e in (sidecar["files"]["onnx"], sidecar["files"]["torch_export"]) if e]
    thresholds = sidecar["thresholds"]
    chosen = "no thresholds chosen on validation (0.5)" if thresholds is None else (
        f"thresholds chosen on validation (global {thresholds['global']:g}, per class)"
    )
    print(
        f"exported G of {source['checkpoint']} (phase {source['phase']}, step {source['global_step']}, "
        f"{len(sidecar['class_names'])} classes, {sidecar['weights']} weights, {chosen}) to {args.out}: {', '.join(written)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
