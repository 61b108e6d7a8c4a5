"""The embedded default dataset: a small synthetic multi-label image set with strong label dependency.

It is written to disk exactly like MS-COCO (JPEGs plus COCO instances-format JSON), so the whole
pipeline (COCO reader -> loader -> training) runs without downloading anything.

Structure (``describe()`` prints the exact numbers):

* Every image shows one of five **scenes** (kitchen, street, beach, office, park), drawn uniformly.
  A scene is only a background (colour, texture, noise); it is *not* a label. The scene of each
  image is stored as an extra ``"scene"`` field of its COCO ``images`` entry, for tests and analysis.
* There are 16 **object classes** (the labels), each drawn as its own shape and colour (circle,
  ring, square, frame, triangle, plus, stripes, ...). Given the scene, each object is included
  independently with the probability in ``SCENE_OBJECTS`` (0.25-0.8 for the objects typical of the
  scene, ``STRAY_PROBABILITY`` = 0.02 for any other object). A label set drawn empty is redrawn, so
  every image has at least one label and P(object | scene) = p / (1 - prod(1 - p_j)).
* An included object is drawn once, or twice with probability 0.25 (one annotation per instance).
  Its position is uniform, its side log-uniform in [0.08, 0.45] x image size (at least 3 pixels),
  and its opacity is low (0.15-0.35, nearly background-coloured) for 20% of instances. Small or
  faint objects are hard to see on their own; the objects around them (the scene's label
  co-occurrence) make them guessable, which is the dependency the paper's discriminator learns.

Category ids are non-contiguous like COCO's (COCO's own id where COCO has the class), and the
classes in category-id order are ``OBJECTS``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastmlgan.data.sources.base import Listing, Source
from fastmlgan.data.sources.coco import coco_listing, read_coco
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.safeio import read_text

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bump when the drawing or sampling changes, so ``ensure`` regenerates stale copies."""

JPEG_QUALITY = 90
STRAY_PROBABILITY = 0.02
SECOND_INSTANCE_PROBABILITY = 0.25
FAINT_PROBABILITY = 0.2
SIZE_RANGE = (0.08, 0.45)
MIN_SIDE = 3

SCENES = ("kitchen", "street", "beach", "office", "park")

# (category id, name, shape, RGB colour), in category-id order: this order is the class order.
OBJECTS = (
    (1, "person", "plus", (205, 145, 105)),
    (2, "bicycle", "x", (25, 25, 30)),
    (3, "car", "square", (40, 70, 215)),
    (9, "boat", "inv_triangle", (140, 25, 35)),
    (10, "traffic light", "triangle", (245, 220, 30)),
    (15, "bench", "hbar", (120, 120, 125)),
    (18, "dog", "ellipse", (175, 120, 65)),
    (28, "umbrella", "half_disc", (225, 50, 185)),
    (37, "sports ball", "diamond", (250, 135, 0)),
    (44, "bottle", "vbar", (35, 165, 70)),
    (45, "plate", "ring", (248, 248, 248)),
    (47, "cup", "circle", (225, 35, 35)),
    (62, "chair", "hstripes", (115, 65, 25)),
    (73, "laptop", "frame", (55, 55, 65)),
    (84, "book", "checker", (120, 40, 175)),
    (95, "tree", "vstripes", (20, 95, 30)),  # not a COCO class
)
CLASS_NAMES = tuple(name for _, name, _, _ in OBJECTS)
CATEGORY_IDS = tuple(cid for cid, _, _, _ in OBJECTS)

# Inclusion probability of each object given the scene; every object not listed: STRAY_PROBABILITY.
SCENE_OBJECTS = {
    "kitchen": {"cup": 0.7, "plate": 0.6, "bottle": 0.5, "person": 0.3},
    "street": {"car": 0.75, "traffic light": 0.5, "bicycle": 0.45, "person": 0.6},
    "beach": {"umbrella": 0.6, "boat": 0.5, "sports ball": 0.45, "person": 0.5},
    "office": {"laptop": 0.7, "chair": 0.6, "book": 0.5, "cup": 0.35, "person": 0.4},
    "park": {"tree": 0.8, "bench": 0.5, "dog": 0.45, "sports ball": 0.3, "bicycle": 0.25, "person": 0.5},
}

_SPLIT_KEYS = {"train": 0, "val": 1}
PARAM_DEFAULTS = {"num_train": 2000, "num_val": 500, "image_size": 64, "seed": 0}


@dataclass(frozen=True)
class EmbeddedPaths:
    """Where ``generate`` put the two splits (give them to ``read_coco``)."""

    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path


def inclusion_probabilities() -> np.ndarray:
    """(num_scenes, num_classes) float64: P(object drawn | scene) before the >=1-label redraw."""
    probs = np.full((len(SCENES), len(CLASS_NAMES)), STRAY_PROBABILITY)
    for s, scene in enumerate(SCENES):
        for name, p in SCENE_OBJECTS[scene].items():
            probs[s, CLASS_NAMES.index(name)] = p
    return probs


def label_probabilities() -> np.ndarray:
    """(num_scenes, num_classes): P(object in the label set | scene), after the >=1-label redraw."""
    p = inclusion_probabilities()
    return p / (1.0 - np.prod(1.0 - p, axis=1, keepdims=True))


def pair_probabilities() -> np.ndarray:
    """(num_classes, num_classes): P(a and b both labelled) over the whole set (scenes uniform).

    For a != b the pair implies a non-empty draw, so P(a, b | scene) = p_a p_b / (1 - prod(1 - p_j));
    the diagonal is P(a)."""
    p = inclusion_probabilities()
    nonempty = 1.0 - np.prod(1.0 - p, axis=1)
    joint = np.einsum("sa,sb->ab", p / nonempty[:, None], p) / len(SCENES)
    np.fill_diagonal(joint, label_probabilities().mean(axis=0))
    return joint


def describe() -> str:
    """A readable account of the scenes, objects and their co-occurrence probabilities."""
    given_scene = label_probabilities()
    lines = [
        f"embedded dataset (generator v{GENERATOR_VERSION}): {len(SCENES)} scenes drawn uniformly, "
        f"{len(CLASS_NAMES)} object classes; objects outside a scene's list appear with p={STRAY_PROBABILITY}; "
        "empty label sets are redrawn (every image has >= 1 label).",
        "",
        "objects (category id, name, shape, colour):",
    ]
    lines += [f"  {cid:3d} {name:<14} {shape:<13} rgb{colour}" for cid, name, shape, colour in OBJECTS]
    lines += ["", "P(object in labels | scene), typical objects of each scene:"]
    for s, scene in enumerate(SCENES):
        typical = ", ".join(f"{name} {given_scene[s, CLASS_NAMES.index(name)]:.3f}" for name in SCENE_OBJECTS[scene])
        stray = given_scene[s][inclusion_probabilities()[s] == STRAY_PROBABILITY]
        lines.append(f"  {scene:<8} {typical}; any other object {stray.max():.3f}")
    pairs = pair_probabilities()
    marginal = np.diag(pairs)
    lines += ["", "P(object) over the whole set:"]
    lines.append("  " + ", ".join(f"{n} {marginal[c]:.3f}" for c, n in enumerate(CLASS_NAMES)))
    lift = pairs / np.outer(marginal, marginal)
    order = sorted(
        ((lift[a, b], a, b) for a in range(len(CLASS_NAMES)) for b in range(a + 1, len(CLASS_NAMES))),
        reverse=True,
    )
    lines += ["", "most dependent pairs: lift P(a,b)/(P(a)P(b)) and P(a and b):"]
    for value, a, b in order[:12]:
        lines.append(f"  {CLASS_NAMES[a]} + {CLASS_NAMES[b]}: lift {value:.1f}, P {pairs[a, b]:.3f}")
    lines.append(
        f"  (a typical cross-scene pair such as cup + car: lift {lift[CLASS_NAMES.index('cup'), CLASS_NAMES.index('car')]:.2f})"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Drawing


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape filling its box; u, v in [-1, 1] across the box."""
    centres = (np.arange(side) + 0.5) / side * 2.0 - 1.0  # pixel centres, so small masks stay symmetric
    v, u = np.meshgrid(centres, centres, indexing="ij")
    r2 = u * u + v * v
    au, av = np.abs(u), np.abs(v)
    stripes = 5
    if shape == "circle":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.4)
    if shape == "square":
        return np.maximum(au, av) <= 0.9
    if shape == "frame":
        return (np.maximum(au, av) <= 1.0) & (np.maximum(au, av) >= 0.55)
    if shape == "triangle":
        return au <= (v + 1.0) / 2.0
    if shape == "inv_triangle":
        return au <= (1.0 - v) / 2.0
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "plus":
        return (au <= 0.3) | (av <= 0.3)
    if shape == "x":
        return (np.abs(u - v) <= 0.4) | (np.abs(u + v) <= 0.4)
    if shape == "half_disc":
        return (r2 <= 1.0) & (v <= 0.1)
    if shape == "hbar":
        return av <= 0.35
    if shape == "vbar":
        return au <= 0.35
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "hstripes":
        return np.floor((v + 1.0) * stripes / 2.0001) % 2 == 0
    if shape == "vstripes":
        return np.floor((u + 1.0) * stripes / 2.0001) % 2 == 0
    if shape == "checker":
        return (np.floor((u + 1.0) * 2 / 2.0001) + np.floor((v + 1.0) * 2 / 2.0001)) % 2 == 0
    raise ValueError(f"unknown shape {shape!r}")


class _Painter:
    """Draws backgrounds and objects for one image size; caches masks and coordinate grids."""

    def __init__(self, image_size: int):
        self.size = image_size
        self.rows = np.arange(image_size, dtype=np.float32)[:, None, None]
        self.cols = np.arange(image_size, dtype=np.float32)[None, :, None]
        self._masks: dict[tuple[str, int], np.ndarray] = {}

    def mask(self, shape: str, side: int) -> np.ndarray:
        key = (shape, side)
        if key not in self._masks:
            self._masks[key] = _shape_mask(shape, side)
        return self._masks[key]

    def background(self, scene: str, rng: np.random.Generator) -> np.ndarray:
        size, rows, cols = self.size, self.rows, self.cols
        img = np.empty((size, size, 3), np.float32)
        if scene == "kitchen":  # beige tiles with darker grout lines
            img[:] = (222, 205, 172)
            period = max(4, size // 8)
            dy, dx = rng.integers(0, period, 2)
            grout = (((rows + dy) % period) < 1) | (((cols + dx) % period) < 1)
            img = np.where(grout, np.float32(0.8) * img, img)
        elif scene == "street":  # asphalt, a sidewalk band on top, a dashed lane line
            img[:] = (105, 105, 110)
            walk = int(size * rng.uniform(0.15, 0.35))
            img[:walk] = (160, 155, 150)
            lane = int(size * rng.uniform(0.55, 0.85))
            dash = max(2, size // 8)
            line = (np.abs(rows - lane) < max(1, size // 32)) & ((cols // dash) % 2 == 0)
            img = np.where(line, np.float32(235), img)
        elif scene == "beach":  # sky above a random horizon, sand below
            horizon = int(size * rng.uniform(0.3, 0.55))
            img[:horizon] = (125, 185, 235)
            img[horizon:] = (232, 212, 155)
        elif scene == "office":  # a wall shading downwards and a wooden desk band
            t = rows / max(1, size - 1)
            img[:] = (1 - t) * np.float32((205, 208, 218)) + t * np.float32((165, 170, 185))
            desk = int(size * rng.uniform(0.7, 0.85))
            img[desk:] = (140, 110, 80)
        elif scene == "park":  # grass with coarse blotches
            img[:] = (70, 150, 60)
            cells = max(2, size // 8)
            blotch = rng.normal(0.0, 18.0, (cells, cells, 1)).astype(np.float32)
            reps = -(-size // cells)
            img += np.repeat(np.repeat(blotch, reps, 0), reps, 1)[:size, :size]
        else:
            raise ValueError(f"unknown scene {scene!r}")
        img *= np.float32(rng.uniform(0.8, 1.15))
        img += rng.normal(0.0, 8.0, 3).astype(np.float32)
        return img

    def draw_object(self, img: np.ndarray, class_index: int, rng: np.random.Generator) -> list[float]:
        """Alpha-blend one instance into ``img``; returns its COCO bbox [x, y, w, h] and area."""
        size = self.size
        _, _, shape, colour = OBJECTS[class_index]
        log_lo, log_hi = math.log(SIZE_RANGE[0]), math.log(SIZE_RANGE[1])
        side = max(MIN_SIDE, int(round(size * math.exp(rng.uniform(log_lo, log_hi)))))
        side = min(side, size)
        top, left = (int(x) for x in rng.integers(0, size - side + 1, 2))
        if rng.random() < FAINT_PROBABILITY:
            alpha = rng.uniform(0.15, 0.35)
        else:
            alpha = rng.uniform(0.6, 1.0)
        tint = np.float32(colour) + rng.normal(0.0, 12.0, 3).astype(np.float32)
        mask = self.mask(shape, side)
        patch = img[top : top + side, left : left + side]
        patch[mask] = (1.0 - alpha) * patch[mask] + alpha * tint
        return [float(left), float(top), float(side), float(side), float(mask.sum())]


def _split_dir(split: str) -> str:
    return f"{split}2017"


def _render_split(split: str, out: Path, num_images: int, image_size: int, seed: int) -> dict:
    """Write one split's JPEGs under ``out`` and return its COCO instances dict."""
    painter = _Painter(image_size)
    probs = inclusion_probabilities()
    images_dir = out / _split_dir(split)
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    id_base = 1_000_000 * _SPLIT_KEYS[split]
    for i in range(num_images):
        # One generator per image: any image can be regenerated alone, whatever the split sizes.
        rng = np.random.default_rng([seed, _SPLIT_KEYS[split], i])
        s = int(rng.integers(len(SCENES)))
        present = rng.random(len(CLASS_NAMES)) < probs[s]
        while not present.any():
            present = rng.random(len(CLASS_NAMES)) < probs[s]
        instances = []
        for c in np.flatnonzero(present):
            instances += [int(c)] * (2 if rng.random() < SECOND_INSTANCE_PROBABILITY else 1)
        rng.shuffle(instances)  # random depth order: objects occlude each other
        img = painter.background(SCENES[s], rng)
        boxes = [painter.draw_object(img, c, rng) for c in instances]
        img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)  # sensor noise over everything
        pixels = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        image_id = id_base + i + 1
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(images_dir / file_name, quality=JPEG_QUALITY)
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size, "scene": SCENES[s]}
        )
        for c, box in zip(instances, boxes):
            annotations.append(
                {
                    "id": len(annotations) + 1 + id_base,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[c],
                    "bbox": box[:4],
                    "area": box[4],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": cid, "name": name, "supercategory": _supercategory(name)} for cid, name, _, _ in OBJECTS]
    return {
        "info": {"description": f"fastmlgan embedded synthetic dataset, {split} split", "version": GENERATOR_VERSION},
        "images": images,
        "categories": categories,
        "annotations": annotations,
    }


def _supercategory(name: str) -> str:
    scenes = [scene for scene in SCENES if name in SCENE_OBJECTS[scene]]
    return scenes[0] if len(scenes) == 1 else "shared"


def _paths(root: Path) -> EmbeddedPaths:
    return EmbeddedPaths(
        train_ann=root / "annotations" / "instances_train.json",
        train_images=root / _split_dir("train"),
        val_ann=root / "annotations" / "instances_val.json",
        val_images=root / _split_dir("val"),
    )


def _check_params(params: dict) -> dict:
    unknown = sorted(set(params) - set(PARAM_DEFAULTS))
    if unknown:
        raise ConfigError(f"embedded dataset: unknown parameter(s) {unknown}; known: {sorted(PARAM_DEFAULTS)}")
    full = {**PARAM_DEFAULTS, **params}
    for key in ("num_train", "num_val", "image_size", "seed"):
        if not isinstance(full[key], (int, np.integer)) or isinstance(full[key], bool):
            raise ConfigError(f"embedded dataset: {key} must be an integer, got {full[key]!r}")
        full[key] = int(full[key])
    if not (1 <= full["num_train"] <= 10**7 and 1 <= full["num_val"] <= 10**7):
        raise ConfigError("embedded dataset: num_train and num_val must be in [1, 10000000]")
    if not 16 <= full["image_size"] <= 4096:
        raise ConfigError(f"embedded dataset: image_size must be in [16, 4096], got {full['image_size']}")
    if not 0 <= full["seed"] <= 2**32 - 1:  # numpy's seed range
        raise ConfigError(f"embedded dataset: seed must be in [0, 4294967295], got {full['seed']}")
    return full


def _manifest(params: dict) -> dict:
    return {
        # The module's name before fastmlgan.data existed: changing it would regenerate every
        # existing dataset (ensure compares manifests), and the images would be the same.
        "generator": "fastmlgan.loaders.embedded",
        "generator_version": GENERATOR_VERSION,
        "params": params,
        "jpeg_quality": JPEG_QUALITY,
        "scenes": list(SCENES),
        "class_names": list(CLASS_NAMES),
    }


def generate(root, num_train: int = 2000, num_val: int = 500, image_size: int = 64, seed: int = 0) -> EmbeddedPaths:
    """Write the dataset under ``root`` (replacing an earlier embedded dataset there).

    Everything is written into a temporary sibling folder that is renamed to ``root`` at the end,
    so a crash never leaves a half-written dataset behind."""
    params = _check_params(dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed))
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: not a folder; the embedded dataset needs a folder (--data.root)")
    if root.exists() and any(root.iterdir()) and not (root / "dataset.json").is_file():
        raise DataError(
            f"{root}: refusing to replace a non-empty folder that is not an embedded dataset (no dataset.json)"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.parent / f".{root.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    start = time.perf_counter()
    try:
        (partial / "annotations").mkdir(parents=True)
        for split, count in (("train", params["num_train"]), ("val", params["num_val"])):
            coco = _render_split(split, partial, count, params["image_size"], params["seed"])
            with open(partial / "annotations" / f"instances_{split}.json", "w") as f:
                json.dump(coco, f, separators=(",", ":"))
        with open(partial / "dataset.json", "w") as f:
            json.dump(_manifest(params), f, indent=2, sort_keys=True)
        if root.exists():
            stale = root.parent / f".{root.name}.stale-{os.getpid()}"
            root.rename(stale)
            partial.rename(root)
            shutil.rmtree(stale)
        else:
            partial.rename(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info(
        "wrote embedded dataset to %s (%d train + %d val images at %dpx, seed %d) in %.1f s",
        root,
        params["num_train"],
        params["num_val"],
        params["image_size"],
        params["seed"],
        time.perf_counter() - start,
    )
    return _paths(root)


def ensure(root, **params) -> EmbeddedPaths:
    """Reuse the dataset under ``root`` when its ``dataset.json`` matches ``params``, else regenerate."""
    params = _check_params(params)
    root = Path(root)
    manifest_file = root / "dataset.json"
    paths = _paths(root)
    reason = None
    if not manifest_file.is_file():
        reason = "no dataset.json"
    else:
        try:
            found = json.loads(read_text(manifest_file, "embedded manifest"))
        except (DataError, ValueError, RecursionError) as e:
            found, reason = None, f"unreadable dataset.json ({e})"
        found = found if isinstance(found, dict) else None
        if found is not None:
            expected = _manifest(params)
            diff = [k for k in expected if found.get(k) != expected[k]]
            if diff:
                reason = "; ".join(f"{k}: {found.get(k)!r} -> {expected[k]!r}" for k in diff)
            elif not all(p.exists() for p in (paths.train_ann, paths.val_ann, paths.train_images, paths.val_images)):
                reason = "files missing"
    if reason is None:
        logger.info("reusing embedded dataset at %s", root)
        return paths
    logger.info("generating embedded dataset at %s (%s)", root, reason)
    return generate(root, **params)


class EmbeddedSource(Source):
    """The embedded synthetic set, generated under ``--data.root`` on first use (``--data.dataset embedded``)."""

    kind = "embedded"
    prepared_by_rank0 = True

    def paths(self, cfg) -> EmbeddedPaths:
        return ensure(cfg.root, num_train=cfg.embedded_num_train, num_val=cfg.embedded_num_val,
                      image_size=cfg.embedded_image_size, seed=cfg.embedded_seed)

    def read(self, cfg) -> tuple[LabeledImages, LabeledImages]:
        paths = self.paths(cfg)
        train = read_coco(paths.train_ann, paths.train_images, cfg.drop_unlabeled, name="embedded-train")
        val = read_coco(paths.val_ann, paths.val_images, cfg.drop_unlabeled, name="embedded-val")
        return train, val

    def listings(self, cfg) -> list[Listing]:
        paths = self.paths(cfg)
        return [coco_listing("train", paths.train_ann, paths.train_images),
                coco_listing("val", paths.val_ann, paths.val_images)]
