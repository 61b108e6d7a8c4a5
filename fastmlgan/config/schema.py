"""The options: nested dataclasses with the paper's defaults, one docstring per field, validated
in ``__post_init__`` (the message names the option to change). ``data.dataset`` takes its choices
from the data sources' table (``fastmlgan.data.sources.SOURCES``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from fastmlgan.config.validate import choice, finite, integer, positive
from fastmlgan.data.backends import CHOICES as BACKEND_CHOICES
from fastmlgan.data.sources import SOURCES
from fastmlgan.errors import ConfigError

BACKBONES = ("smallcnn", "mlp", "resnet18", "resnet50", "resnet101", "resnet152", "vgg16", "inception_v3")
TIMM_PREFIX = "timm:"
"""``timm:NAME``: any timm model (the ``timm`` extra); NAME is checked when G is built."""


def valid_backbone(name: object) -> bool:
    """One of ``BACKBONES`` or ``timm:NAME`` (NAME: timm's characters, checked against timm later)."""
    if not isinstance(name, str):
        return False
    rest = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else None
    if rest is None:
        return name in BACKBONES
    return bool(rest) and all(c.isascii() and (c.isalnum() or c in "._-") for c in rest)


@dataclass
class DataConfig:
    dataset: str = "embedded"
    """embedded (generated on first use) | coco (any COCO instances-format JSON + image folder) | nuswide (official layout) | list (CSV/JSONL lists) | features | labelsets (real label sets, synthetic evidence) | shards (WebDataset tar shards from fastmlgan shards build, streamed)."""
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
    backend: str = "auto"
    """Loader backend: auto (the decoded-image cache when current caches of both splits exist or building them fits data.cache_auto_share, else dali on a GPU when installed, else torchvision-gpu on a GPU, else torch) | dali | torchvision-gpu | torch (CPU decode and five-crop) | cache (decoded-image cache, built on first use)."""
    num_threads: int = 4
    """dali / torchvision-gpu / cache: CPU threads per rank (file reading, CPU decoding, cache staging)."""
    cache_dir: str = ""
    """cache: folder of the decoded-image caches ('' = $FASTMLGAN_CACHE, else ~/.cache/fastmlgan: large, derived files reused by every run, kept out of the project and run folders)."""
    cache_device: str = "cpu"
    """cache: serve from cpu (memory-mapped file, rows staged in pinned host memory) | cuda (the cache copied into GPU memory; it must fit)."""
    cache_auto_share: float = 0.25
    """auto: build missing decoded-image caches on first use when they take at most this share of the free disk in cache_dir (and, with cache_device cuda, of the free GPU memory); 0: only use caches that exist."""
    dali_decode: str = "full"
    """dali: full (decode, resize to base, crop, resize: the paper's geometry) | roi (decode only the crop window, one resize)."""
    dali_hw_decoder_load: float = 0.65
    """dali: share of JPEGs sent to the hardware JPEG decoder (A100/H100/H200) by nvJPEG."""
    nuswide_root: str = ""
    """nuswide: folder with Concepts81.txt, ImageList/ and Groundtruth/ (the official layout)."""
    nuswide_split: str = "paper"
    """nuswide: paper (seeded 150,000/59,347 subsample of the labelled images) | official (TrainImagelist/TestImagelist)."""
    nuswide_num_train: int = 150000
    """nuswide, paper split: training images drawn from the labelled ones; the rest are the test set."""
    nuswide_seed: int = 0
    """nuswide, paper split: seed of the train/test subsample (independent of train.seed)."""
    list_train: str = ""
    """list: training list file, CSV (path,labels with ; or | between labels) or JSONL ({"path", "labels"})."""
    list_val: str = ""
    """list: evaluation list file, same format."""
    label_names: str = ""
    """list: label-names file, one class name a line (the class order)."""
    image_root: str = ""
    """list: folder the listed paths are relative to ('' = each list file's folder); nuswide: the image folder ('' = <nuswide_root>/Flickr)."""
    allow_outside_root: bool = False
    """coco, list, nuswide: accept image paths (from the annotation or list files) that are absolute or climb out of their image folder with '..'."""
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
    labelsets_train: str = ""
    """labelsets: training label list, one sample a line: a name then C values 0/1 (e.g. nuswide81_lists/train.txt)."""
    labelsets_test: str = ""
    """labelsets: evaluation label list, same format and C."""
    labelsets_names: str = ""
    """labelsets: class names, one a line ('' = concepts<C>.txt, concepts.txt, classes.txt or labels.txt beside the training list)."""
    labelsets_evidence: float = 0.75
    """labelsets: e in [0, 1], what the evidence alone tells: a visible label's separation is 6e noise SDs (its AUC: 0.86 at 0.25, 0.98 at 0.5, 0.9993 at 0.75)."""
    labelsets_hidden_fraction: float = 0.2
    """labelsets: share of the labels hidden (weak/no evidence), those best predicted by other labels' co-occurrence."""
    labelsets_hidden: str = ""
    """labelsets: comma-separated names of the hidden labels ('' = chosen by labelsets_hidden_fraction)."""
    labelsets_hidden_evidence: float = 0.0
    """labelsets: rho in [0, 1], a hidden label's evidence as a share of a visible label's (0 = none)."""
    labelsets_seed: int = 0
    """labelsets: seed of the evidence noise (the features are a pure function of labels, parameters and seed)."""
    val_fraction: float = 0.0
    """Hold out this share of the training split as a validation split (seeded by val_seed, as fastmlgan reproduce carves it): G trains on the rest, and the thresholds (and raw or EMA weights) are chosen on it at the end of each phase. 0 = off."""
    val_seed: int = 0
    """Seed of the validation split's draw (val_fraction)."""
    shards: str = ""
    """shards: the training shards, a webdataset URL pattern: 'DIR/train-{000000..000123}.tar', or 'pipe:CMD ...' (object stores)."""
    shards_val: str = ""
    """shards: the evaluation shards, same form ('DIR/val-{000000..000009}.tar')."""
    shards_manifest: str = ""
    """shards: the shards' manifest.json ('' = beside the first training shard; needed for pipe: URLs)."""
    shards_window: int = 1024
    """shards: samples shuffled together in a rank's stream (held in memory as JPEG bytes); shard order is shuffled per epoch too."""

    def __post_init__(self) -> None:
        choice("data.dataset", self.dataset, tuple(SOURCES))
        for key in ("labelsets_evidence", "labelsets_hidden_fraction", "labelsets_hidden_evidence"):
            finite(f"data.{key}", getattr(self, key), 0.0, 1.0)
        integer("data.labelsets_seed", self.labelsets_seed, 0)
        finite("data.val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True)
        integer("data.val_seed", self.val_seed, 0, 2**32 - 1)
        choice("data.on_bad_image", self.on_bad_image, ("skip", "error"))
        choice("data.backend", self.backend, BACKEND_CHOICES)
        choice("data.cache_device", self.cache_device, ("cpu", "cuda"))
        finite("data.cache_auto_share", self.cache_auto_share, 0.0, 1.0)
        if SOURCES[self.dataset].holds_features and self.backend == "cache":
            raise ConfigError(
                f"--data.backend cache stores decoded images, but data.dataset={self.dataset} holds feature vectors "
                "(already in memory): use --data.backend auto"
            )
        choice("data.dali_decode", self.dali_decode, ("full", "roi"))
        choice("data.nuswide_split", self.nuswide_split, ("paper", "official"))
        integer("data.num_threads", self.num_threads, 1, 1024)
        positive("data.nuswide_num_train", self.nuswide_num_train)
        finite("data.dali_hw_decoder_load", self.dali_hw_decoder_load, 0.0, 1.0)
        integer("data.image_size", self.image_size, 2, 4096)  # the five-crop's smallest side is 0 below 2
        positive("data.batch_size", self.batch_size)
        positive("data.eval_batch_size", self.eval_batch_size)
        integer("data.num_workers", self.num_workers, 0, 256)
        integer("data.nuswide_seed", self.nuswide_seed, 0)
        integer("data.embedded_num_train", self.embedded_num_train, 1, 10**7)
        integer("data.embedded_num_val", self.embedded_num_val, 1, 10**7)
        integer("data.embedded_image_size", self.embedded_image_size, 16, 4096)  # sources.embedded's smallest scene
        integer("data.embedded_seed", self.embedded_seed, 0)
        integer("data.shards_window", self.shards_window, 1, 10**7)


@dataclass
class ModelConfig:
    backbone: str = "resnet101"
    """Generator backbone: smallcnn (CPU-sized) | mlp (feature inputs) | resnet18/50/101/152 | vgg16 | inception_v3 | timm:NAME (any timm model, the timm extra)."""
    pretrained: str = ""
    """ImageNet weights: '' (random init) | a torchvision weight name (DEFAULT, IMAGENET1K_V1, ResNet101_Weights.IMAGENET1K_V2) | timm: DEFAULT or a weight tag | a local .pth/.safetensors file."""
    width: int = 64
    """smallcnn: channels of the first stage (doubling per stage); mlp: hidden width."""
    depth: int = 2
    """mlp: hidden layers."""
    channels_last: bool = True
    """Use channels_last memory format for CNN backbones on GPU."""

    def __post_init__(self) -> None:
        if not valid_backbone(self.backbone):
            choice("model.backbone", self.backbone, (*BACKBONES, "timm:NAME"))
        integer("model.width", self.width, 1, 2**16)  # the parameter count is checked when G is built
        integer("model.depth", self.depth, 1, 1000)


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
    penalty: str = "explicit"
    """How eq. (5)'s input gradient is computed: explicit (as forward ops through D's layers; first order, compiles) | autograd (textbook double backward)."""
    feature_cache: str = ""
    """Frozen-feature cache file: f_ext of every training image under each of its 25 five-crop windows, computed once (bf16, memory-mapped) and reused by every run with the same f_ext weights, data and geometry; built when missing. '' = compute f_ext every step."""
    feature_batch: int = 0
    """Most images per f_ext forward in phase 2 (0: all of an iteration's images in one forward)."""

    def __post_init__(self) -> None:
        integer("gan.d_steps", self.d_steps, 1, 1000)
        integer("gan.proj_dim", self.proj_dim, 1, 2**16)  # D's parameter count is checked when D is built
        integer("gan.hidden_dim", self.hidden_dim, 1, 2**16)
        integer("gan.num_layers", self.num_layers, 1, 1000)
        finite("gan.inv_temperature", self.inv_temperature, 0.0, lo_open=True)
        finite("gan.bce_weight", self.bce_weight, 0.0)
        finite("gan.gp_weight", self.gp_weight, 0.0)
        finite("gan.negative_slope", self.negative_slope, 0.0, 1.0)
        choice("gan.penalty", self.penalty, ("explicit", "autograd"))
        integer("gan.feature_batch", self.feature_batch, 0)
        if not self.conditional and self.negative_sampling:
            # §4.2.3: rows (c) and (d) drop negative sampling. An unconditional D cannot see x, so a
            # "mismatched" pair would just be another real label set scored as fake.
            raise ConfigError(
                "--gan.conditional false needs --gan.negative_sampling false too (Table 3 (d)): an "
                "unconditional D cannot tell a mismatched label set from a real one"
            )


@dataclass
class LossConfig:
    kind: str = "bce"
    """G's classification term, in phase 1 and as L_logistic in phase 2's eq. (2): bce (eq. 1) | asl (asymmetric loss, Ridnik et al., ICCV 2021)."""
    gamma_neg: float = 4.0
    """asl: focusing exponent of the negatives, gamma- (ASL's recommended 4)."""
    gamma_pos: float = 0.0
    """asl: focusing exponent of the positives, gamma+ (ASL's recommended 0)."""
    clip: float = 0.05
    """asl: probability margin m: a negative's probability p counts as max(p - m, 0) (ASL's recommended 0.05; 0 = none)."""

    def __post_init__(self) -> None:
        choice("loss.kind", self.kind, ("bce", "asl"))
        finite("loss.gamma_neg", self.gamma_neg, 0.0, 100.0)
        finite("loss.gamma_pos", self.gamma_pos, 0.0, 100.0)
        finite("loss.clip", self.clip, 0.0, 1.0, hi_open=True)


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
        # Adam's first step is lr / (1 - beta1) <= lr * 9e15; above 1e10 it overflows float32.
        for name in ("bce_lr", "g_lr", "d_lr"):
            finite(f"optim.{name}", getattr(self, name), 0.0, 1e10, lo_open=True)
        # torch.optim.Adam's own range; beta = 1 would never forget the first gradient.
        finite("optim.beta1", self.beta1, 0.0, 1.0, hi_open=True)
        finite("optim.beta2", self.beta2, 0.0, 1.0, hi_open=True)
        finite("optim.weight_decay", self.weight_decay, 0.0)


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
    """Log losses every N steps (the only host syncs in the loop). A step is one G update in both phases: one batch in phase 1, one iteration of d_steps D updates and a G update in phase 2."""
    eval_every: int = 1
    """Evaluate every N epochs (and always at the end of each phase)."""
    # Measured on the smoke preset (6 BCE + 30 GAN epochs, every step logged): within a phase a
    # loss's magnitude reached at most 1.4x its running median (the signed Wasserstein estimate,
    # near 0, 5x); --optim.bce_lr 1e9 gives 2e9, 4e8x. 1e3 keeps a 100x margin on both sides.
    loss_explosion_ratio: float = 1e3
    """Stop when a logged loss's magnitude exceeds this many times the running median of its magnitudes (0 = off)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of G's weights with this decay (e.g. 0.999), updated after every G step of both phases, evaluated beside the raw weights. 0 = off."""
    ema_warmup: bool = True
    """ema_decay: warm the decay up as timm's ModelEmaV3: min(ema_decay, 1 - (1 + n)^-ema_warmup_power) at the (n+1)-th update (0 at the first: a copy)."""
    ema_warmup_power: float = 2 / 3
    """ema_decay with ema_warmup: the power of the warm-up (timm's default 2/3; 3/4 reaches a decay of 0.999 sooner, at 10k updates)."""

    def __post_init__(self) -> None:
        integer("train.bce_epochs", self.bce_epochs, 0)
        integer("train.gan_epochs", self.gan_epochs, 0)
        integer("train.max_steps_per_epoch", self.max_steps_per_epoch, 0)
        # The trainer seeds torch with seed * 1,000,003 + rank + 7 * step, which must stay below 2**64.
        integer("train.seed", self.seed, 0, 2**32 - 1)
        positive("train.log_every", self.log_every)
        positive("train.eval_every", self.eval_every)
        if self.loss_explosion_ratio != 0:
            finite("train.loss_explosion_ratio", self.loss_explosion_ratio, 1.0, lo_open=True, off=0)
        finite("train.ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        finite("train.ema_warmup_power", self.ema_warmup_power, 0.0, 10.0, lo_open=True)


@dataclass
class PrecisionConfig:
    amp: str = "auto"
    """Autocast dtype for G and f_ext: auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none. D always runs in fp32."""

    def __post_init__(self) -> None:
        choice("precision.amp", self.amp, ("auto", "bf16", "fp16", "none"))


@dataclass
class CompileConfig:
    enable: bool = False
    """torch.compile (fullgraph) the BCE step, the G step and the whole D step (three pair kinds + penalty)."""
    mode: str = "default"
    """torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune."""

    def __post_init__(self) -> None:
        choice("compile.mode", self.mode, ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))


@dataclass
class DistConfig:
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo."""
    timeout_s: int = 1800
    """Collective timeout in seconds."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size in MB (torch's default): each bucket's all-reduce starts as soon as its gradients are ready, overlapping the rest of the backward."""

    def __post_init__(self) -> None:
        choice("dist.backend", self.backend, ("auto", "nccl", "gloo"))
        integer("dist.timeout_s", self.timeout_s, 1, 2**31 - 1)  # c10d keeps it in milliseconds
        finite("dist.bucket_cap_mb", self.bucket_cap_mb, 0.0, 2.0**20, lo_open=True)


@dataclass
class CheckpointConfig:
    enable: bool = True
    """Write checkpoints (checkpoints/step-N.pt, last.pt = the newest) at every epoch end, and as every_* say."""
    keep: int = 2
    """Step checkpoints kept (the newest; a corrupt newest one falls back to the one before)."""
    every_steps: int = 0
    """Also write a checkpoint every N optimizer steps within an epoch (0 = off)."""
    every_minutes: float = 10.0
    """Also write a checkpoint when this many minutes passed since the last one (0 = off): bounds what a kill loses."""

    def __post_init__(self) -> None:
        positive("checkpoint.keep", self.keep)
        integer("checkpoint.every_steps", self.every_steps, 0)
        finite("checkpoint.every_minutes", self.every_minutes, 0.0)


@dataclass
class LogConfig:
    tensorboard: bool = False
    """Write TensorBoard scalars (losses, per-epoch metrics, data-wait share, img/s) to <run>/tensorboard (the tb extra)."""
    plots: bool = True
    """At the end, draw the loss and F1 curves into <run>/curves.png (matplotlib, the plots extra; skipped with a log line without it)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    preset: str = "embedded"
    """The preset the run started from."""
    out: str = ""
    """Run directory ('' = runs/<preset>)."""
    resume: str = ""
    """Run directory to continue from its checkpoints/last.pt."""
    overwrite: bool = False
    """Start over in a non-empty run directory: its old content is moved aside to <out>.replaced-<time> first."""

    def __post_init__(self) -> None:
        if self.compile.enable and self.gan.penalty == "autograd":
            raise ConfigError(
                "--compile.enable true needs --gan.penalty explicit: torch.compile cannot differentiate "
                "the double backward of the autograd penalty"
            )
        holds_features = SOURCES[self.data.dataset].holds_features
        if holds_features and self.model.backbone != "mlp":
            raise ConfigError(f"data.dataset={self.data.dataset} needs model.backbone=mlp (feature vectors are not images)")
        if not holds_features and self.model.backbone == "mlp":
            kinds = " or ".join(kind for kind, source in SOURCES.items() if source.holds_features)
            raise ConfigError(f"model.backbone=mlp is for data.dataset={kinds}; pick a CNN backbone for images")
        smallest = {"vgg16": 32, "inception_v3": 75}.get(self.model.backbone, 2)  # 5 poolings; inception's stem
        if self.data.image_size < smallest:
            raise ConfigError(f"--data.image_size {self.data.image_size}: {self.model.backbone} needs at least {smallest}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = ("data", "model", "gan", "loss", "optim", "train", "precision", "compile", "dist", "checkpoint", "log")
TOP_LEVEL = ("preset", "out", "resume", "overwrite")
# A --config file may not set these: they act on this invocation, not on what the run is. A run's
# config.json holds them too, and taking them from it would resume or replace a run by accident.
NOT_FROM_FILE = ("resume", "overwrite")


SECTION_TYPES: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "gan": GanConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "precision": PrecisionConfig,
    "compile": CompileConfig,
    "dist": DistConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config written by ``Config.to_dict`` (checkpoints, run directories)."""
    sections = {}
    for s in SECTIONS:
        known = {f.name for f in dataclasses.fields(SECTION_TYPES[s])}
        sections[s] = SECTION_TYPES[s](**{k: v for k, v in d.get(s, {}).items() if k in known})
    return Config(**sections, **{k: d[k] for k in TOP_LEVEL if k in d})
