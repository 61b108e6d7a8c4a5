"""Entry point: ``python -m fastmlgan.train [...]`` or ``torchrun --nproc_per_node N -m fastmlgan.train [...]``.

Parses the config, builds a Trainer, trains, and always tears down the process group.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from fastmlgan import checkpoint as ckpt
from fastmlgan.config import Config, config_from_dict, parse_args
from fastmlgan.distributed import barrier, destroy_distributed, init_distributed
from fastmlgan.errors import FastMLGANError
from fastmlgan.progress import setup_logging

logger = logging.getLogger("fastmlgan.train")


def resolve_run(cfg: Config, argv: list[str]) -> tuple[Config, Path, dict | None]:
    """The config actually run, its directory, and the checkpoint to resume from (if any)."""
    if not cfg.resume:
        return cfg, Path(cfg.out or f"runs/{cfg.preset}"), None
    state = ckpt.load(cfg.resume, ckpt.RESUME_KEYS)
    run_dir = ckpt.run_dir_of(cfg.resume)
    if not run_dir.is_dir():
        raise FastMLGANError(
            f"--resume {cfg.resume}: give the run directory (the one holding checkpoints/last.pt) "
            "or a checkpoint file inside its checkpoints/ folder"
        )
    saved = config_from_dict(state["config"])
    # Options given with --resume override the saved ones (e.g. more epochs); --resume itself and
    # --out keep pointing at the run being continued.
    explicit = [a[2:].partition("=")[0] for a in argv if a.startswith("--")]
    explicit = [k for k in explicit if k not in ("resume", "out", "preset")]
    merged = saved.to_dict()
    for key in explicit:
        section, _, name = key.partition(".")
        merged[section][name] = getattr(getattr(cfg, section), name)
    merged["resume"] = str(run_dir)
    merged["out"] = str(run_dir)
    resumed = config_from_dict(merged)
    ckpt.check_resume_compatible(saved, resumed)  # before anything is written to run_dir
    return resumed, run_dir, state


def trim_metrics_log(path: Path, last_step: int) -> int:
    """Drop the records a crashed run wrote after its last checkpoint (the resumed run writes
    them again); returns how many. Rewritten atomically."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if (step := _record_step(line)) is not None and step <= last_step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
    return len(lines) - len(keep)


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None  # a line torn by the crash: dropped, or the file would stop being JSON lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    info = None
    trainer = None
    try:
        cfg = parse_args(argv)
        if cfg is None:  # --help
            return 0
        info = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
        setup_logging(info.is_main)
        cfg, out_dir, state = resolve_run(cfg, argv)
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(cfg.to_json() + "\n")
            logger.info("run directory %s", out_dir.resolve())
        from fastmlgan.trainer import Trainer

        trainer = Trainer(cfg, info, out_dir)
        if state is not None:
            trainer.load_state_dict(state)
            if info.is_main:
                dropped = trim_metrics_log(out_dir / "metrics.jsonl", trainer.global_step)
                logger.info(
                    "resumed from %s: phase %s, %d epochs done, step %d (%d log records after it dropped: they are redone)",
                    cfg.resume, trainer.phase, trainer.epoch, trainer.global_step, dropped,
                )
        trainer.fit()
        # Every rank leaves together: a rank tearing its process group down while another still
        # writes results can abort the other's communication threads.
        barrier()
        return 0
    except FastMLGANError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last completed epoch is in the run directory's checkpoints/last.pt", file=sys.stderr)
        return 130
    finally:
        trainer = None  # DDP models go before the process group (see destroy_distributed)
        destroy_distributed()


def exit_after_distributed_run(code: int) -> None:
    """Leave a multi-process run without interpreter finalization.

    Everything the run writes is flushed (checkpoints are fsync'd) by now. At finalization gloo's
    C++ threads can still hold work objects whose tensors need the GIL, and the process aborts
    with "terminate called without an active exception" after a successful run (seen here with
    torch 2.14 in 3 of about 20 two-rank runs; pytorch/pytorch#179291 describes the mechanism).
    A launcher would then report a failed run, so skip that teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_after_distributed_run(exit_code)
    raise SystemExit(exit_code)
