"""The embedded synthetic dataset: determinism, structure on disk, and the documented label statistics."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fastmlgan.commands import embedded as embedded_command
from fastmlgan.data.sources import coco, embedded
from fastmlgan.data.sources.embedded import (
    CATEGORY_IDS,
    CLASS_NAMES,
    SCENE_OBJECTS,
    SCENES,
    describe,
    ensure,
    generate,
    label_probabilities,
    pair_probabilities,
)
from fastmlgan.errors import DataError

# Family-wise false-failure rate of each statistical test below, over the seeds the dataset could
# be drawn with (Bonferroni over the cells tested, exact binomial tails).
FAMILY_ALPHA = 1e-4


def binomial_two_sided_p(k: int, n: int, p: float) -> float:
    """Exact two-sided p-value of k successes in n Bernoulli(p) trials (doubled smaller tail)."""
    x = np.arange(n + 1)
    log_pmf = (
        np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in x])
        + x * math.log(p)
        + (n - x) * math.log1p(-p)
    )
    pmf = np.exp(log_pmf)
    return float(min(1.0, 2 * min(pmf[: k + 1].sum(), pmf[k:].sum())))


def image_label_sets(ann_file: Path) -> tuple[list[dict], dict[int, set[int]]]:
    """The images entries and image id -> set of class indices, straight from the JSON."""
    data = json.loads(ann_file.read_text())
    column = {cid: c for c, cid in enumerate(CATEGORY_IDS)}
    labels: dict[int, set[int]] = {im["id"]: set() for im in data["images"]}
    for ann in data["annotations"]:
        labels[ann["image_id"]].add(column[ann["category_id"]])
    return data["images"], labels


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = all_files(generate(tmp_path / "a", num_train=12, num_val=4, image_size=32, seed=3).train_ann.parents[1])
    b = all_files(generate(tmp_path / "b", num_train=12, num_val=4, image_size=32, seed=3).train_ann.parents[1])
    c = all_files(generate(tmp_path / "c", num_train=12, num_val=4, image_size=32, seed=4).train_ann.parents[1])
    assert len(a) == 12 + 4 + 3  # images, two annotation files, dataset.json
    assert a == b
    assert a.keys() == c.keys()
    differing = [name for name in a if a[name] != c[name]]
    assert "annotations/instances_train.json" in differing
    assert sum(name.endswith(".jpg") for name in differing) == 16


def test_layout_and_coco_fields(embedded_small):
    data = json.loads(embedded_small.train_ann.read_text())
    assert [c["id"] for c in data["categories"]] == list(CATEGORY_IDS)
    assert list(CATEGORY_IDS) != list(range(1, len(CATEGORY_IDS) + 1))  # non-contiguous, like COCO
    assert {"id", "file_name", "width", "height"} <= set(data["images"][0])
    for ann in data["annotations"][:200]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 32 and y + h <= 32 and 0 < ann["area"] <= w * h
        assert ann["iscrowd"] == 0
    files = sorted(p.name for p in embedded_small.train_images.iterdir())
    assert files == sorted(im["file_name"] for im in data["images"])
    manifest = json.loads((embedded_small.train_ann.parents[1] / "dataset.json").read_text())
    assert manifest["params"] == {"num_train": 2000, "num_val": 200, "image_size": 32, "seed": 0}
    train_ids = {im["id"] for im in data["images"]}
    val_ids = {im["id"] for im in json.loads(embedded_small.val_ann.read_text())["images"]}
    assert not train_ids & val_ids


def test_every_image_has_a_label(embedded_small):
    for ann_file in (embedded_small.train_ann, embedded_small.val_ann):
        _, labels = image_label_sets(ann_file)
        assert min(len(s) for s in labels.values()) >= 1


def test_object_given_scene_matches_documented_probabilities(embedded_small):
    """5 scenes x 16 objects: each measured P(object | scene) within an exact binomial bound.

    False-failure rate <= FAMILY_ALPHA (Bonferroni over the 80 cells + 5 scene frequencies)."""
    images, labels = image_label_sets(embedded_small.train_ann)
    expected = label_probabilities()
    cells = len(SCENES) * len(CLASS_NAMES) + len(SCENES)
    scene_counts = Counter(im["scene"] for im in images)
    for scene in SCENES:
        assert binomial_two_sided_p(scene_counts[scene], len(images), 1 / len(SCENES)) > FAMILY_ALPHA / cells
    for s, scene in enumerate(SCENES):
        in_scene = [labels[im["id"]] for im in images if im["scene"] == scene]
        for c, name in enumerate(CLASS_NAMES):
            k = sum(c in present for present in in_scene)
            p_value = binomial_two_sided_p(k, len(in_scene), expected[s, c])
            assert p_value > FAMILY_ALPHA / cells, (scene, name, k / len(in_scene), expected[s, c])


def test_pair_cooccurrence_matches_documented_structure(embedded_small):
    """Every pair's P(a and b) within an exact binomial bound (false-failure rate <= FAMILY_ALPHA,
    Bonferroni over the 120 pairs), and in-scene pairs far more dependent than cross-scene ones."""
    _, labels = image_label_sets(embedded_small.train_ann)
    y = np.zeros((len(labels), len(CLASS_NAMES)), dtype=np.int64)
    for row, present in enumerate(labels.values()):
        y[row, sorted(present)] = 1
    counts = y.T @ y
    expected = pair_probabilities()
    num_pairs = len(CLASS_NAMES) * (len(CLASS_NAMES) - 1) // 2
    for a in range(len(CLASS_NAMES)):
        for b in range(a + 1, len(CLASS_NAMES)):
            p_value = binomial_two_sided_p(int(counts[a, b]), len(y), expected[a, b])
            assert p_value > FAMILY_ALPHA / num_pairs, (CLASS_NAMES[a], CLASS_NAMES[b])

    marginal = y.mean(axis=0)
    lift = (counts / len(y)) / np.outer(marginal, marginal)
    # Objects typical of exactly one scene: pairs from one scene vs pairs from two different scenes.
    home = {
        CLASS_NAMES.index(name): scene
        for scene, objs in SCENE_OBJECTS.items()
        for name in objs
        if sum(name in other for other in SCENE_OBJECTS.values()) == 1
    }
    pairs = [(a, b) for a in home for b in home if a < b]
    same = [(a, b) for a, b in pairs if home[a] == home[b]]
    cross = [(a, b) for a, b in pairs if home[a] != home[b]]
    assert (len(same), len(cross)) == (9, 57)
    assert min(lift[a, b] for a, b in same) > 2.0
    assert np.mean([lift[a, b] for a, b in cross]) < 0.5


def test_reads_back_through_read_coco(embedded_small):
    train = coco.read_coco(embedded_small.train_ann, embedded_small.train_images)
    val = coco.read_coco(embedded_small.val_ann, embedded_small.val_images)
    assert (len(train), len(val)) == (2000, 200)
    assert train.class_names == val.class_names == list(CLASS_NAMES)
    assert train.num_dropped_unlabeled == 0 and train.missing == []
    images, labels = image_label_sets(embedded_small.train_ann)
    for row in (0, 1, 777, 1999):
        assert Path(train.paths[row]).name == images[row]["file_name"]
        assert set(np.flatnonzero(train.labels[row])) == labels[images[row]["id"]]
    assert train.labels.sum(axis=1).min() >= 1


def test_ensure_reuses_matching_and_regenerates_otherwise(tmp_path, caplog):
    root = tmp_path / "emb"
    params = dict(num_train=6, num_val=3, image_size=32, seed=1)
    with caplog.at_level(logging.INFO, logger="fastmlgan.data.sources.embedded"):
        paths = ensure(root, **params)
        assert "generating" in caplog.text and "no dataset.json" in caplog.text
        marker = paths.train_images / "marker"
        marker.write_text("kept when reused")
        caplog.clear()
        ensure(root, **params)
        assert "reusing" in caplog.text and marker.exists()
        caplog.clear()
        ensure(root, **{**params, "seed": 2})
        assert "generating" in caplog.text and "params" in caplog.text
    assert not marker.exists()
    assert json.loads((root / "dataset.json").read_text())["params"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]  # no partial or stale folders left


def test_crash_leaves_previous_dataset_intact(tmp_path, monkeypatch):
    root = tmp_path / "emb"
    generate(root, num_train=4, num_val=2, image_size=32, seed=0)
    before = all_files(root)
    real = embedded._render_split

    def crash_on_val(split, *args):
        if split == "val":
            raise RuntimeError("simulated crash")
        return real(split, *args)

    monkeypatch.setattr(embedded, "_render_split", crash_on_val)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(root, num_train=5, num_val=2, image_size=32, seed=9)
    assert all_files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not an embedded dataset"):
        generate(tmp_path / "mine", num_train=2, num_val=1, image_size=32)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_cli_writes_dataset(tmp_path, capsys):
    assert (
        embedded_command.main(["--out", str(tmp_path / "cli"), "--num-train", "3", "--num-val", "2", "--image-size", "16"]) == 0
    )
    assert len(list((tmp_path / "cli" / "train2017").glob("*.jpg"))) == 3
    assert "train_ann:" in capsys.readouterr().out


def test_describe_states_the_probabilities():
    text = describe()
    probs = label_probabilities()
    for s, scene in enumerate(SCENES):
        assert scene in text
        for name in SCENE_OBJECTS[scene]:
            assert f"{name} {probs[s, CLASS_NAMES.index(name)]:.3f}" in text
