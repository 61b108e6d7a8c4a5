"""G's trunk from a timm model (``--model.backbone timm:NAME``, the optional ``timm`` extra).

The trunk is timm's model built with ``num_classes=0``: its forward is ``forward_features`` then
timm's own pooling (and pre-logits layers, where a model has them), so f_ext, a frozen copy of
the trunk (§4.1), is the frozen pooled feature of the same model. Its width is read from the
model (``head_hidden_size``, else ``num_features``).

Pretrained weights follow the torchvision backbones' rules (``--model.pretrained``):
  ''            random initialisation (what rebuilding a saved G uses: nothing is downloaded);
  DEFAULT       timm's weights for NAME (or NAME.TAG), downloaded from the Hugging Face hub;
  TAG           timm's weights NAME.TAG (``timm.list_pretrained('NAME.*')``);
  a local file  timm's state dict of the model (the hub's model.safetensors or pytorch_model.bin,
                or a torch checkpoint holding it), for offline machines.
Offline, a download fails with one line naming the file to fetch and how to pass it.

Every loader here normalises images with the ImageNet mean and std. Models whose weights expect
another normalisation (timm's ViTs: 0.5, 0.5) get a fixed per-channel affine map in front,
``input_scale`` and ``input_shift``, saved with G: a saved G is rebuilt without knowing which
weights it started from (as torchvision's inception_v3 ``transform_input``, see generator.py).
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from fastmlgan.data.geometry import IMAGENET_MEAN, IMAGENET_STD
from fastmlgan.errors import ConfigError
from fastmlgan.safeio import open_regular

logger = logging.getLogger(__name__)

PREFIX = "timm:"
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def is_timm(backbone: str) -> bool:
    return backbone.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError as e:
        raise ConfigError(
            f"--model.backbone timm:NAME needs the timm package ({e}): pip install 'fastmlgan[timm]'"
        ) from None
    return timm


class TimmTrunk(nn.Module):
    """timm's model without its classifier (pooled features), after the input map from the
    loaders' ImageNet normalisation to the one the model's weights expect."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        # x_loader = (p - m_in) / s_in; the model wants (p - m) / s = x_loader * s_in / s + (m_in - m) / s.
        m_in, s_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("input_scale", (s_in / s).view(1, -1, 1, 1))
        self.register_buffer("input_shift", ((m_in - m) / s).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact for ImageNet-normalised weights (x * 1 + 0); one elementwise op on the input.
        return self.model(x * self.input_scale + self.input_shift)


def close_names(name: str, limit: int = 8) -> list[str]:
    """timm model names near ``name``: spelling neighbours, then names containing its stem."""
    timm = _timm()
    arch = name.split(".", 1)[0]
    everything = timm.list_models()
    found = difflib.get_close_matches(arch, everything, n=limit, cutoff=0.6)
    stem = arch.rstrip("0123456789_")
    if stem:
        found += timm.list_models(f"*{stem}*")[: 2 * limit]
    return list(dict.fromkeys(found))[:limit]


def _check_name(name: str) -> None:
    timm = _timm()
    if not name or not timm.is_model(name):
        near = close_names(name) if name else []
        hint = f"close names: {', '.join(near)}" if near else "see timm.list_models('PATTERN')"
        raise ConfigError(f"--model.backbone timm:{name}: timm has no model {name!r}; {hint}")
    if "." in name:  # a weight tag: timm.is_model ignores it
        arch, tag = name.split(".", 1)
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise ConfigError(
                f"--model.backbone timm:{name}: {arch} has no weights {tag!r}; valid tags: {', '.join(tags) or 'none'}"
            )


def _resolve_tag(name: str, pretrained: str) -> str:
    """NAME or NAME.TAG for ``--model.pretrained DEFAULT|TAG``."""
    if pretrained == "DEFAULT":
        return name
    arch, _, own = name.partition(".")
    tags = [n.split(".", 1)[1] for n in _timm().list_pretrained(f"{arch}.*")]
    if own and pretrained != own:
        raise ConfigError(f"--model.pretrained {pretrained!r}: --model.backbone timm:{name} already names weights {own!r}")
    if pretrained not in tags:
        raise ConfigError(
            f"--model.pretrained {pretrained!r}: not a weight file (no such file) nor timm weights of {arch}; "
            f"valid: DEFAULT, {', '.join(tags) or '(none)'}, or a local .safetensors/.pth file"
        )
    return f"{arch}.{pretrained}"


def _download_url(cfg) -> str:
    if cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{cfg.hf_hub_filename or 'model.safetensors'}"
    return cfg.url or ""


def _load_file(model: nn.Module, name: str, pretrained: str, classifiers: tuple[str, ...]) -> None:
    timm = _timm()
    path = Path(os.path.expanduser(pretrained))
    if not os.path.lexists(path):
        raise ConfigError(f"--model.pretrained {pretrained}: file not found")
    with open_regular(path, "--model.pretrained", ConfigError):  # a FIFO or a device: refused, not waited on
        pass
    try:
        # timm's reader: safetensors or torch files, a checkpoint's (EMA) state dict, 'module.' prefixes.
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling / parsing failure is the file's fault
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--model.pretrained {pretrained}: cannot read it as a state dict ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--model.pretrained {pretrained}: not a state dict of tensors")
    # The ImageNet classifier is replaced by G's head; anything else missing means the wrong file.
    state = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in classifiers}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: another size of the same family
        raise ConfigError(
            f"--model.pretrained {pretrained}: does not match timm's {name} ({str(e).strip().splitlines()[-1].strip()[:200]})"
        ) from None
    if missing or unexpected:
        raise ConfigError(
            f"--model.pretrained {pretrained}: does not match timm's {name} "
            f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    logger.info("loaded timm %s weights from %s", name, path)


def _check_image_size(model: nn.Module, backbone: str, image_size: int) -> None:
    """One line, not a traceback from the first training step, when the model cannot take
    ``image_size`` images: a fixed input size (ViT, Swin) or too many stride-2 stages."""
    fixed = model.pretrained_cfg.get("fixed_input_size") and model.pretrained_cfg.get("input_size")
    if fixed and tuple(fixed[1:]) != (image_size, image_size):
        raise ConfigError(
            f"--data.image_size {image_size}: {backbone} takes {fixed[1]}x{fixed[2]} images only; use --data.image_size {fixed[1]}"
        )
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as e:  # conv kernels larger than the map, shape asserts
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(f"--data.image_size {image_size}: {backbone} cannot take {image_size}x{image_size} images ({first})") from None
    finally:
        model.train(was_training)


def build_timm_trunk(backbone: str, pretrained: str, image_size: int | None = None) -> tuple[TimmTrunk, int]:
    """(trunk, feature width) for ``backbone`` = 'timm:NAME' (see the module docstring); with
    ``image_size``, one line when the model cannot take images of that side (a forward of one
    blank image, in eval mode: nothing of the model changes)."""
    timm = _timm()
    name = backbone[len(PREFIX):]
    _check_name(name)
    is_file = pretrained and (
        Path(pretrained).suffix in WEIGHT_FILE_SUFFIXES or os.path.lexists(os.path.expanduser(pretrained))
    )
    weights = name if not pretrained or is_file else _resolve_tag(name, pretrained)
    cfg = timm.models.get_pretrained_cfg(weights)
    if pretrained and not is_file:
        url = _download_url(cfg) if cfg is not None else ""
        if not url:
            raise ConfigError(f"--model.pretrained {pretrained}: timm has no pretrained weights for {weights}; leave it empty")
        try:
            model = timm.create_model(weights, pretrained=True, num_classes=0)
        except (OSError, RuntimeError, ValueError) as e:  # huggingface_hub's LocalEntryNotFoundError is an OSError
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ConfigError(
                f"--model.pretrained {pretrained}: could not download timm's {weights} weights from {url} "
                f"({type(e).__name__}: {first}). Offline? Download that file on a connected machine and pass its "
                f"path: --model.pretrained /path/to/{url.rsplit('/', 1)[-1]}"
            ) from None
    else:
        model = timm.create_model(weights, pretrained=False, num_classes=0)
        if is_file:
            classifiers = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier or ())
            _load_file(model, weights, pretrained, classifiers)
    mean, std = model.pretrained_cfg.get("mean", IMAGENET_MEAN), model.pretrained_cfg.get("std", IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"--model.backbone {backbone}: a model of {len(mean)} input channels; G reads RGB images")
    if image_size is not None:
        _check_image_size(model, backbone, image_size)
    feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return TimmTrunk(model, tuple(mean), tuple(std)), feature_dim
