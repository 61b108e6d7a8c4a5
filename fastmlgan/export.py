"""The generator G of a training checkpoint as a model to use (D, f_ext and the optimizers stay
behind): ``export_checkpoint`` (the command line: ``fastmlgan export``, ``commands/export.py``).

The export folder receives:

- ``model.safetensors``: G's weights (state dict names of ``fastmlgan.models.Generator``): its
  raw weights or, from a run with ``--train.ema_decay``, their average (``--weights``; by default
  the ones that won on the run's validation split).
- ``fastmlgan.json``: format version, class names, the model spec that rebuilds G, the
  preprocessing of evaluation, which weights (``weights``), the thresholds chosen on the run's
  validation split (``thresholds``: ``global``, ``per_class``, ``default``; null without one), the
  training config, versions, and the checkpoint it came from.
- ``model.onnx`` with ``--onnx`` (needs ``onnx`` and ``onnxscript``; input "images" or "features",
  output "logits", dynamic batch).
- ``model.pt2`` with ``--torch-export`` (``torch.export.save``; ``torch.export.load(p).module()``).

Every file outputs logits; σ(logits) are the per-label probabilities. Each ONNX/torch.export
file is checked against G on a random batch before the export counts as done (the largest
difference is recorded in fastmlgan.json). ``fastmlgan.load_classifier(DIR)`` and
``fastmlgan predict DIR ...`` read the folder.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors.torch import save_file

from fastmlgan import __version__
from fastmlgan.classifier import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    SIDECAR,
    WEIGHTS,
    build_from_spec,
    checkpoint_weights,
    locate,
    model_spec,
    preprocessing_of,
    read_checkpoint,
)
from fastmlgan.config import Config, config_from_dict
from fastmlgan.data.backends.vectors import Standardizer
from fastmlgan.data.sources.features import load_feature_dataset
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.models import Generator
from fastmlgan.safeio import describe_os_error, read_json

logger = logging.getLogger("fastmlgan.export")

ONNX_FILE = "model.onnx"
TORCH_EXPORT_FILE = "model.pt2"
# fp32 on the CPU: ONNX Runtime and the exported graph fuse and reorder differently from eager
# torch; on the smoke model logits differed by ~1e-6 (measured), so 1e-3 only catches a wrong graph.
CHECK_ATOL = 1e-3


def _earlier_export(out: Path) -> set[str] | None:
    """The files an earlier export in ``out`` wrote (its sidecar's list), or None when ``out`` holds
    no fastmlgan export."""
    try:
        sidecar = read_json(out / SIDECAR, "sidecar", ConfigError)  # a FIFO named fastmlgan.json: not waited on
    except FastMLGANError:
        return None
    if not isinstance(sidecar, dict) or sidecar.get("format") != EXPORT_FORMAT:
        return None
    files = sidecar.get("files") if isinstance(sidecar.get("files"), dict) else {}
    entries = [files.get("weights"), *((e or {}).get("file") for e in (files.get("onnx"), files.get("torch_export")))]
    return {SIDECAR} | {e for e in entries if isinstance(e, str) and e in (WEIGHTS, ONNX_FILE, TORCH_EXPORT_FILE)}


def _prepare_out_dir(out: Path, overwrite: bool, checkpoint: Path, writes: list[str]) -> set[str]:
    """Refuse an --out whose files this export must not replace; create it. Returns the files of
    the earlier export it replaces (empty for a new folder).

    ``--overwrite`` replaces an earlier fastmlgan export only (a folder with its fastmlgan.json), and
    of it only the files that export wrote: a folder without a sidecar (a run folder, a user's
    folder) or a file the earlier export did not write (a user's model.onnx) is refused, never
    deleted. Nothing in ``out`` changes before the new export is complete."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a {'file' if out.is_file() else 'special file'}; give a folder")
    content = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    earlier: set[str] = set()
    if content:
        found = _earlier_export(out)
        if found is None:
            raise ConfigError(
                f"--out {out} is not empty and holds no fastmlgan export (no valid {SIDECAR}): it is left alone; "
                "pick another folder"
            )
        if not overwrite:
            raise ConfigError(f"--out {out} holds an earlier export; pick another folder or pass --overwrite to replace it")
        earlier = found
        foreign = [name for name in writes if (out / name).exists() and name not in earlier]
        if foreign:
            raise ConfigError(
                f"--out {out}: {foreign[0]} is not part of the earlier export (its {SIDECAR} does not list it): "
                "move it away or pick another folder"
            )
    for name in writes:
        target = out / name
        if target.exists() and checkpoint.exists() and os.path.samefile(target, checkpoint):
            raise ConfigError(f"--out {out}: {name} is the checkpoint being exported; pick another folder")
    out.mkdir(parents=True, exist_ok=True)
    return earlier


def _stage_file(path: Path, write, staged: list[tuple[Path, Path]]) -> Path:
    """``write(tmp)`` to a temporary beside ``path`` (renamed over it by ``_commit`` once the whole
    export is written and checked): a failed export never leaves a torn or a half-replaced export."""
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)  # .pt2 suffix
    os.close(fd)
    tmp = Path(name)
    staged.append((tmp, path))
    write(tmp)
    os.chmod(tmp, 0o644)  # safetensors creates its file owner-only; the model is meant to be shared
    return tmp


def _commit(staged: list[tuple[Path, Path]]) -> None:
    """Rename the staged files over their names, the sidecar last: until it lands, a reader of the
    folder finds the earlier export, and a weights file newer than its sidecar fails the checksum."""
    for tmp, path in sorted(staged, key=lambda item: item[1].name == SIDECAR):
        os.replace(tmp, path)
    staged.clear()


def _example_input(spec: dict[str, Any], preprocessing: dict[str, Any], batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if spec["backbone"] == "mlp":
        return torch.randn(batch, spec["in_dim"], generator=g)
    side = preprocessing["image_size"]
    return torch.randn(batch, 3, side, side, generator=g)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _check(name: str, reference: torch.Tensor, got: torch.Tensor) -> float:
    diff = _max_diff(reference, got)
    if not diff <= CHECK_ATOL:
        raise FastMLGANError(f"{name}: its logits differ from G's by {diff:.3g} (> {CHECK_ATOL}) on a check batch")
    return diff


def _export_onnx(generator: Generator, example: torch.Tensor, path: Path, input_name: str, staged: list) -> dict[str, Any]:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"--onnx needs the {' and '.join(missing)} package(s): pip install onnx onnxscript "
            "(onnxruntime to run the model)"
        )
    batch = torch.export.Dim("batch")

    def write(tmp: Path) -> None:
        torch.onnx.export(
            generator,
            (example,),
            str(tmp),
            input_names=[input_name],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,  # one file; G is far below protobuf's 2 GB limit
            dynamo=True,
            verbose=False,
        )

    tmp = _stage_file(path, write, staged)
    entry: dict[str, Any] = {"file": path.name, "input": input_name, "output": "logits"}
    if importlib.util.find_spec("onnxruntime") is None:
        logger.warning("onnxruntime is not installed: %s was not run once to check it", path.name)
        return entry
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    check = torch.cat([example, example[:1]])  # another batch size than the traced one
    got = torch.from_numpy(session.run(None, {input_name: check.numpy()})[0])
    with torch.no_grad():
        entry["max_abs_diff"] = _check(path.name, generator(check), got)
    entry["checked_with"] = f"onnxruntime {onnxruntime.__version__}"
    return entry


def _export_torch(generator: Generator, example: torch.Tensor, path: Path, staged: list) -> dict[str, Any]:
    program = torch.export.export(generator, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    tmp = _stage_file(path, lambda tmp: torch.export.save(program, str(tmp)), staged)
    check = torch.cat([example, example[:1]])
    with torch.no_grad():
        diff = _check(path.name, generator(check), torch.export.load(str(tmp)).module()(check))
    return {"file": path.name, "output": "logits", "max_abs_diff": diff, "checked_with": f"torch {torch.__version__}"}


def _feature_standardization(cfg: Config) -> dict[str, Any]:
    """The z-scoring an mlp G was trained with: statistics of the training split (not in checkpoints)."""
    try:
        train, _ = load_feature_dataset(cfg.data.features_train, cfg.data.features_test, xml=cfg.data.features_xml or None)
    except FastMLGANError as e:
        raise ConfigError(
            f"an mlp G needs its training features' mean/std, which checkpoints do not store; reading "
            f"data.features_train {cfg.data.features_train} failed: {e}"
        ) from None
    s = Standardizer().fit(train.features)
    return {"mean": s.mean.tolist(), "std": s.std.tolist(), "missing": "training mean (0 after z-scoring)"}


def _versions() -> dict[str, str]:
    out = {"fastmlgan": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
    for name in ("safetensors", "onnx", "onnxscript", "onnxruntime", "timm"):
        if importlib.util.find_spec(name) is not None:
            out[name] = getattr(__import__(name), "__version__", "?")
    return out


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, onnx: bool = False, torch_export: bool = False, overwrite: bool = False,
    weights: str = "auto",
) -> dict[str, Any]:
    """Write G of ``checkpoint`` (a file or run directory) to the folder ``out``; returns the sidecar.
    ``weights``: auto | raw | ema (``classifier.WEIGHT_CHOICES``)."""
    if importlib.util.find_spec("safetensors") is None:
        raise ConfigError("export needs the safetensors package: pip install safetensors")
    kind, path = locate(checkpoint)
    if kind == "export":
        raise ConfigError(f"--checkpoint {checkpoint} is already an exported model folder, not a training checkpoint")
    state = read_checkpoint(path)
    chosen = checkpoint_weights(state, weights, str(path))  # before anything is written: --weights ema of a run without EMA
    out = Path(out)
    created = not out.exists()
    writes = [WEIGHTS, SIDECAR] + [ONNX_FILE] * onnx + [TORCH_EXPORT_FILE] * torch_export
    earlier = _prepare_out_dir(out, overwrite, path, writes)
    staged: list[tuple[Path, Path]] = []
    try:
        sidecar = _write_export(state, chosen, path, out, onnx, torch_export, staged)
        _commit(staged)
    except OSError as e:
        raise FastMLGANError(f"--out {out}: cannot write the export ({e.filename or out}: {describe_os_error(e)}); "
                             "an earlier export there is untouched") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    for name in earlier - set(writes):  # the earlier export's files this one does not replace: they would not match
        (out / name).unlink(missing_ok=True)
    return sidecar


def _write_export(
    state: dict[str, Any], chosen: tuple, path: Path, out: Path, onnx: bool, torch_export: bool, staged: list
) -> dict[str, Any]:
    cfg = config_from_dict(state["config"])
    generator_state, which, thresholds = chosen
    spec = model_spec(cfg, len(state["class_names"]), generator_state)
    generator = build_from_spec(spec, generator_state, str(path))  # eval mode, CPU, fp32
    preprocessing = preprocessing_of(cfg, spec)
    if spec["backbone"] == "mlp":
        preprocessing["standardize"] = _feature_standardization(cfg)
    weights = {k: v.detach().contiguous() for k, v in generator.state_dict().items()}
    tmp = _stage_file(out / WEIGHTS, lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}), staged)
    # The integrity record load_classifier and predict check: one flipped bit changes the scores.
    files: dict[str, Any] = {"weights": WEIGHTS, "weights_sha256": _sha256(tmp), "onnx": None, "torch_export": None}
    example = _example_input(spec, preprocessing)
    if onnx:
        input_name = "features" if spec["backbone"] == "mlp" else "images"
        files["onnx"] = _export_onnx(generator, example, out / ONNX_FILE, input_name, staged)
    if torch_export:
        files["torch_export"] = _export_torch(generator, example, out / TORCH_EXPORT_FILE, staged)

    sidecar = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "class_names": list(state["class_names"]),
        "model": {**spec, "output": "logits (B, num_labels); sigmoid gives the per-label probabilities"},
        "preprocessing": preprocessing,
        "weights": which,
        "thresholds": None if thresholds is None else {
            "global": thresholds["global"],
            "per_class": thresholds["per_class"],
            "default": thresholds["default"],
            "chosen_on": (state.get("selection") or {}).get("validation"),
        },
        "files": files,
        "source": {
            "checkpoint": str(Path(path).resolve()),
            "phase": state.get("phase"),
            "epoch": state.get("epoch"),
            "global_step": state.get("global_step"),
            "baseline_metrics": state.get("baseline_metrics"),
            "gan_metrics": state.get("gan_metrics"),
        },
        "training_config": state["config"],
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # Renamed into place last: a folder with a sidecar is a complete export.
    _stage_file(out / SIDECAR, lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2) + "\n"), staged)
    return sidecar


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
