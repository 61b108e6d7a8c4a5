"""The generator G (§3.1): a classifier with a |S|-way linear head and sigmoid outputs, and the
frozen feature extractor f_ext (§4.1) built from it."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from fastmlgan.errors import ConfigError
from fastmlgan.models.timm_backbone import build_timm_trunk, is_timm
from fastmlgan.safeio import open_regular

logger = logging.getLogger(__name__)

TORCHVISION_BACKBONES = ("resnet18", "resnet50", "resnet101", "resnet152", "vgg16", "inception_v3")
MAX_PARAMETERS = 2**31
"""8 GiB of fp32 weights (and twice that in Adam's moments): larger is a typo, refused before allocating."""


def check_parameter_count(count: int, what: str, options: str) -> None:
    """``ConfigError`` naming ``options`` when a model of ``count`` parameters is too large to build."""
    if count > MAX_PARAMETERS:
        raise ConfigError(f"{options}: {what} would have {count:,} parameters (over {MAX_PARAMETERS:,}); use smaller values")


class Generator(nn.Module):
    """``trunk`` maps an input to a feature vector; ``head`` is the |S|-way linear output layer.

    ``forward`` returns logits; σ(logits) are the per-label probabilities of §3.1. The loss is
    computed from logits (BCE-with-logits) for stability in mixed precision.
    """

    def __init__(self, trunk: nn.Module, feature_dim: int, num_labels: int, backbone: str) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(feature_dim, num_labels)
        self.feature_dim = feature_dim
        self.num_labels = num_labels
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class FeatureExtractor(nn.Module):
    """f_ext (§4.1): a copy of a generator's trunk (its output layer removed), frozen.

    No parameter takes gradients and the module stays in eval mode (BatchNorm statistics fixed)
    whatever ``.train()`` is called with. ``source`` records where the weights came from.
    """

    def __init__(self, trunk: nn.Module, feature_dim: int, source: str) -> None:
        super().__init__()
        self.trunk = copy.deepcopy(trunk)
        self.trunk.requires_grad_(False)
        self.feature_dim = feature_dim
        self.source = source
        super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class SmallCNN(nn.Module):
    """A CPU-sized backbone: four conv stages (stride 2 after the first), BatchNorm, ReLU, global
    average pooling. ``width`` channels in the first stage, doubling per stage."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        check_parameter_count(sum(9 * (a * b + b * b) for a, b in zip(chans, chans[1:])), "smallcnn G", f"--model.width {width}")
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
                nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class MLPTrunk(nn.Module):
    """For feature-vector inputs (MULAN data): ``depth`` hidden layers of ``width`` with ReLU."""

    def __init__(self, in_dim: int, width: int, depth: int, dropout: float = 0.0) -> None:
        super().__init__()
        check_parameter_count(in_dim * width + (depth - 1) * width * width, "the mlp G", f"--model.width {width} --model.depth {depth}")
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(in_dim, width), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        self.net = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _resolve_weights(backbone: str, name: str):
    """A torchvision weights enum from 'DEFAULT', 'IMAGENET1K_V1' or 'ResNet101_Weights.IMAGENET1K_V2'."""
    enum = torchvision.models.get_model_weights(backbone)
    short = name.split(".", 1)[1] if "." in name else name
    if "." in name and name.split(".", 1)[0] != enum.__name__:
        raise ConfigError(f"--model.pretrained {name!r} is not a weight of {backbone} (expected {enum.__name__}.*)")
    try:
        return enum[short]
    except KeyError:
        valid = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(f"--model.pretrained {name!r}: unknown weights for {backbone}; valid: {valid}") from None


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    with open_regular(path, "--model.pretrained", ConfigError) as f:  # a FIFO or a device: refused, not waited on
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--model.pretrained {path}: cannot read it as a torch state dict ({first})") from None
    for key in ("state_dict", "model", "generator"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"--model.pretrained {path}: not a state dict of tensors")
    return obj


def _torchvision_model(backbone: str, pretrained: str) -> nn.Module:
    # Inception v3's ImageNet weights expect inputs in [-1, 1]; transform_input converts from the
    # ImageNet normalisation every loader uses. torchvision turns it on only when it loads weights
    # by name, and it is not saved in state dicts: fix it to True for every inception_v3 G, so
    # that a local weights file, a random start and a re-evaluated checkpoint all see one input.
    inception = {"transform_input": True} if backbone == "inception_v3" else {}
    if not pretrained:
        kwargs = {"aux_logits": False, "init_weights": True, **inception} if inception else {}
        return torchvision.models.get_model(backbone, weights=None, **kwargs)
    path = Path(os.path.expanduser(pretrained))
    if path.suffix in (".pth", ".pt", ".bin") or os.path.lexists(path):
        if not os.path.lexists(path):
            raise ConfigError(f"--model.pretrained {pretrained}: file not found")
        kwargs = {"aux_logits": True, "init_weights": False, **inception} if inception else {}
        model = torchvision.models.get_model(backbone, weights=None, **kwargs)
        state = _load_state_dict_file(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # The ImageNet head is replaced anyway; anything else missing means the wrong file.
        missing = [k for k in missing if not k.startswith(("fc.", "classifier.6.", "AuxLogits."))]
        if missing or len(unexpected) > 0:
            raise ConfigError(
                f"--model.pretrained {pretrained}: does not match torchvision's {backbone} "
                f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {list(unexpected)[:3]})"
            )
        logger.info("loaded %s weights from %s", backbone, path)
        return model
    weights = _resolve_weights(backbone, pretrained)
    try:
        return torchvision.models.get_model(backbone, weights=weights)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        url = getattr(weights, "url", "?")
        raise ConfigError(
            f"--model.pretrained {pretrained}: could not download {backbone} weights from {url} ({e}). "
            f"Offline? Download that file on a connected machine and pass its path: --model.pretrained /path/to/{url.rsplit('/', 1)[-1]}"
        ) from None


def build_generator(
    backbone: str,
    num_labels: int,
    pretrained: str = "",
    width: int = 32,
    depth: int = 2,
    in_dim: int | None = None,
    image_size: int | None = None,
) -> Generator:
    """G with its output layer replaced by a ``num_labels``-way linear head.

    ``pretrained``: '' (random init), a torchvision weight name (downloaded into torchvision's
    cache when online) or a local state-dict file of the torchvision model. ``timm:NAME``
    backbones: see ``fastmlgan.models.timm_backbone`` (``image_size``: checked against them).
    """
    if is_timm(backbone):
        trunk, feature_dim = build_timm_trunk(backbone, pretrained, image_size)
        return Generator(trunk, feature_dim, num_labels, backbone)
    if backbone == "smallcnn":
        if pretrained:
            raise ConfigError("--model.pretrained: smallcnn has no pretrained weights; leave it empty")
        trunk = SmallCNN(width)
        return Generator(trunk, trunk.out_dim, num_labels, backbone)
    if backbone == "mlp":
        if in_dim is None:
            raise ValueError("the mlp backbone needs in_dim (the feature dimension)")
        trunk = MLPTrunk(in_dim, width, depth)
        return Generator(trunk, trunk.out_dim, num_labels, backbone)
    if backbone not in TORCHVISION_BACKBONES:
        raise ConfigError(
            f"--model.backbone {backbone!r} is unknown; valid: smallcnn, mlp, {', '.join(TORCHVISION_BACKBONES)}, timm:NAME"
        )
    model = _torchvision_model(backbone, pretrained)
    if backbone.startswith("resnet"):
        feature_dim = model.fc.in_features
        model.fc = nn.Identity()
    elif backbone == "vgg16":
        feature_dim = model.classifier[6].in_features
        model.classifier[6] = nn.Identity()
    else:  # inception_v3: the auxiliary classifier is an ImageNet training aid, not part of G
        feature_dim = model.fc.in_features
        model.fc = nn.Identity()
        model.aux_logits = False
        model.AuxLogits = None
    return Generator(model, feature_dim, num_labels, backbone)


def build_feature_extractor(generator: Generator, source: str) -> FeatureExtractor:
    """f_ext = G without its output layer, frozen (§4.1)."""
    return FeatureExtractor(generator.trunk, generator.feature_dim, source)
