"""A trained G ready to use: rebuilt from a training checkpoint or an exported model folder,
with its class names and the test-time preprocessing of evaluation (§4.1: the whole image
resized to image_size x image_size, ImageNet normalisation).

This is the one place that rebuilds G outside the Trainer (``fastmlgan evaluate``,
``fastmlgan predict``, ``fastmlgan.export`` and ``fastmlgan.load_classifier`` all use it). G is
always built with ``pretrained=""`` and then given the saved weights, so nothing is downloaded.

It also says which weights and thresholds a model carries (``checkpoint_weights``,
``thresholds_for``): a run with ``--data.val_fraction`` stores the thresholds it chose on its
validation split (``train.selection``), and with ``--train.ema_decay`` the average of G's
weights beside the raw ones; ``auto`` takes the weights that won on validation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load
from torch import nn

from fastmlgan.config import BACKBONES, Config, config_from_dict, valid_backbone
from fastmlgan.data.geometry import IMAGENET_MEAN, IMAGENET_STD, decode_rgb, eval_resize, normalize
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.models import Generator, build_generator
from fastmlgan.safeio import inside_root, open_regular, read_bytes, read_json
from fastmlgan.train import checkpoint as ckpt
from fastmlgan.train.selection import applicable_row

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "fastmlgan-classifier"
EXPORT_VERSION = 2
"""2: ``files.weights_sha256`` (1 had no checksum; still read, with a warning)."""
SIDECAR = "fastmlgan.json"
WEIGHT_CHOICES = ("auto", "raw", "ema")
"""--weights: auto (those chosen on the validation split; raw without one) | raw (G's own) | ema (their average)."""
THRESHOLD_WORDS = ("global", "per-class")
WEIGHTS = "model.safetensors"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Classifier:
    """G (eval mode, fp32, on the CPU) and everything needed to feed it."""

    generator: Generator
    class_names: list[str]
    preprocessing: dict[str, Any]
    """``input`` is "image" (see ``image_preprocessing``) or "features" (mlp G)."""
    source: str
    """The checkpoint file or exported folder it was loaded from."""
    info: dict[str, Any] = field(default_factory=dict)
    """Exported folder: its sidecar. Checkpoint: phase, epoch and step."""
    thresholds: dict[str, Any] | None = None
    """Chosen on the run's validation split: ``global``, ``per_class`` (one per class), ``default``
    (which of the two predict and evaluate use unless told); None when the run chose none."""
    weights: str = "raw"
    """raw (G's own weights) or ema (their moving average)."""

    @property
    def image_size(self) -> int:
        if self.preprocessing["input"] != "image":
            raise ConfigError(
                f"{self.source}: G takes feature vectors (backbone {self.generator.backbone}), not images"
            )
        return int(self.preprocessing["image_size"])


def model_spec(cfg: Config, num_labels: int, generator_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What ``build_generator`` needs to rebuild G. An mlp G's input width is read off its first
    layer, so rebuilding never has to read the training data."""
    in_dim = None
    if cfg.model.backbone == "mlp":
        in_dim = int(generator_state["trunk.net.0.weight"].shape[1])
    return {
        "backbone": cfg.model.backbone,
        "num_labels": int(num_labels),
        "feature_dim": int(generator_state["head.weight"].shape[1]),
        "width": cfg.model.width,
        "depth": cfg.model.depth,
        "in_dim": in_dim,
    }


def build_from_spec(spec: dict[str, Any], state_dict: dict[str, torch.Tensor], source: str) -> Generator:
    """G from ``model_spec``'s dict and its weights, in eval mode on the CPU."""
    generator = build_generator(
        spec["backbone"], spec["num_labels"], "", width=spec["width"], depth=spec["depth"], in_dim=spec["in_dim"]
    )
    try:
        generator.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise FastMLGANError(
            f"{source}: the saved weights do not fit a {spec['backbone']} G with {spec['num_labels']} labels ({first})"
        ) from None
    return generator.eval()


def checkpoint_weights(state: dict[str, Any], weights: str = "auto", source: str = "") -> tuple[dict, str, dict | None]:
    """(G's state dict, "raw" or "ema", the thresholds chosen for those weights or None) of a
    training checkpoint. ``weights``: one of ``WEIGHT_CHOICES``. Thresholds belong to the weights of
    a finished phase (``selection.applicable_row``): a checkpoint from the middle of a phase has none."""
    row = applicable_row(state)
    record = (state.get("selection") or {}).get(row) if row else None
    name = weights if weights != "auto" else (record["chosen"] if record else "raw")
    if name == "ema" and not state.get("ema"):
        raise ConfigError(f"--weights ema: {source} holds no average of G's weights (trained without --train.ema_decay)")
    generator_state = state["ema"]["weights"] if name == "ema" else state["generator"]
    entry = record["weights"].get(name) if record else None
    thresholds = None
    if entry and entry.get("thresholds"):
        thresholds = {**entry["thresholds"], "default": record.get("default_threshold", "global"), "row": row}
    return generator_state, name, thresholds


def generator_from_checkpoint(state: dict[str, Any], source: str, weights: str = "raw") -> Generator:
    """G of a training checkpoint (``checkpoint.load``'s dict), with its raw or averaged weights."""
    cfg = config_from_dict(state["config"])
    generator_state = checkpoint_weights(state, weights, source)[0]
    spec = model_spec(cfg, len(state["class_names"]), generator_state)
    return build_from_spec(spec, generator_state, source)


def parse_threshold(text: str | None) -> float | str | None:
    """``--threshold`` of predict and evaluate: None (the model's stored default), ``global``,
    ``per-class`` or a number in [0, 1]."""
    if text is None or text in THRESHOLD_WORDS:
        return text
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--threshold must be a number in [0, 1], global or per-class, got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ConfigError(f"--threshold must be in [0, 1], got {text}")
    return value


def thresholds_for(choice: float | str | None, stored: dict[str, Any] | None, num_classes: int, source: str) -> tuple[np.ndarray, str]:
    """(one threshold per class, its description) for ``parse_threshold``'s ``choice``. Without
    stored thresholds (a run without a validation split, or an older fastmlgan) the default is 0.5,
    said in one log line; asking for ``global`` or ``per-class`` then is an error."""
    if isinstance(choice, float):
        return np.full(num_classes, choice), f"{choice:g}"
    if stored is None:
        if choice is None:
            logger.info("%s carries no thresholds chosen on a validation split (trained without --data.val_fraction, "
                        "or by an earlier fastmlgan): labels above 0.5", source)
            return np.full(num_classes, 0.5), "0.5"
        raise ConfigError(f"--threshold {choice}: {source} carries no thresholds chosen on a validation split "
                          "(train with --data.val_fraction); give a number")
    kind = choice or stored.get("default", "global").replace("_", "-")
    if kind == "global":
        return np.full(num_classes, float(stored["global"])), f"global {stored['global']:g} (chosen on validation)"
    return np.asarray(stored["per_class"], dtype=np.float64), "per-class (chosen on validation)"


def image_preprocessing(image_size: int) -> dict[str, Any]:
    """The evaluation geometry of ``data.geometry`` (``eval_resize`` then ``normalize``), in words."""
    return {
        "input": "image",
        "image_size": int(image_size),
        "resize": "whole image to image_size x image_size, bilinear with antialias on uint8 (no crop, aspect not kept)",
        "channels": "RGB",
        "layout": "NCHW float32",
        "scale": "pixel / 255",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


def preprocessing_of(cfg: Config, spec: dict[str, Any]) -> dict[str, Any]:
    if spec["backbone"] != "mlp":
        return image_preprocessing(cfg.data.image_size)
    # The training split's z-scoring statistics are computed when the data is read and are not
    # part of a checkpoint; ``fastmlgan.export`` computes them again and stores them.
    return {"input": "features", "in_dim": spec["in_dim"], "standardize": None}


def locate(path: str | Path) -> tuple[str, Path]:
    """("export", folder) or ("checkpoint", file) for a MODEL argument."""
    p = Path(path)
    if p.is_dir() and (p / SIDECAR).is_file():
        return "export", p
    if p.is_dir() and (p / ckpt.CHECKPOINT_DIR / ckpt.LAST).is_file():
        return "checkpoint", p / ckpt.CHECKPOINT_DIR / ckpt.LAST
    if p.is_file():
        return "checkpoint", p
    what = "does not exist" if not os.path.lexists(p) else "is a symbolic link loop" if not p.exists() else (
        "is a folder without fastmlgan.json or checkpoints/last.pt" if p.is_dir() else "is not a regular file (a FIFO or a device?)"
    )
    raise ConfigError(
        f"model {path} {what}: give an exported model folder (fastmlgan export), a run directory or a checkpoint file"
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint's dict; a one-line error for any other file."""
    with open_regular(path, "checkpoint", ConfigError) as f:  # not a FIFO: is_zipfile would wait on it
        is_zip = zipfile.is_zipfile(f)
    if not is_zip:  # every torch.save file since torch 1.6 is a zip archive
        raise ConfigError(f"{path} is not a fastmlgan checkpoint (not a file written by torch.save)")
    try:
        state = ckpt.load(path)
    except FastMLGANError as e:
        raise FastMLGANError(str(e).splitlines()[0]) from None  # torch's unpickling errors run to pages
    if not isinstance(state, dict) or not {"generator", "config", "class_names"} <= set(state):
        raise ConfigError(f"{path} is not a fastmlgan training checkpoint (no generator/config/class_names in it)")
    return state


def load_model(path: str | Path, weights: str = "auto") -> Classifier:
    """A ``Classifier`` from an exported folder, a run directory or a checkpoint file; ``weights``
    (``WEIGHT_CHOICES``) picks a checkpoint's raw or averaged weights (an export holds one of them)."""
    kind, p = locate(path)
    if kind == "export":
        model = _load_export(p)
        if weights not in ("auto", model.weights):
            raise ConfigError(f"--weights {weights}: {p} is an export of the {model.weights} weights (an export holds one)")
        return model
    state = read_checkpoint(p)
    cfg = config_from_dict(state["config"])
    generator_state, name, thresholds = checkpoint_weights(state, weights, str(p))
    spec = model_spec(cfg, len(state["class_names"]), generator_state)
    generator = build_from_spec(spec, generator_state, str(p))
    info = {k: state.get(k) for k in ("phase", "epoch", "global_step")}
    return Classifier(generator, list(state["class_names"]), preprocessing_of(cfg, spec), str(p), info, thresholds, name)


def _load_export(folder: Path) -> Classifier:
    sidecar_path = folder / SIDECAR
    sidecar = read_json(sidecar_path, "model sidecar", ConfigError)
    if not isinstance(sidecar, dict) or sidecar.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{sidecar_path}: not a fastmlgan export (its \"format\" is not {EXPORT_FORMAT!r})")
    version = sidecar.get("format_version")
    if isinstance(version, bool) or version not in (1, EXPORT_VERSION):  # true == 1 in Python
        raise ConfigError(
            f"{sidecar_path}: format_version {sidecar.get('format_version')!r}; this fastmlgan reads "
            f"version {EXPORT_VERSION}: export the checkpoint again with this version"
        )
    check_sidecar(sidecar, sidecar_path)
    # The weights file sits in the export folder: a sidecar naming ../x or /x is not followed.
    weights = inside_root(folder, sidecar["files"]["weights"], f"{sidecar_path}: files.weights", None)
    data = read_bytes(weights, "model weights", ConfigError)
    expected = sidecar["files"].get("weights_sha256")
    if expected is None:
        logger.warning("%s: an export of format_version 1 has no weights checksum; export it again to get one", sidecar_path)
    elif hashlib.sha256(data).hexdigest() != expected:
        raise ConfigError(
            f"{weights}: its SHA-256 differs from files.weights_sha256 in {SIDECAR}: the weights are corrupt or "
            "were changed after export; export the checkpoint again"
        )
    try:
        state = load(data)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        raise ConfigError(f"{weights}: cannot read the weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    generator = build_from_spec(sidecar["model"], state, str(weights))
    return Classifier(
        generator, list(sidecar["class_names"]), sidecar["preprocessing"], str(folder), sidecar,
        sidecar.get("thresholds"), sidecar.get("weights", "raw"),
    )


# fastmlgan.json's fields that loading reads: (path, type, check of the value, what it should be).
_INT = (int,)
_SIDECAR_FIELDS = (
    ("class_names", list, lambda v: v and all(isinstance(n, str) for n in v) and len(set(v)) == len(v),
     "a non-empty list of distinct class names"),
    ("model", dict, None, "an object"),
    ("model.backbone", str, valid_backbone, f"one of {', '.join(BACKBONES)} or timm:NAME"),
    ("model.num_labels", _INT, lambda v: v >= 1, "an integer >= 1"),
    ("model.feature_dim", _INT, lambda v: v >= 1, "an integer >= 1"),
    ("model.width", _INT, lambda v: 1 <= v <= 2**16, "an integer in [1, 65536]"),
    ("model.depth", _INT, lambda v: 1 <= v <= 1000, "an integer in [1, 1000]"),
    ("preprocessing", dict, None, "an object"),
    ("preprocessing.input", str, lambda v: v in ("image", "features"), "image or features"),
    ("files", dict, None, "an object"),
    ("files.weights", str, lambda v: v and "\x00" not in v, "a file name"),
)


def check_sidecar(sidecar: dict[str, Any], path: Path) -> None:
    """One-line ``ConfigError`` for a sidecar field that is missing or of the wrong type, or class
    names that do not match the model's outputs (a ragged CSV otherwise)."""
    for key, typ, ok, what in _SIDECAR_FIELDS:
        value: Any = sidecar
        for part in key.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            raise ConfigError(f"{path}: '{key}' is missing; export the checkpoint again")
        if not isinstance(value, typ) or isinstance(value, bool) or (ok is not None and not ok(value)):
            raise ConfigError(f"{path}: '{key}' must be {what}, got {json.dumps(value)[:60]}")
    model, pre = sidecar["model"], sidecar["preprocessing"]
    if len(sidecar["class_names"]) != model["num_labels"]:
        raise ConfigError(
            f"{path}: {len(sidecar['class_names'])} class names for a model of {model['num_labels']} outputs; "
            "export the checkpoint again"
        )
    if pre["input"] == "image":
        size = pre.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= 4096:
            raise ConfigError(f"{path}: 'preprocessing.image_size' must be an integer in [2, 4096], got {json.dumps(size)[:60]}")
    in_dim = model.get("in_dim")
    if model["backbone"] == "mlp" and (isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1):
        raise ConfigError(f"{path}: 'model.in_dim' must be an integer >= 1 for an mlp model, got {json.dumps(in_dim)[:60]}")
    _check_thresholds(sidecar, path)
    digest = sidecar["files"].get("weights_sha256")
    if sidecar["format_version"] != 1 and not (isinstance(digest, str) and len(digest) == 64):
        raise ConfigError(f"{path}: 'files.weights_sha256' must be the 64 hex digits of the weights' SHA-256")


_MISSING = object()


def _check_thresholds(sidecar: dict[str, Any], path: Path) -> None:
    """The optional ``thresholds`` (null, or chosen on validation) and ``weights`` of a sidecar."""
    if sidecar.get("weights", "raw") not in ("raw", "ema"):
        raise ConfigError(f"{path}: 'weights' must be raw or ema, got {json.dumps(sidecar.get('weights'))[:60]}")
    t = sidecar.get("thresholds")
    if t is None:
        return

    def unit(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0

    num_labels = sidecar["model"]["num_labels"]
    if not isinstance(t, dict) or not unit(t.get("global")):
        raise ConfigError(f"{path}: 'thresholds.global' must be a number in [0, 1]; export the checkpoint again")
    per_class = t.get("per_class")
    if not isinstance(per_class, list) or len(per_class) != num_labels or not all(map(unit, per_class)):
        raise ConfigError(f"{path}: 'thresholds.per_class' must be {num_labels} numbers in [0, 1]; export the checkpoint again")
    if t.get("default", "global") not in ("global", "per_class", "per-class"):
        raise ConfigError(f"{path}: 'thresholds.default' must be global or per_class, got {json.dumps(t.get('default'))[:60]}")


def load_classifier(path: str | Path) -> tuple[nn.Module, list[str]]:
    """(G, class names) from an exported folder, a run directory or a checkpoint file.

    G is a plain ``nn.Module`` in eval mode on the CPU, fp32. ``G(x)`` returns logits of shape
    (B, len(class_names)); ``torch.sigmoid`` of them are the per-label probabilities (§3.1).
    Images go in as ``fastmlgan.json``'s "preprocessing" says (``preprocess_image`` does it):
    RGB, the whole image resized to image_size x image_size, ImageNet-normalised, NCHW float32.
    Nothing is downloaded.
    """
    model = load_model(path)
    return model.generator, model.class_names


def preprocess_image(path: str | Path, image_size: int) -> torch.Tensor:
    """One image file as G's (3, S, S) float32 input: exactly the evaluation loader's geometry."""
    return normalize(eval_resize(decode_rgb(path), image_size))
