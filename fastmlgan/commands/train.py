"""``fastmlgan train [...]``, ``python -m fastmlgan.train [...]`` or ``torchrun --nproc_per_node N -m
fastmlgan.train [...]``: parse the config, check the run directory (``train.rundir``), build a
Trainer, create the run directory, train, write the per-class table and the curves, and always
tear down the process group.
"""

from __future__ import annotations

import logging
import os
import sys

from fastmlgan.config import parse_args
from fastmlgan.distributed import (
    all_gather_objects,
    barrier,
    broadcast_object,
    destroy_distributed,
    init_distributed,
)
from fastmlgan.errors import FastMLGANError
from fastmlgan.logs import setup_logging
from fastmlgan.metrics import format_table
from fastmlgan.safeio import RunLock, describe_os_error, one_line
from fastmlgan.train.preemption import RunSignals, StoppedOutsideTraining, StopRequested
from fastmlgan.train.rundir import (
    CONFIG,
    RunDir,
    check_run_dir,
    elastic_restart,
    resolve_run,
    restart_count,
    run_folder,
    trim_metrics_log,
    write_config,
)
from fastmlgan.train.runlog import METRICS_LOG, TRAIN_LOG, LogFile, RunLog, require_tensorboard
from fastmlgan.train.selection import table_rows
from fastmlgan.train.trainer import Trainer

logger = logging.getLogger("fastmlgan.train")


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
        # Rank 0 decides on what it sees, with the largest restart count of all hosts (see elastic_restart).
        restarts = max(all_gather_objects(restart_count(), info))
        cfg = broadcast_object(elastic_restart(cfg, restarts) if info.is_main else None, info)
        cfg, out_dir, state, resumed_from = resolve_run(cfg, argv)
        # Rank 0 decides for everyone: the ranks of other nodes may not see its file system.
        refusal = broadcast_object(check_run_dir(cfg, out_dir) if info.is_main else None, info)
        if refusal:
            raise FastMLGANError(refusal)
        if cfg.log.tensorboard and info.is_main:
            require_tensorboard()
        trainer = Trainer(cfg, info, out_dir)
        if state is not None:
            trainer.load_state_dict(state)
            trainer.checkpointer.resumed_from(resumed_from)
        start_step = trainer.state.global_step
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
                dropped = trim_metrics_log(out_dir / METRICS_LOG, trainer.state.global_step)
                logger.info(
                    "resumed from %s: phase %s, %d epochs done, step %d (%d log records after it dropped: they are redone)",
                    cfg.resume, trainer.state.phase, trainer.state.epoch, trainer.state.global_step, dropped,
                )
            trainer.run_log = RunLog(out_dir, cfg.log.tensorboard, cfg.log.plots, log_file, start_step)
        signals.describe = lambda t=trainer: (
            f"stopped after training, while writing the results; the final checkpoint is {t.checkpointer.last}: "
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
            model = list(rows)[-1]
            rows.update(table_rows(trainer.selection, {"baseline": cfg.model.backbone, "gan": "+ WGAN-gp"}))
            trainer.run_log.finish(results, scores, targets, trainer.class_names, model=model, summary=format_table(rows))
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
            f"; the last checkpoint is {trainer.checkpointer.last}" if trainer is not None and trainer.checkpointer.last else ""
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
        last = trainer.checkpointer.last if trainer is not None else None
        report(f"aborted; the last checkpoint is {last}" if last else "aborted before any checkpoint was written")
        return 130
    finally:
        signals.defer()  # a signal now (torchrun stopping the other ranks) must not break the clean-up
        try:
            if run_dir is not None and not finished and (trainer is None or trainer.state.global_step == start_step):
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


def run_as_script() -> None:
    """``python -m fastmlgan.train`` / ``torchrun -m fastmlgan.train`` (``train/__main__.py``)."""
    exit_code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_after_distributed_run(exit_code)
    raise SystemExit(exit_code)


if __name__ == "__main__":
    run_as_script()
