"""What a training run leaves to look at, beside its checkpoints (rank 0 only).

- ``metrics.jsonl``: one JSON record per log step (losses, data-wait share, img/s) and per
  evaluation, appended as they happen (``RunLog.write``);
- ``tensorboard/``: the same numbers as TensorBoard scalars with ``--log.tensorboard true``;
- ``train.log``: every line the loggers print on rank 0, the loss records and the final tables
  (``LogFile``);
- at the end (``RunLog.finish``): a per-class table (P, R, F1, AP per class name) of the final
  generator in ``metrics.json`` and printed, and ``curves.png``, the loss and F1 curves
  (``--log.plots``; skipped with a log line when matplotlib is missing);
- ``config.json``'s ``run`` record (``run_record``): versions, git revision, command line, world size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastmlgan.environment import git_revision, versions
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.metrics import format_per_class, per_class_metrics
from fastmlgan.safeio import describe_os_error, replace_atomically

logger = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"
RESULTS = "metrics.json"
TRAIN_LOG = "train.log"
TENSORBOARD_DIR = "tensorboard"
CURVES = "curves.png"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Keys of a log-step record that are not losses.
_STEP_FIELDS = ("phase", "epoch", "step", "data_wait_frac", "bad_images", "img_per_s")
# Per-epoch metrics worth a curve (the num_* counts are constant).
_EVAL_SCALARS = ("C-P", "C-R", "C-F1", "O-P", "O-R", "O-F1", "mAP", "avg_labels", "cooc_dist")


# ----------------------------------------------------------------------------------------------
# The environment of a run


def run_record(options: Sequence[str], world_size: int) -> dict[str, Any]:
    """config.json's ``run`` entry: what ran, where and with what (``config_from_dict`` and
    ``--config`` ignore it)."""
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "options": list(options),
        "world_size": world_size,
        # torchrun's number of agents, one per node
        "num_nodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
        "hostname": socket.gethostname(),
        "versions": versions(),
        "git_revision": git_revision(),
    }


# ----------------------------------------------------------------------------------------------
# train.log


class LogFile(logging.Handler):
    """train.log: every record logged on rank 0. The run directory is created only once the
    Trainer is built (a run that fails earlier leaves nothing behind), so records logged before
    ``open`` are kept and written first."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
        self._pending: list[str] = []
        self._file = None
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never stop the run
            self.handleError(record)

    def write_line(self, line: str) -> None:
        if self._file is None:
            if self.path is None:
                self._pending.append(line)
            return
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: the run goes on (its checkpoint writes will say more)
            self._file = None
            print(f"warning: cannot write {self.path} ({describe_os_error(e)}); its lines go to the terminal only",
                  file=sys.stderr, flush=True)

    def open(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")  # kept open for the run
        for line in self._pending:
            self._file.write(line + "\n")
        self._pending.clear()
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        super().close()


# ----------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard


def require_tensorboard() -> None:
    """Fail before training when ``--log.tensorboard true`` cannot be honoured."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--log.tensorboard true needs the tensorboard package: pip install 'fastmlgan[tb]' "
            "(or pip install tensorboard), or leave --log.tensorboard false"
        ) from None


class RunLog:
    """The run directory's records. ``write`` appends a record to metrics.jsonl (and TensorBoard);
    ``finish`` writes the per-class table and the curves."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        tensorboard: bool = False,
        plots: bool = True,
        log_file: LogFile | None = None,
        start_step: int | None = None,
    ) -> None:
        """``start_step``: the global step this process starts from, so that the first log line's
        img/s has its step count (None: that line has no img/s)."""
        self.out_dir = Path(out_dir)
        self.tensorboard = tensorboard
        self.plots = plots
        self.log_file = log_file
        self._writer = None
        self._last_step_line: tuple[int | None, float | None] = (start_step, None)
        if tensorboard:
            require_tensorboard()

    def write(self, record: dict[str, Any], epoch_start: float | None = None, images_per_step: int = 0) -> None:
        """Append ``record``. A log-step record (with ``epoch_start``, the epoch's start on
        ``time.perf_counter``, and the images one step draws) gets ``img_per_s`` first."""
        if epoch_start is not None and images_per_step:
            rate = self._images_per_second(record["step"], epoch_start, images_per_step)
            if rate is not None:
                record["img_per_s"] = round(rate, 2)
        try:
            with open(self.out_dir / METRICS_LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise run_folder_error(self.out_dir / METRICS_LOG, e) from None
        if self.log_file is not None and "split" not in record:
            self.log_file.write_line(_step_line(record))
        if self.tensorboard:
            self._scalars(record)

    def _images_per_second(self, step: int, epoch_start: float, images_per_step: int) -> float | None:
        """Images per second since the previous log line, or since the epoch's start for its first
        line. Every epoch ends on a logged step, so the previous line's step is where this epoch
        began, whatever happened in between (evaluation, checkpoints)."""
        now = time.perf_counter()
        last_step, last_time = self._last_step_line
        self._last_step_line = (step, now)
        since = epoch_start if last_time is None or last_time < epoch_start else last_time
        if last_step is None or now <= since:
            return None
        return (step - last_step) * images_per_step / (now - since)

    def _scalars(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR))
        step = int(record["step"])
        for tag, value in scalar_tags(record).items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def finish(
        self,
        results: dict[str, Any],
        scores,
        targets,
        class_names: Sequence[str],
        model: str,
        summary: str | None = None,
    ) -> dict[str, Any]:
        """At the end of a run: the per-class table of the final generator (``scores``,
        ``targets``: its evaluation) into metrics.json and on stdout, ``summary`` (the paper's
        table) and the per-class table into train.log, and curves.png. Returns the results."""
        classes = per_class_metrics(scores, targets, class_names)
        results = {
            **results,
            "per_class": {
                "model": model,
                "threshold": 0.5,
                "num_without_positives": sum(c["positives"] == 0 for c in classes),
                "classes": classes,
            },
        }
        try:
            with replace_atomically(self.out_dir / RESULTS) as f:
                f.write(json.dumps(results, indent=2) + "\n")
        except OSError as e:
            raise run_folder_error(self.out_dir / RESULTS, e) from None
        # The title does not repeat the row name: scripts count the summary table's rows in stdout.
        table = format_per_class(classes, title="per class, the final generator (threshold 0.5)")
        print(table, flush=True)
        if self.log_file is not None:
            for text in (summary, table):
                if text:
                    self.log_file.write_line(text)
        if self.plots:
            try:
                self.draw_curves()
            except OSError as e:
                raise run_folder_error(self.out_dir / CURVES, e) from None
        return results

    def draw_curves(self) -> dict[str, dict[str, tuple[list[int], list[float]]]] | None:
        """curves.png from metrics.jsonl; the plotted series, or None without matplotlib."""
        records = read_records(self.out_dir / METRICS_LOG)
        try:
            return plot_curves(records, self.out_dir / CURVES)
        except ImportError:
            logger.info("matplotlib is not installed: no %s (pip install 'fastmlgan[plots]')", CURVES)
            return None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def run_folder_error(path: Path, e: OSError) -> FastMLGANError:
    """A write into the run folder failed mid-run: removed, made read-only or full."""
    return FastMLGANError(
        f"cannot write {path} ({describe_os_error(e)}): the run folder was removed, made read-only or filled up "
        "while the run went on; the checkpoints written so far are in its checkpoints/ folder, if it is still there"
    )


def scalar_tags(record: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard tag → value of one metrics.jsonl record: ``loss/*``, ``speed/*`` and
    ``data/bad_images`` for a log step; ``val/*`` and ``val_top3/*`` for an evaluation."""
    tags: dict[str, float] = {}
    if record.get("split") == "val":
        for key in _EVAL_SCALARS:
            if key in record:
                tags[f"val/{key}"] = float(record[key])
        for key, value in (record.get("top3") or {}).items():
            tags[f"val_top3/{key}"] = float(value)
        return tags
    for key, value in record.items():
        if key not in _STEP_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[f"loss/{key}"] = float(value)
    for key in ("data_wait_frac", "img_per_s"):
        if key in record:
            tags[f"speed/{key}"] = float(record[key])
    if "bad_images" in record:
        tags["data/bad_images"] = float(record["bad_images"])
    return tags


def _step_line(record: Mapping[str, Any]) -> str:
    values = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("phase", "epoch", "step"))
    return f"{record.get('phase')} epoch {record.get('epoch')} step {record.get('step')}: {values}"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a torn last line, from a crash, is skipped)."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# The panels of curves.png: the generator's losses (L_logistic over both phases, eq. 1, and its
# adversarial term, eq. 3), the discriminator's (eq. 4: the Wasserstein estimate, the penalty and
# their sum) and the evaluations' F1. loss_g (α·BCE + adversarial) would dwarf the rest.
CURVE_PANELS = {
    "generator": ("bce", "g_adversarial"),
    "discriminator": ("wasserstein", "gp", "loss_d"),
    "f1": ("C-F1", "O-F1"),
}


def plot_curves(records: Sequence[Mapping[str, Any]], path: Path) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """curves.png: one panel per CURVE_PANELS entry over the global step, a dotted line where phase
    2 starts. Returns the plotted series, {panel: {name: (steps, values)}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {panel: {} for panel in CURVE_PANELS}
    gan_start = None
    for record in records:
        step = int(record.get("step", 0))
        is_eval = record.get("split") == "val"
        if not is_eval and record.get("phase") == "gan" and gan_start is None:
            gan_start = step
        for panel, keys in CURVE_PANELS.items():
            if (panel == "f1") != is_eval:
                continue
            for key in keys:
                if isinstance(record.get(key), (int, float)):
                    steps, values = series[panel].setdefault(key, ([], []))
                    steps.append(step)
                    values.append(float(record[key]))

    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(13, 3.6), dpi=100)
    titles = {"generator": "G: BCE and adversarial term", "discriminator": "D: Wasserstein, penalty, loss", "f1": "evaluation F1 (%)"}
    for ax, (panel, lines) in zip(axes, series.items()):
        for name, (steps, values) in lines.items():
            # Markers while points are few: a single logged step would draw no line.
            ax.plot(steps, values, label=name, linewidth=1, marker="o" if len(steps) < 50 else None, markersize=3)
        ax.set_title(titles[panel], fontsize=9)
        if gan_start is not None:
            ax.axvline(gan_start, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return series
