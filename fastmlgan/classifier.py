"""A trained G ready to use: rebuilt from a training checkpoint or an exported model folder,
with its class names and the test-time preprocessing of evaluation (§4.1: the whole image
resized to image_size x image_size, ImageNet normalisation).

This is the one place that rebuilds G outside the Trainer (``fastmlgan evaluate``,
``fastmlgan predict``, ``fastmlgan.export`` and ``fastmlgan.load_classifier`` all use it). G is
always built with ``pretrained=""`` and then given the saved weights, so nothing is downloaded.
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

import torch
from safetensors.torch import load
from torch import nn

from fastmlgan.config import BACKBONES, Config, config_from_dict, valid_backbone
from fastmlgan.data.geometry import IMAGENET_MEAN, IMAGENET_STD, decode_rgb, eval_resize, normalize
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.models import Generator, build_generator
from fastmlgan.safeio import inside_root, open_regular, read_bytes, read_json
from fastmlgan.train import checkpoint as ckpt

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "fastmlgan-classifier"
EXPORT_VERSION = 2
"""2: ``files.weights_sha256`` (1 had no checksum; still read, with a warning)."""
SIDECAR = "fastmlgan.json"
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


def generator_from_checkpoint(state: dict[str, Any], source: str) -> Generator:
    """G of a training checkpoint (``checkpoint.load``'s dict)."""
    cfg = config_from_dict(state["config"])
    spec = model_spec(cfg, len(state["class_names"]), state["generator"])
    return build_from_spec(spec, state["generator"], source)


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


def load_model(path: str | Path) -> Classifier:
    """A ``Classifier`` from an exported folder, a run directory or a checkpoint file."""
    kind, p = locate(path)
    if kind == "export":
        return _load_export(p)
    state = read_checkpoint(p)
    cfg = config_from_dict(state["config"])
    spec = model_spec(cfg, len(state["class_names"]), state["generator"])
    generator = build_from_spec(spec, state["generator"], str(p))
    info = {k: state.get(k) for k in ("phase", "epoch", "global_step")}
    return Classifier(generator, list(state["class_names"]), preprocessing_of(cfg, spec), str(p), info)


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
    return Classifier(generator, list(sidecar["class_names"]), sidecar["preprocessing"], str(folder), sidecar)


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
    digest = sidecar["files"].get("weights_sha256")
    if sidecar["format_version"] != 1 and not (isinstance(digest, str) and len(digest) == 64):
        raise ConfigError(f"{path}: 'files.weights_sha256' must be the 64 hex digits of the weights' SHA-256")


_MISSING = object()


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
