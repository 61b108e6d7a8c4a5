"""Entry point: ``fastmlgan train [...]``, ``python -m fastmlgan.train [...]`` or
``torchrun --nproc_per_node N -m fastmlgan.train [...]``.

Parses the config, checks the run directory, builds a Trainer, creates the run directory, trains,
writes the per-class table and the curves, and always tears down the process group.

Runs never mix: a non-empty ``--out`` is refused unless the run is continued (``--resume``) or
started over (``--overwrite``). ``--overwrite`` moves the old content aside to
``<out>.replaced-<time>`` (nothing is deleted; remove it when no longer needed), and only when the
directory holds a fastmlgan run (config.json, metrics.jsonl or checkpoints/). The directory is
created only once the Trainer is built, so a run that fails on its data or options leaves
nothing behind; a run that fails after that but before its first step removes what it wrote
(and puts an overwritten run back).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from fastmlgan import checkpoint as ckpt
from fastmlgan.config import Config, config_from_dict, parse_args
from fastmlgan.distributed import barrier, broadcast_object, destroy_distributed, init_distributed
from fastmlgan.errors import FastMLGANError
from fastmlgan.preemption import RunSignals, StoppedOutsideTraining, StopRequested
from fastmlgan.progress import setup_logging
from fastmlgan.runlog import METRICS_LOG, TRAIN_LOG, LogFile, RunLog, require_tensorboard, run_record
from fastmlgan.safeio import RunLock, describe_os_error, one_line

logger = logging.getLogger("fastmlgan.train")

CONFIG = "config.json"
# What marks a directory as a fastmlgan run (the only kind --overwrite may move aside).
RUN_MARKERS = (CONFIG, METRICS_LOG, ckpt.CHECKPOINT_DIR)


def elastic_restart(cfg: Config) -> Config:
    """Under ``torchrun --max-restarts N`` a failed worker restarts the whole job with the same
    arguments: continue the run from its last checkpoint rather than refusing its directory (or,
    when it died before its first checkpoint, start it over)."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
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


def report(line: str) -> None:
    """The run's closing line (an error, a stop) on stderr; under ``fastmlgan train --nproc`` into
    the launcher's folder instead, which prints each distinct line once (``cli.launch_torchrun``)."""
    folder = os.environ.get("FASTMLGAN_ERROR_DIR")
    if folder and os.path.isdir(folder):
        with open(os.path.join(folder, f"rank-{int(os.environ.get('RANK', '0'))}.txt"), "a") as f:
            f.write(line + "\n")
        return
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    info = None
    trainer = None
    log_file = None
    run_dir = None
    lock = None
    start_step = 0
    finished = False
    # SIGTERM / Ctrl-C before the training loop (start-up, a cache build) and after it (the final
    # evaluation and results): one line and exit 143 / 130; fit() handles them between steps.
    signals = RunSignals()
    signals.install()
    try:
        cfg = parse_args(argv, prog="fastmlgan train")
        if cfg is None:  # --help
            return 0
        info = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
        setup_logging(info.is_main)
        if info.is_main:
            log_file = LogFile()
            logging.getLogger().addHandler(log_file)
        # One run per run folder: the lock comes before anything reads or writes it (rank 0 takes
        # it; its outcome is every rank's).
        error = None
        if info.is_main:
            try:
                lock = RunLock(run_folder(cfg)).acquire("--resume" if cfg.resume else "--out")
            except FastMLGANError as e:
                error = str(e)
        error = broadcast_object(error, info)
        if error:
            raise FastMLGANError(error)
        cfg, out_dir, state, resumed_from = resolve_run(elastic_restart(cfg), argv)
        # Rank 0 decides for everyone: the ranks of other nodes may not see its file system.
        refusal = broadcast_object(check_run_dir(cfg, out_dir) if info.is_main else None, info)
        if refusal:
            raise FastMLGANError(refusal)
        if cfg.log.tensorboard and info.is_main:
            require_tensorboard()
        from fastmlgan.trainer import Trainer

        trainer = Trainer(cfg, info, out_dir)
        if state is not None:
            trainer.load_state_dict(state)
            trainer.last_checkpoint = resumed_from
            trainer.checkpoints.append((trainer.global_step, resumed_from))
        start_step = trainer.global_step
        error = None
        if info.is_main:
            try:
                run_dir = RunDir(out_dir)
                run_dir.create(cfg.overwrite and state is None)
                write_config(run_dir.new_file(CONFIG), cfg, argv, info.world_size)
                log_file.open(run_dir.new_file(TRAIN_LOG))
            except OSError as e:  # read-only, full disk, a file where the folder should be
                error = f"--out {out_dir}: cannot write the run directory ({e.strerror or e}); pick another --out"
        # Rank 0's outcome for every rank: the others would otherwise wait for it forever.
        error = broadcast_object(error, info)
        if error:
            raise FastMLGANError(error)
        if info.is_main:
            logger.info("run directory %s", out_dir.resolve())
            if run_dir.moved_to is not None:
                logger.info("--overwrite: the previous run in it is now %s", run_dir.moved_to)
            if state is not None:
                dropped = trim_metrics_log(out_dir / METRICS_LOG, trainer.global_step)
                logger.info(
                    "resumed from %s: phase %s, %d epochs done, step %d (%d log records after it dropped: they are redone)",
                    cfg.resume, trainer.phase, trainer.epoch, trainer.global_step, dropped,
                )
            trainer.run_log = RunLog(out_dir, cfg.log.tensorboard, cfg.log.plots, log_file, start_step)
        signals.describe = lambda t=trainer: (
            f"stopped after training, while writing the results; the final checkpoint is {t.last_checkpoint}: "
            f"fastmlgan train --resume {out_dir} writes metrics.json, the per-class table and curves.png again"
        )
        results = trainer.fit()
        if trainer.stop_control.signum is not None:  # it came after the last step, during the last evaluation
            raise StoppedOutsideTraining(trainer.stop_control.signum, signals.describe())
        # The per-class table of the final generator: fit() evaluated it last (a finished run
        # resumed with nothing left to train has to predict once more).
        if trainer.last_predictions is None:
            trainer.last_predictions = trainer.predict()
        scores, targets = trainer.last_predictions
        if info.is_main:
            rows = {cfg.model.backbone: results["baseline"]}
            if results["gan"] is not None:
                rows["+ WGAN-gp"] = results["gan"]
            from fastmlgan.metrics import format_table

            trainer.run_log.finish(
                results, scores, targets, trainer.class_names, model=list(rows)[-1], summary=format_table(rows)
            )
        # Every rank leaves together: a rank tearing its process group down while another still
        # writes results can abort the other's communication threads.
        barrier()
        finished = True
        return 0
    except FastMLGANError as e:
        message = f"error: {one_line(e)}"
        if log_file is not None:
            log_file.write_line(message)
        report(message)
        return 2
    except OSError as e:  # the run folder or the data changed under the run (removed, read-only, full)
        message = f"error: {e.filename or 'a file'}: {describe_os_error(e)}" + (
            f"; the last checkpoint is {trainer.last_checkpoint}" if trainer is not None and trainer.last_checkpoint else ""
        )
        report(message)
        return 2
    except StopRequested as e:
        # SIGTERM / the first Ctrl-C: the trainer finished its step and checkpointed it (or there
        # was no step to finish: StoppedOutsideTraining says what was saved).
        message = f"{e}" + (f"; continue with --resume {trainer.out_dir}" if e.checkpoint else "")
        if log_file is not None:
            log_file.write_line(message)
        if info is None or info.is_main:  # rank 0 wrote the checkpoint; the others know no path to name
            report(message)
        finished = not isinstance(e, StoppedOutsideTraining)
        return e.exit_code
    except KeyboardInterrupt:
        # A second Ctrl-C: no checkpoint of this step.
        last = trainer.last_checkpoint if trainer is not None else None
        report(f"aborted; the last checkpoint is {last}" if last else "aborted before any checkpoint was written")
        return 130
    finally:
        signals.defer()  # a signal now (torchrun stopping the other ranks) must not break the clean-up
        try:
            if run_dir is not None and not finished and (trainer is None or trainer.global_step == start_step):
                run_dir.discard()  # failed before its first step: leave no half-made run behind
            if trainer is not None and trainer.run_log is not None:
                trainer.run_log.close()
            if log_file is not None:
                logging.getLogger().removeHandler(log_file)
                log_file.close()
            trainer = None  # DDP models go before the process group (see destroy_distributed)
            destroy_distributed()
        finally:
            if lock is not None:
                lock.release()
            signals.uninstall()


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
