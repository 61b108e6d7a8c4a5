"""The run folder's rules: which folder a run writes (``--out``, ``--resume``), when a folder may
take a run, what ``--overwrite`` moves aside, the resolved config it holds, and continuing a run
(from its last good checkpoint, or after a ``torchrun --max-restarts`` restart).

Runs never mix: a non-empty ``--out`` is refused unless the run is continued (``--resume``) or
started over (``--overwrite``). ``--overwrite`` moves the old content aside to
``<out>.replaced-<time>`` (nothing is deleted; remove it when no longer needed), and only when the
directory holds a fastmlgan run (config.json, metrics.jsonl or checkpoints/). The directory is
created only once the Trainer is built (``commands/train.py``), so a run that fails on its data
or options leaves nothing behind; a run that fails after that but before its first step removes
what it wrote (``RunDir.discard``; an overwritten run is put back).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from fastmlgan.config import Config, config_from_dict
from fastmlgan.errors import FastMLGANError
from fastmlgan.train import checkpoint as ckpt
from fastmlgan.train.runlog import METRICS_LOG, run_record

logger = logging.getLogger("fastmlgan.train")

CONFIG = "config.json"
# What marks a directory as a fastmlgan run (the only kind --overwrite may move aside).
RUN_MARKERS = (CONFIG, METRICS_LOG, ckpt.CHECKPOINT_DIR)


def restart_count() -> int:
    """This host's ``TORCHELASTIC_RESTART_COUNT`` (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def elastic_restart(cfg: Config, restarts: int) -> Config:
    """Under ``torchrun --max-restarts N`` a failed worker restarts the whole job with the same
    arguments: continue the run from its last checkpoint rather than refusing its directory (or,
    when it died before its first checkpoint, start it over).

    ``restarts`` is the largest ``TORCHELASTIC_RESTART_COUNT`` of all ranks: each host's agent
    counts only its own workers' failures, so after host B's worker died, host A's workers start
    again with a count of 0 (pytorch/pytorch#108158; issue 22: rank 0 on host A refused the run
    directory as "not empty")."""
    if not restarts or cfg.resume:
        return cfg
    out = Path(cfg.out or f"runs/{cfg.preset}")
    if (out / ckpt.CHECKPOINT_DIR / ckpt.LAST).is_file():
        logger.warning("torchrun restart %d: resuming %s from its last checkpoint", restarts, out)
        return dataclasses.replace(cfg, resume=str(out), out=str(out))
    if out.is_dir() and any(out.iterdir()):
        logger.warning("torchrun restart %d: %s has no checkpoint yet; starting it over", restarts, out)
        return dataclasses.replace(cfg, overwrite=True)
    return cfg


def resolve_run(cfg: Config, argv: list[str]) -> tuple[Config, Path, dict | None, Path | None]:
    """The config actually run, its directory, and the checkpoint to resume from with its path
    (the newest good one: a damaged last.pt falls back to the step file before it)."""
    if not cfg.resume:
        return cfg, Path(cfg.out or f"runs/{cfg.preset}"), None, None
    state, checkpoint, _ = ckpt.load_latest_good(cfg.resume, ckpt.RESUME_KEYS)
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
    return resumed, run_dir, state, checkpoint


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


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def check_run_dir(cfg: Config, out_dir: Path) -> str | None:
    """Why ``out_dir`` cannot take this run (None: it can)."""
    if cfg.resume or not out_dir.exists():
        return None
    if not out_dir.is_dir():
        return f"--out {out_dir} is {'a file' if out_dir.is_file() else 'not a regular file'}, not a directory"
    content = sorted(p.name for p in out_dir.iterdir())
    if not content:
        return None
    if not cfg.overwrite:
        shown = ", ".join(content[:5]) + (", ..." if len(content) > 5 else "")
        return (
            f"run directory {out_dir} is not empty ({shown}): continue that run with --resume {out_dir}, "
            f"start it over with --overwrite (the old content is moved to {out_dir.name}.replaced-<time>), "
            "or give another --out"
        )
    if not is_run_dir(out_dir):
        return (
            f"--overwrite: {out_dir} is not empty and holds no fastmlgan run (no {', '.join(RUN_MARKERS)}); "
            "it is left alone: give another --out"
        )
    if Path.cwd().resolve().is_relative_to(out_dir.resolve()):
        return f"--overwrite: {out_dir} holds the current directory; run from elsewhere or give another --out"
    return None


class RunDir:
    """The run directory as this process found it, so that a run failing before its first step can
    leave it as it was."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created = False
        self.moved_to: Path | None = None
        self.written: list[Path] = []

    def create(self, overwrite: bool) -> None:
        if overwrite and self.path.is_dir() and any(self.path.iterdir()):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
            n = 1
            while target.exists():
                target = self.path.with_name(f"{self.path.name}.replaced-{stamp}-{n}")
                n += 1
            os.replace(self.path, target)  # a rename: nothing is copied or deleted
            self.moved_to = target
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)

    def new_file(self, name: str) -> Path:
        """``name`` in the directory, remembered for ``discard`` when this process creates it."""
        path = self.path / name
        if not path.exists():
            self.written.append(path)
        return path

    def discard(self) -> None:
        """Remove what this process wrote, the directory if it created it and it is now empty, and
        put back the run that --overwrite moved aside."""
        for path in self.written:
            path.unlink(missing_ok=True)
        if self.created:
            try:
                self.path.rmdir()
            except OSError:  # something else appeared in it: keep it
                return
        if self.moved_to is not None and not self.path.exists():
            os.replace(self.moved_to, self.path)


def write_config(path: Path, cfg: Config, argv: list[str], world_size: int) -> None:
    """The resolved config and, under ``run``, what ran it (``--config`` and config_from_dict skip
    ``run``). A resumed run keeps the earlier invocations' records in ``run.history``."""
    record = run_record(argv, world_size)
    if path.is_file():
        try:
            earlier = json.loads(path.read_text()).get("run")
        except (OSError, ValueError, AttributeError):
            earlier = None
        if isinstance(earlier, dict):
            record["history"] = [*earlier.pop("history", []), earlier]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**cfg.to_dict(), "run": record}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def run_folder(cfg: Config) -> Path:
    """The run folder ``cfg`` writes: the one ``--resume`` continues, else ``--out``."""
    return ckpt.run_dir_of(cfg.resume) if cfg.resume else Path(cfg.out or f"runs/{cfg.preset}")
