"""``fastmlgan embedded --out DIR [--num-train N] [--num-val N] [--image-size S] [--seed S]
[--force] [--describe]``: write the embedded synthetic data set (``fastmlgan.data.sources.embedded``)
to a folder, or print its structure. Torch is not imported.
"""

from __future__ import annotations

import argparse
import sys

from fastmlgan.data.sources.embedded import PARAM_DEFAULTS, describe, ensure, generate
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.logs import setup_logging
from fastmlgan.safeio import nul_argument


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="fastmlgan embedded", description="Write the embedded synthetic multi-label dataset."
    )
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--num-train", type=int, default=PARAM_DEFAULTS["num_train"])
    parser.add_argument("--num-val", type=int, default=PARAM_DEFAULTS["num_val"])
    parser.add_argument("--image-size", type=int, default=PARAM_DEFAULTS["image_size"])
    parser.add_argument("--seed", type=int, default=PARAM_DEFAULTS["seed"])
    parser.add_argument("--force", action="store_true", help="regenerate even when the folder matches")
    parser.add_argument("--describe", action="store_true", help="print the dataset's structure")
    if nul_argument(argv or []):
        print(nul_argument(argv), file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
        setup_logging(stream="stderr", fmt="%(message)s")
        params = dict(num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed)
        paths = generate(args.out, **params) if args.force else ensure(args.out, **params)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full folder
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    if args.describe:
        print(describe())
    for field in ("train_ann", "train_images", "val_ann", "val_images"):
        print(f"{field}: {getattr(paths, field)}")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (see {self.prog} --help)")


if __name__ == "__main__":
    sys.exit(main())
