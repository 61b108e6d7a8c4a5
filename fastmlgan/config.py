"""Typed configuration: nested dataclasses with the paper's defaults, presets, and the CLI.

The single source of truth for every option. ``--section.key value`` overrides a field;
``--preset NAME`` starts from a named preset. The resolved config is written to the run
directory and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastmlgan.errors import ConfigError

BACKBONES = ("smallcnn", "mlp", "resnet18", "resnet50", "resnet101", "resnet152", "vgg16", "inception_v3")


@dataclass
class DataConfig:
    dataset: str = "embedded"
    """embedded (generated on first use) | coco (any COCO instances-format JSON + image folder) | features."""
    root: str = "data/embedded"
    """embedded: where the generated dataset lives (created when missing)."""
    train_annotations: str = ""
    """coco: instances-format JSON of the training split."""
    train_images: str = ""
    """coco: folder holding the training images (file_name is relative to it)."""
    val_annotations: str = ""
    """coco: instances-format JSON of the evaluation split."""
    val_images: str = ""
    """coco: folder holding the evaluation images."""
    drop_unlabeled: bool = True
    """Drop images with no label, as the paper's 82,081/40,137 COCO protocol does (they are counted)."""
    image_size: int = 224
    """Training crop and test size (§4.1: 224; base 256 and crop sides scale with it)."""
    batch_size: int = 32
    """Global batch per pair kind (matched, generated, mismatched each draw one); divided across ranks."""
    eval_batch_size: int = 64
    """Global evaluation batch."""
    num_workers: int = 2
    """Decoding worker processes per rank (torch backend)."""
    on_bad_image: str = "skip"
    """An image that cannot be decoded: skip (substitute the next one, count and log it) | error (stop, naming it)."""
    backend: str = "torch"
    """Loader backend: torch (CPU decode and five-crop)."""
    embedded_num_train: int = 2000
    """embedded: number of training images generated."""
    embedded_num_val: int = 500
    """embedded: number of evaluation images generated."""
    embedded_image_size: int = 64
    """embedded: side of the generated JPEGs."""
    embedded_seed: int = 0
    """embedded: seed of the generator (the dataset is a pure function of its parameters)."""
    features_train: str = ""
    """features: training file (MULAN/MEKA ARFF, .npz or .csv)."""
    features_test: str = ""
    """features: evaluation file."""
    features_xml: str = ""
    """features: MULAN XML naming the label attributes."""

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, ("embedded", "coco", "features"))
        _choice("data.on_bad_image", self.on_bad_image, ("skip", "error"))
        _choice("data.backend", self.backend, ("torch",))
        _positive("data.image_size", self.image_size)
        _positive("data.batch_size", self.batch_size)
        _positive("data.eval_batch_size", self.eval_batch_size)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class ModelConfig:
    backbone: str = "resnet101"
    """Generator backbone: smallcnn (CPU-sized) | mlp (feature inputs) | resnet18/50/101/152 | vgg16 | inception_v3."""
    pretrained: str = ""
    """ImageNet weights: '' (random init) | a torchvision weight name (DEFAULT, IMAGENET1K_V1, ResNet101_Weights.IMAGENET1K_V2) | a local .pth file."""
    width: int = 64
    """smallcnn: channels of the first stage (doubling per stage); mlp: hidden width."""
    depth: int = 2
    """mlp: hidden layers."""
    channels_last: bool = True
    """Use channels_last memory format for CNN backbones on GPU."""

    def __post_init__(self) -> None:
        _choice("model.backbone", self.backbone, BACKBONES)
        _positive("model.width", self.width)
        _positive("model.depth", self.depth)


@dataclass
class GanConfig:
    enable: bool = True
    """Run phase 2 (adversarial training). false: the BCE baseline only."""
    bce_weight: float = 10.0
    """alpha in eq. (2): weight of L_logistic in the generator loss (§4.1: 10)."""
    gp_weight: float = 10.0
    """lambda in eq. (4): gradient-penalty scale (§4.1: 10)."""
    inv_temperature: float = 0.9
    """beta of the Gumbel sigmoid (§4.1: 0.9, no annealing)."""
    d_steps: int = 3
    """Discriminator updates per generator update (§4.1: 3)."""
    negative_sampling: bool = True
    """Mismatched pairs (y', x) as a third D input (eq. 4). false: Table 3 (c), generated term weight 1."""
    conditional: bool = True
    """D sees f_ext(x). false: Table 3 (d), D(label set) only."""
    gumbel: bool = True
    """Feed D Gumbel-sigmoid samples. false: Table 3 (e), D is fed sigmoid(logits) directly."""
    hard_samples: bool = False
    """Straight-through hard Gumbel samples (the paper feeds relaxed samples, §3.2)."""
    proj_dim: int = 256
    """D's linear projections of f_ext(x) and of the label set (§4.1: 256)."""
    hidden_dim: int = 512
    """Width of D's fully connected layers (§4.1: 512)."""
    num_layers: int = 8
    """Number of D's fully connected layers (§4.1: 8)."""
    negative_slope: float = 0.2
    """LeakyReLU slope in D (not given in the paper; 0.2 as in DCGAN/WGAN-GP)."""
    penalty: str = "autograd"
    """How the gradient penalty (eq. 5) is computed: autograd (textbook double backward)."""

    def __post_init__(self) -> None:
        _positive("gan.d_steps", self.d_steps)
        _positive("gan.proj_dim", self.proj_dim)
        _positive("gan.hidden_dim", self.hidden_dim)
        _positive("gan.num_layers", self.num_layers)
        if self.inv_temperature <= 0:
            raise ConfigError(f"gan.inv_temperature must be > 0, got {self.inv_temperature}")
        _choice("gan.penalty", self.penalty, ("autograd",))


@dataclass
class OptimConfig:
    bce_lr: float = 1e-4
    """Generator Adam learning rate in phase 1 (BCE pretraining; the paper gives none, 1e-4 as phase 2)."""
    g_lr: float = 1e-4
    """Generator Adam learning rate in phase 2 (§4.1: 1e-4)."""
    d_lr: float = 1e-4
    """Discriminator Adam learning rate (§4.1: 1e-4)."""
    beta1: float = 0.9
    """Adam beta1 (the paper gives none: torch's default)."""
    beta2: float = 0.999
    """Adam beta2 (torch's default)."""
    weight_decay: float = 0.0
    """Adam weight decay (none in the paper)."""

    def __post_init__(self) -> None:
        for name in ("bce_lr", "g_lr", "d_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"optim.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    bce_epochs: int = 10
    """Phase 1: epochs of BCE-only training of G (§3.2); its result is the baseline row."""
    gan_epochs: int = 10
    """Phase 2: epochs of adversarial training; an epoch is one pass of batches drawn (all pair kinds)."""
    max_steps_per_epoch: int = 0
    """Cap on batches drawn per epoch (0: the whole epoch). For smoke runs."""
    seed: int = 0
    """Seed of every random stream (model init, data order, crops, noise)."""
    log_every: int = 20
    """Log losses every N optimizer steps (the only host syncs in the loop)."""
    eval_every: int = 1
    """Evaluate every N epochs (and always at the end of each phase)."""

    def __post_init__(self) -> None:
        if self.bce_epochs < 0 or self.gan_epochs < 0:
            raise ConfigError("train.bce_epochs and train.gan_epochs must be >= 0")
        _positive("train.log_every", self.log_every)
        _positive("train.eval_every", self.eval_every)


@dataclass
class PrecisionConfig:
    amp: str = "auto"
    """Autocast dtype for G and f_ext: auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none. D always runs in fp32."""

    def __post_init__(self) -> None:
        _choice("precision.amp", self.amp, ("auto", "bf16", "fp16", "none"))


@dataclass
class CompileConfig:
    enable: bool = False
    """torch.compile the G and D steps."""


@dataclass
class DistConfig:
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo."""
    timeout_s: int = 1800
    """Collective timeout in seconds."""

    def __post_init__(self) -> None:
        _choice("dist.backend", self.backend, ("auto", "nccl", "gloo"))


@dataclass
class CheckpointConfig:
    enable: bool = True
    """Write checkpoints/last.pt at the end of every epoch (atomically)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preset: str = "embedded"
    """The preset the run started from."""
    out: str = ""
    """Run directory ('' = runs/<preset>)."""
    resume: str = ""
    """Run directory to continue from its checkpoints/last.pt."""

    def __post_init__(self) -> None:
        if self.data.dataset == "features" and self.model.backbone != "mlp":
            raise ConfigError("data.dataset=features needs model.backbone=mlp (feature vectors are not images)")
        if self.data.dataset != "features" and self.model.backbone == "mlp":
            raise ConfigError("model.backbone=mlp is for data.dataset=features; pick a CNN backbone for images")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = ("data", "model", "gan", "optim", "train", "precision", "compile", "dist", "checkpoint")
TOP_LEVEL = ("preset", "out", "resume")


# ----------------------------------------------------------------------------------------------
# Presets: plain functions returning the overrides they apply to the defaults.


def _preset_embedded() -> dict[str, Any]:
    """The default: the embedded synthetic dataset with the CPU-sized CNN; `make train` (~5 min on 2 cores)."""
    return {
        "data.dataset": "embedded",
        "data.image_size": 56,
        "data.batch_size": 32,
        "data.eval_batch_size": 128,
        "model.backbone": "smallcnn",
        "model.width": 32,
        "train.bce_epochs": 8,
        "train.gan_epochs": 12,
        # G starts from random weights here, so phase 1 needs a larger step than the paper's
        # fine-tuning of ImageNet models; phase 2 keeps §4.1's 1e-4.
        "optim.bce_lr": 1e-3,
    }


def _preset_smoke() -> dict[str, Any]:
    """Under a minute on 2 cores: a small embedded set, a tiny CNN, a few steps of each phase."""
    return {
        **_preset_embedded(),
        "data.root": "data/embedded-smoke",
        "data.embedded_num_train": 256,
        "data.embedded_num_val": 128,
        "data.embedded_image_size": 40,
        "data.image_size": 32,
        "data.batch_size": 16,
        "data.num_workers": 0,
        "model.width": 8,
        "gan.hidden_dim": 64,
        "gan.proj_dim": 32,
        "gan.num_layers": 2,
        "train.bce_epochs": 2,
        "train.gan_epochs": 1,
        "train.max_steps_per_epoch": 12,
        "train.log_every": 5,
    }


def _preset_coco(backbone: str) -> Callable[[], dict[str, Any]]:
    def preset() -> dict[str, Any]:
        return {
            "data.dataset": "coco",
            "data.train_annotations": "coco/annotations/instances_train2014.json",
            "data.train_images": "coco/train2014",
            "data.val_annotations": "coco/annotations/instances_val2014.json",
            "data.val_images": "coco/val2014",
            "data.image_size": 224,
            "model.backbone": backbone,
            "model.pretrained": "DEFAULT",
        }

    preset.__doc__ = f"MS-COCO 2014 with a {backbone} generator and §4.1's settings (ImageNet weights)."
    return preset


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "embedded": _preset_embedded,
    "smoke": _preset_smoke,
    **{f"paper-coco-{b}": _preset_coco(b) for b in ("vgg16", "inception_v3", "resnet101", "resnet152")},
}


# ----------------------------------------------------------------------------------------------
# Parsing


def valid_keys() -> list[str]:
    keys = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(_section_type(s))]
    return keys + list(TOP_LEVEL)


def _section_type(section: str) -> type:
    return _SECTION_TYPES[section]


_SECTION_TYPES: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "gan": GanConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "precision": PrecisionConfig,
    "compile": CompileConfig,
    "dist": DistConfig,
    "checkpoint": CheckpointConfig,
}


def _field_type(cls: type, name: str) -> type:
    hints = typing.get_type_hints(cls)
    return hints[name]


def _convert(key: str, raw: Any, typ: type) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"--{key}: expected {typ.__name__}, got {raw!r}") from None
    return raw


def build_config(overrides: dict[str, Any] | None = None, preset: str | None = None) -> Config:
    """A validated Config from a preset and ``{"section.key": value}`` overrides (strings are parsed)."""
    preset = preset or "embedded"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    merged = {**PRESETS[preset](), **(overrides or {})}
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    top: dict[str, Any] = {"preset": preset}
    keys = valid_keys()
    for key, raw in merged.items():
        if key in TOP_LEVEL:
            top[key] = raw if key != "preset" else preset
            continue
        section, _, name = key.partition(".")
        if section not in _SECTION_TYPES or name not in {f.name for f in dataclasses.fields(_SECTION_TYPES[section])}:
            raise ConfigError(f"unknown option --{key}; valid options:\n  " + "\n  ".join(keys))
        sections[section][name] = _convert(key, raw, _field_type(_SECTION_TYPES[section], name))
    return Config(**{s: _SECTION_TYPES[s](**v) for s, v in sections.items()}, **top)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config written by ``Config.to_dict`` (checkpoints, run directories)."""
    sections = {}
    for s in SECTIONS:
        known = {f.name for f in dataclasses.fields(_SECTION_TYPES[s])}
        sections[s] = _SECTION_TYPES[s](**{k: v for k, v in d.get(s, {}).items() if k in known})
    return Config(**sections, **{k: d[k] for k in TOP_LEVEL if k in d})


def help_text(prog: str) -> str:
    lines = [
        f"usage: {prog} [--preset NAME] [--out DIR] [--resume DIR] [--section.key VALUE ...]",
        "",
        "Adversarial learning of label dependency (Tsai & Lee): BCE pretraining of the generator,",
        "then WGAN-GP training against a conditional discriminator.",
        "",
        "presets:",
    ]
    for name, fn in PRESETS.items():
        lines.append(f"  {name:<22} {(fn.__doc__ or '').strip().splitlines()[0]}")
    lines += ["", "options (default of the 'embedded' preset in brackets where it differs):"]
    embedded = _preset_embedded()
    for s in SECTIONS:
        cls = _SECTION_TYPES[s]
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            key = f"{s}.{f.name}"
            default = f.default
            extra = f" [{embedded[key]}]" if key in embedded else ""
            lines.append(f"  --{key} (default {default!r}{extra})")
            if docs.get(f.name):
                lines.append(f"      {docs[f.name]}")
    lines += [
        "  --out DIR     run directory (default runs/<preset>)",
        "  --resume DIR  continue the run in DIR from its last checkpoint",
    ]
    return "\n".join(lines)


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal after each field) read from the source."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(getattr(node, "value", None), ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = node.value.value.strip()
    return docs


def parse_args(argv: list[str], prog: str = "python -m fastmlgan.train") -> Config | None:
    """Parse ``--preset NAME --section.key value ...``; returns None after printing --help."""
    overrides: dict[str, Any] = {}
    preset = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text(prog))
            return None
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key value (see --help)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "preset":
            preset = value
        else:
            overrides[key] = value
    return build_config(overrides, preset)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{key}: {value!r} is not one of {', '.join(choices)}")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"--{key} must be > 0, got {value}")
