"""The runner: every (seed, row) pair, one phase-1 run per seed shared by its GAN rows, each
finished row appended to ``results.jsonl`` so that a rerun with the same ``--out`` resumes."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmlgan import __version__
from fastmlgan import environment as host_environment
from fastmlgan.config import Config, config_from_dict
from fastmlgan.data.factory import build_eval_loader, build_splits
from fastmlgan.data.sources import SOURCES
from fastmlgan.data.types import Splits
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import ConfigError
from fastmlgan.metrics import compute_metrics
from fastmlgan.models import build_feature_extractor, build_generator
from fastmlgan.reproduce import plots, protocol
from fastmlgan.reproduce.diagnostics import discriminator_diagnostics, summarize_d_log
from fastmlgan.reproduce.mechanism import mechanism_record
from fastmlgan.reproduce.protocol import VAL_STREAM, VARIANTS, HarnessOptions, seed_splits
from fastmlgan.reproduce.tables import Records, duration_text, render_markdown, selected_records, summarize
from fastmlgan.safeio import describe_os_error, read_json, read_text
from fastmlgan.scoring import amp_dtype, predict
from fastmlgan.train import checkpoint as ckpt
from fastmlgan.train import feature_cache
from fastmlgan.train.steps import TrainingSteps
from fastmlgan.train.trainer import Trainer

logger = logging.getLogger("fastmlgan.reproduce")


# ----------------------------------------------------------------------------------------------
# The trainer of one row


class LogisticControlSteps(TrainingSteps):
    """The control row's steps: phase 2's G updates on L_logistic alone, on the images the G
    updates would see (the D updates' batches are drawn and left unused); D is never trained."""

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.layout.generator_rows()
        return self.bce_step({k: v[g] for k, v in batch.items()})  # opt_g is at g_lr in phase 2


class SelectingTrainer(Trainer):
    """A Trainer that keeps its validation curve and the state at the selected epoch.

    ``Trainer.evaluate`` runs on ``splits.val`` at the end of every ``eval_every``-th epoch (after
    counting it) and of each phase; that is the hook. ``keep="phase1"`` snapshots everything
    ``start_from_baseline`` needs; ``keep="generator"`` only G's weights. ``adversarial=False``
    makes phase 2 the control (``LogisticControlSteps``). ``report_ema=True`` scores G's weight
    average (``--train.ema_decay``) instead of G: the curve, the selection and the row's scores.
    """

    def __init__(self, *args, keep: str, adversarial: bool = True, report_ema: bool = False, **kwargs) -> None:
        super().__init__(*args, steps_class=TrainingSteps if adversarial else LogisticControlSteps, **kwargs)
        self.keep = keep
        self.adversarial = adversarial
        self.report_ema = report_ema
        if report_ema and self.steps.ema is None:
            raise ConfigError("a row that reports the weight average needs --train.ema_decay > 0")
        self.curve: list[dict[str, Any]] = []
        self.selected: dict[str, Any] | None = None
        self.selected_state: dict[str, Any] | None = None

    def evaluate(self) -> dict[str, Any]:
        metrics = super().evaluate()
        point = {"phase": self.state.phase, "epoch": self.state.epoch, **metrics}
        self.curve.append(point)
        min_epoch = 1 if (self.state.phase == "gan" or self.cfg.train.bce_epochs > 0) else 0
        best = protocol.select_epoch([p for p in self.curve if p["phase"] == self.state.phase], min_epoch)
        if best is point:
            self.selected = point
            if self.keep == "phase1":
                state = copy.deepcopy(self.state_dict())
                state["baseline_metrics"] = metrics
                self.selected_state = state
            else:
                self.selected_state = copy.deepcopy(self.steps.generator.state_dict())
        return metrics

    @torch.no_grad()
    def predict(self, loader=None) -> tuple[np.ndarray, np.ndarray]:
        if not self.report_ema:
            return super().predict(loader)
        # The harness runs one process: nothing to gather, the average's BN statistics are its own.
        steps = self.steps
        loader = self.eval_loader if loader is None else loader
        return predict(steps.ema.module, loader, self.device, steps.amp_dtype, steps.memory_format)


@contextlib.contextmanager
def _run_log(path: Path, verbose: bool):
    """Send the trainer's progress bars, table and per-epoch log to ``path`` (and stdout if verbose)."""
    if verbose:
        yield
        return
    trainer_logger = logging.getLogger("fastmlgan")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    saved = trainer_logger.propagate
    trainer_logger.addHandler(handler)
    trainer_logger.propagate = False
    try:
        with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield
    finally:
        trainer_logger.removeHandler(handler)
        handler.close()
        trainer_logger.propagate = saved


def _with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    d = cfg.to_dict()
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section in d and isinstance(d[section], dict):
            d[section][name] = value
        else:
            d[key] = value
    return config_from_dict(d)


def _predict_on(trainer, split) -> tuple[np.ndarray, np.ndarray]:
    """σ(G(x)) and targets on ``split``, preprocessed as the trainer's data (features are
    standardised with the statistics of its training split)."""
    loader = build_eval_loader(trainer.cfg.data, Splits(trainer.splits.train, split), trainer.info, trainer.cfg.train.seed)
    return trainer.predict(loader)


def _fresh_dir(path: Path) -> Path:
    if path.exists():  # an unfinished run of an earlier invocation: start it over
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _row_record(seed, name, cfg, trainer, scores, targets, split_info, wall_s, git) -> dict[str, Any]:
    """A finished row as ``results.jsonl`` keeps it (the caller adds the selected epochs)."""
    curve_keys = ("C-F1", "O-F1", "mAP", "avg_labels")
    variant = VARIANTS[name]
    phase = "bce" if variant.overrides is None else "gan"
    # Only the new rows carry these keys: the rows of earlier results folders stay as they were.
    extra = {"phase1_overrides": variant.phase1_overrides()} if variant.phase1_overrides() else {}
    return {
        "seed": seed,
        "variant": name,
        "overrides": VARIANTS[name].overrides,
        "adversarial": VARIANTS[name].adversarial,
        "config": cfg.to_dict(),
        "split": split_info,
        "val": _strip(trainer.selected),
        "val_curve": [
            [p["epoch"], *[round(p[k], 4) for k in curve_keys]] for p in trainer.curve if p["phase"] == phase
        ],
        "val_curve_keys": ["epoch", *curve_keys],
        "test": compute_metrics(scores, targets),
        "test_true_labels_per_image": float(np.asarray(targets).sum(axis=1).mean()),
        "wall_s": round(wall_s, 2),
        "git": git,
        **extra,
    }


def _add_mechanism(record, fit_s, val_scores, val_targets, scores, targets, test) -> None:
    """``fit_s`` and the mechanism measurements (``reproduce.mechanism``) of a finished row; the
    validation scores are the selected G's on the selection split, used to tune thresholds."""
    record["fit_s"] = round(fit_s, 2)
    record["mechanism"] = mechanism_record(val_scores, val_targets, scores, targets, getattr(test, "hidden", None))


def _strip(metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (metrics or {}).items() if k not in ("phase", "epoch")}


# ----------------------------------------------------------------------------------------------
# results.jsonl and the identity of a results folder


class RecordFile:
    """``results.jsonl``: one finished row per line, appended and fsynced as each row ends."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Records:
        """The rows on file; a torn line or a row of a changed variant is left out (it reruns)."""
        records: Records = {}
        if not self.path.exists():
            return records
        for n, line in enumerate(read_text(self.path, "results file").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("seed"), int) or not isinstance(
                    record.get("variant"), str
                ):
                    raise ValueError("not a row")
            except (ValueError, RecursionError):
                logger.warning("%s:%d: unreadable line (an interrupted write?); that row will be rerun", self.path, n)
                continue
            variant = VARIANTS.get(record.get("variant"))
            if (
                variant is None
                or record.get("overrides") != variant.overrides
                or record.get("adversarial", True) != variant.adversarial
                or record.get("phase1_overrides", {}) != variant.phase1_overrides()
            ):
                logger.warning(
                    "%s:%d: row of an unknown or changed variant %r; ignored", self.path, n, record.get("variant")
                )
                continue
            records[(record["seed"], record["variant"])] = record
        return records

    def append(self, record: dict[str, Any]) -> None:
        # A crash mid-write leaves a line without its newline: start on a fresh line after it.
        torn = self.path.is_file() and not self.path.read_bytes().endswith(b"\n")
        torn = torn and self.path.stat().st_size > 0
        with open(self.path, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _identity(cfg: Config, opts: HarnessOptions) -> dict[str, Any]:
    """What a finished row depends on: the config (less seed and run folder) and the split."""
    d = cfg.to_dict()
    d["train"].pop("seed", None)
    for key in ("out", "resume"):
        d.pop(key, None)
    return {"config": d, "val_fraction": opts.val_fraction, "val_stream": VAL_STREAM}


def claim_out_dir(out: Path, cfg: Config, opts: HarnessOptions) -> None:
    """Write ``harness.json`` into a new ``out``, or refuse one that holds another configuration's rows."""
    path = out / "harness.json"
    current = _identity(cfg, opts)
    if path.exists():
        saved = read_json(path, "harness file", ConfigError)
        if saved != current:
            diff = _dict_diff(saved, current)
            raise ConfigError(
                f"{out} holds results of another configuration ({'; '.join(diff[:6])}); "
                "use another --out, or delete the folder to start over"
            )
    else:
        path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    gitignore = out / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# per-run logs, checkpoints and scores; results.* and *.png are the record\nruns/\n")


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


# ----------------------------------------------------------------------------------------------
# The harness


class Harness:
    """Runs the (seed, variant) rows that ``results.jsonl`` lacks, then writes the results."""

    def __init__(self, opts: HarnessOptions, cfg: Config, command: str) -> None:
        self.opts = opts
        self.cfg = cfg
        self.command = command
        self.out = opts.out
        self.runs = self.out / "runs"
        self.record_file = RecordFile(self.out / "results.jsonl")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.info = DistInfo(0, 1, 0, self.device)
        self.t_start = time.perf_counter()
        self.git = git_revision()
        self.run_seconds: list[float] = []

    def run(self) -> dict[str, Any]:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {self.out}: cannot create the results folder ({describe_os_error(e)})") from None
        claim_out_dir(self.out, self.cfg, self.opts)
        self.cfg = self.shared_feature_cache(self.cfg)
        records = self.record_file.load()
        todo = [(s, v) for s in self.opts.seeds for v in self.opts.variants if (s, v) not in records]
        skipped = len(self.opts.seeds) * len(self.opts.variants) - len(todo)
        print(
            f"reproduce: {len(self.opts.seeds)} seeds x {len(self.opts.variants)} rows "
            f"({', '.join(self.opts.variants)}) into {self.out}; {skipped} finished rows found, {len(todo)} to run",
            flush=True,
        )
        self.remaining = len(todo)
        for seed in self.opts.seeds:
            self.run_seed(seed, records)
        return self.write_results(records)

    def shared_feature_cache(self, cfg: Config) -> Config:
        """With pretrained f_ext weights, f_ext is the same network in every row and seed: compute
        its features once, over the whole training split (each seed's fit split is a subset of
        it), and let every run read them (``--gan.feature_cache``)."""
        if not cfg.model.pretrained or SOURCES[cfg.data.dataset].holds_features or not cfg.gan.conditional:
            return cfg
        path = Path(cfg.gan.feature_cache or self.out / "features.cache")
        if not path.exists():
            train = build_splits(cfg.data, self.info).train
            generator = build_generator(cfg.model.backbone, train.num_classes, cfg.model.pretrained,
                                        width=cfg.model.width, depth=cfg.model.depth)
            f_ext = build_feature_extractor(generator, f"pretrained:{cfg.model.pretrained}").to(self.device)
            print(f"reproduce: f_ext features of every training image under its 25 crop windows -> {path}", flush=True)
            feature_cache.build(path, f_ext, train, cfg.data.image_size, self.device, amp_dtype(cfg.precision.amp, self.device),
                                on_bad_image=cfg.data.on_bad_image, num_workers=cfg.data.num_workers)
        return _with_overrides(cfg, {"gan.feature_cache": str(path)})

    def run_seed(self, seed: int, records: Records) -> None:
        """The rows of ``seed`` that ``records`` lacks; a phase 1 (the baseline's, or a row's own:
        ``Variant.phase1``) reruns only if its state is gone, and is recorded as its row."""
        missing = [v for v in self.opts.variants if (seed, v) not in records]
        if not missing:
            return
        splits, test, split_info = seed_splits(self.cfg.data, self.info, self.opts.val_fraction, seed)
        states: dict[str, dict[str, Any]] = {}

        def phase1_of(row: str) -> dict[str, Any]:
            if row not in states:
                path = self.runs / f"seed{seed}" / row / "selected.pt"
                if (seed, row) in records and path.is_file():
                    states[row] = torch.load(path, map_location="cpu", weights_only=True)
                else:
                    record, states[row] = self.run_phase1(seed, splits, test, split_info, row)
                    if (seed, row) not in records:
                        self._finished(record, records)
            return states[row]

        if "baseline" in missing:  # first, as before phase-1 rows of their own existed
            phase1_of("baseline")
        for name in missing:
            variant = VARIANTS[name]
            phase1 = phase1_of(variant.phase1_row())
            if variant.overrides is not None:
                self._finished(self.run_variant(seed, name, splits, test, split_info, phase1), records)

    def _finished(self, record: dict[str, Any], records: Records) -> None:
        self.record_file.append(record)
        records[(record["seed"], record["variant"])] = record
        self.remaining -= 1
        self.run_seconds.append(record["wall_s"])
        elapsed = time.perf_counter() - self.t_start
        eta = ""
        if self.run_seconds and self.remaining:
            eta = f", ETA {duration_text(np.mean(self.run_seconds) * self.remaining)}"
        print(f"[{duration_text(elapsed)}] {_describe(record)} ({self.remaining} runs left{eta})", flush=True)

    def run_phase1(self, seed: int, splits, test, split_info, name: str = "baseline") -> tuple[dict[str, Any], dict[str, Any]]:
        """A phase-1 row (the baseline: BCE training), the selected epoch's state kept for the GAN rows."""
        variant = VARIANTS[name]
        run_dir = _fresh_dir(self.runs / f"seed{seed}" / name)
        overrides = {"gan.enable": False, "train.seed": seed, "checkpoint.enable": False, "out": str(run_dir)}
        cfg = _with_overrides(self.cfg, {**variant.phase1_overrides(), **overrides})
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        t0 = time.perf_counter()
        with _run_log(run_dir / "train.log", self.opts.verbose):
            trainer = SelectingTrainer(cfg, self.info, run_dir, splits, keep="phase1", report_ema=variant.report_ema)
            t_fit = time.perf_counter()
            trainer.fit()
            fit_s = time.perf_counter() - t_fit
            state = trainer.selected_state
            trainer.steps.generator.load_state_dict(state["generator"])
            if variant.report_ema:
                trainer.steps.ema.module.load_state_dict(state["ema"]["weights"])
            val_scores, val_targets = _predict_on(trainer, splits.val)
            scores, targets = _predict_on(trainer, test)
        (run_dir / ckpt.CHECKPOINT_DIR / "baseline.pt").unlink(missing_ok=True)  # the last epoch; not the selected one
        ckpt.save_atomic(state, run_dir / "selected.pt")
        record = _row_record(seed, name, cfg, trainer, scores, targets, split_info, time.perf_counter() - t0, self.git)
        record["selected_epochs"] = {"bce": trainer.selected["epoch"]}
        _add_mechanism(record, fit_s, val_scores, val_targets, scores, targets, test)
        np.savez_compressed(run_dir / "test_scores.npz", scores=scores, targets=targets)
        np.savez_compressed(run_dir / "val_scores.npz", scores=val_scores, targets=val_targets)
        del trainer
        gc.collect()
        return record, state

    def run_variant(self, seed: int, name: str, splits, test, split_info, phase1: dict[str, Any]) -> dict[str, Any]:
        """A GAN row (or the control) from the seed's selected phase-1 state."""
        variant = VARIANTS[name]
        run_dir = _fresh_dir(self.runs / f"seed{seed}" / name)
        overrides = {"gan.enable": True, "train.seed": seed, "checkpoint.enable": False, "out": str(run_dir)}
        cfg = _with_overrides(self.cfg, {**variant.phase1_overrides(), **variant.overrides, **overrides})
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        t0 = time.perf_counter()
        with _run_log(run_dir / "train.log", self.opts.verbose):
            trainer = SelectingTrainer(
                cfg, self.info, run_dir, splits, keep="generator", adversarial=variant.adversarial
            )
            # A copy: Optimizer.load_state_dict keeps the given moment tensors (no copy when dtype
            # and device match) and Adam updates them in place, so without it each row would start
            # from the optimizer state the previous row of this seed left behind.
            trainer.start_from_baseline(copy.deepcopy(phase1))
            t_fit = time.perf_counter()
            trainer.fit()
            fit_s = time.perf_counter() - t_fit
            diagnostics = discriminator_diagnostics(trainer) if variant.adversarial else {}
            trainer.steps.generator.load_state_dict(trainer.selected_state)
            val_scores, val_targets = _predict_on(trainer, splits.val)
            scores, targets = _predict_on(trainer, test)
        record = _row_record(seed, name, cfg, trainer, scores, targets, split_info, time.perf_counter() - t0, self.git)
        record["selected_epochs"] = {"bce": phase1["epoch"], "gan": trainer.selected["epoch"]}
        record["d_log"] = summarize_d_log(run_dir / "metrics.jsonl")
        record["d_diagnostics"] = diagnostics
        _add_mechanism(record, fit_s, val_scores, val_targets, scores, targets, test)
        np.savez_compressed(run_dir / "test_scores.npz", scores=scores, targets=targets)
        np.savez_compressed(run_dir / "val_scores.npz", scores=val_scores, targets=val_targets)
        del trainer
        gc.collect()
        return record

    def write_results(self, records: Records) -> dict[str, Any]:
        """results.json, results.md and the plots of the rows this invocation asked for."""
        rows = selected_records(records, self.opts)
        results = summarize(records, self.opts, self.cfg)
        results["command"] = self.command
        results["environment"] = environment(self.device)
        unrecorded = "not recorded (rows older than per-row recording)"
        results["row_revisions"] = sorted({r.get("git", unrecorded) for r in rows})
        results["wall_s"] = {
            "this_invocation": round(time.perf_counter() - self.t_start, 1),
            "sum_of_rows": round(sum(r["wall_s"] for r in rows), 1),
        }
        if self.opts.plots:
            results["plots"] = write_plots(results, self.opts, self.cfg, self.info)
        (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (self.out / "results.md").write_text(render_markdown(results))
        return results


def _describe(record: dict[str, Any]) -> str:
    sel = record["selected_epochs"]
    chosen = f"bce epoch {sel['bce']}" + (f", gan epoch {sel['gan']}" if "gan" in sel else "")
    return (
        f"seed {record['seed']} {record['variant']}: {chosen} (val C-F1 {record['val']['C-F1']:.1f}); "
        f"test C-F1 {record['test']['C-F1']:.1f} O-F1 {record['test']['O-F1']:.1f} "
        f"mAP {record['test']['mAP']:.1f} labels/img {record['test']['avg_labels']:.2f} [{record['wall_s']:.0f}s]"
    )


def write_plots(results: dict[str, Any], opts: HarnessOptions, cfg: Config, info: DistInfo) -> dict[str, str]:
    """The PNGs beside results.md; the co-occurrence figure uses the first seed that has both the
    baseline's and + WGAN-gp's test scores. {} without matplotlib."""
    try:
        plots.pyplot()
    except ImportError as e:  # matplotlib is in the plots extra only
        logger.warning("no plots: %s (pip install matplotlib)", e)
        return {}
    runs = opts.out / "runs"
    scores = {}
    for seed in opts.seeds:
        files = {v: runs / f"seed{seed}" / v / "test_scores.npz" for v in ("baseline", "wgan")}
        if all(f.is_file() for f in files.values()):
            scores = {v: np.load(f) for v, f in files.items()}
            scores_seed = seed
            break
    written = plots.write_plots(results, opts.out)
    if scores:
        class_names = build_splits(cfg.data, info).class_names
        written["cooccurrence"] = plots.plot_cooccurrence(
            scores["baseline"]["targets"],
            {"baseline": scores["baseline"]["scores"], "+ WGAN-gp": scores["wgan"]["scores"]},
            class_names,
            opts.out / "cooccurrence.png",
            title=f"test split, seed {scores_seed}",
        )
    return written


# ----------------------------------------------------------------------------------------------
# Environment


def git_revision() -> str:
    """HEAD, ``-dirty`` when tracked files or the package itself (new files included) differ from it."""
    return host_environment.git_revision() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    git = git_revision()
    return {
        "device": f"{device.type} ({host_environment.device_name(device)})",
        "threads": torch.get_num_threads(),
        "fastmlgan": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "git": git,
    }
