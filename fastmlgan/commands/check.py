"""``fastmlgan check [--first N] [--threads T] [--no-decode] [--json FILE] --data.dataset ...
--data.*``: scan a dataset before training (the same ``--data.*`` options as training; the scan
itself is ``fastmlgan.data.check``). With no dataset option it prints its usage and exits with
status 2; 1 when training would fail, 0 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from fastmlgan.config import parse_args
from fastmlgan.data.check import check, format_report
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.logs import setup_logging
from fastmlgan.safeio import describe_os_error, regular_or_absent, replace_atomically, stdout_failed

USAGE = """usage: fastmlgan check [--first N] [--threads T] [--no-decode] [--json FILE] --data.dataset KIND --data.KEY VALUE ...
       (also python -m fastmlgan.commands.check)

Scans every image of a dataset given by the training options (--data.dataset coco|nuswide|list|embedded
and the options it needs, or --preset NAME / --config FILE; see fastmlgan train --help) and reports
missing, unreadable, truncated and non-JPEG files, images without labels and unknown labels. For
coco and list data, a split given alone (say only --data.train_annotations and --data.train_images)
is checked alone. Exit status 1 when training would fail, 2 for bad options, 0 otherwise.

  fastmlgan check --data.dataset coco --data.train_annotations ann.json --data.train_images images/

  --first N      offenders printed per kind (default 10)
  --threads T    reader threads (default 8)
  --no-decode    check magic bytes and JPEG markers only, without decoding (faster)
  --json FILE    also write the full report as JSON
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first, threads, decode, json_out, rest = 10, 8, True, None, []
    i = 0
    try:
        while i < len(argv):
            arg = argv[i]
            if arg in ("-h", "--help"):
                print(USAGE)
                return 0
            if arg == "--no-decode":
                decode = False
            elif arg in ("--first", "--threads", "--json"):
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value")
                value = argv[i + 1]
                i += 1
                if arg == "--json":
                    json_out = value
                else:
                    try:
                        number = int(value)
                    except ValueError:
                        raise ConfigError(f"{arg}: expected an integer, got {value!r}") from None
                    lo, hi = (0, 10**9) if arg == "--first" else (1, 1024)
                    if not lo <= number <= hi:
                        raise ConfigError(f"{arg} must be in [{lo}, {hi}], got {number}")
                    first, threads = (number, threads) if arg == "--first" else (first, number)
            else:
                rest.append(arg)
            i += 1
        if not any(a.startswith(("--data.", "--preset", "--config")) for a in rest):
            # Without a dataset the defaults would generate and check the embedded set: name one.
            print(USAGE, file=sys.stderr)
            raise ConfigError("name the dataset to check: --data.dataset coco|nuswide|list|embedded and its files")
        cfg = parse_args(rest, prog="fastmlgan check")
        if cfg is None:
            return 0
        if json_out is not None:
            why = regular_or_absent(json_out)
            if why or not Path(json_out).parent.is_dir():
                raise ConfigError(f"--json {json_out}: cannot write a report there ({why or 'no such folder'})")
        setup_logging(stream="stderr", level=logging.WARNING, fmt="%(levelname)s %(name)s: %(message)s")
        report = check(cfg.data, threads=threads, decode=decode)
        print(format_report(report, first), flush=True)
        if json_out:
            try:
                with replace_atomically(json_out) as f:
                    f.write(json.dumps(dataclasses.asdict(report), indent=1) + "\n")
            except OSError as e:
                raise ConfigError(f"--json {json_out}: cannot write it ({describe_os_error(e)})") from None
    except FastMLGANError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # standard output full or closed
        print(stdout_failed(e), file=sys.stderr)
        return 2
    return 1 if report.fatal else 0


if __name__ == "__main__":
    sys.exit(main())
