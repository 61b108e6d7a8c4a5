"""Property-based fuzzing of the COCO, list and NUS-WIDE readers with hypothesis.

Each reader gets random valid inputs, and inputs with one named defect each (wrong types,
duplicates, unknown references, NUL characters...) plus now and then a second, and mutated bytes. The property: the
reader either raises a ``FastMLGANError`` (one line) or returns exactly what a simple independent
reading of the same input gives, and it raises exactly when that reading finds the input invalid.
Any other exception fails the test. The reference readings below are written from the documented
formats, not from the readers' code. Derandomized (the same examples every run) and without an
example database, so the default suite is deterministic; the ``slow`` variants draw new examples
on every run (a failure prints the input that reproduces it).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastmlgan.data.sources import nuswide
from fastmlgan.data.sources.coco import read_coco
from fastmlgan.data.sources.listfile import read_list
from fastmlgan.errors import FastMLGANError

# Per defect kind (hypothesis draws the first choices of sampled_from far more often than the last,
# so each kind gets its own run instead of being one draw among many).
FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
# The slow variants draw fresh examples on every run (not derandomized): over CI runs they see far
# more inputs than the fixed default set, at about the same cost (~25 s here).
SLOW = settings(FAST, max_examples=30, derandomize=False)

# The image folder every reader looks into: six files, one subfolder (a folder is not an image).
# U+2028 and form feed are no line ends (str.splitlines would split the names).
PRESENT = ("a.jpg", "b.jpg", "c,d.jpg", "sub/e.jpg", "u\u2028v.jpg", "f\x0cg.jpg")


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for name in PRESENT:
            (root / "img" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "img" / name).write_bytes(b"jpeg")
        yield root


def is_image(root: Path, name: str) -> bool:
    """Ground truth: an existing regular file (the name resolved by the OS)."""
    try:
        return os.path.isfile(os.path.join(root, name))
    except (ValueError, OSError):
        return False


ERROR = "error"


def check(call, expected):
    """``call()`` must raise FastMLGANError (one line) when ``expected`` is ERROR and return
    ``expected`` (compared by ``summary``) otherwise; any other exception propagates."""
    event("invalid input" if expected == ERROR else "valid input")
    try:
        result = call()
    except FastMLGANError as e:
        assert "\n" not in str(e), str(e)
        assert expected == ERROR, f"rejected a valid input: {e}"
        return None
    assert expected != ERROR, f"accepted an invalid input: {summary(result)}"
    assert summary(result) == expected
    return result


def summary(images) -> dict:
    return {
        "class_names": list(images.class_names),
        "paths": list(images.paths),
        "labels": np.asarray(images.labels).tolist(),
        "num_dropped": images.num_dropped_unlabeled,
        "missing": list(images.missing),
    }


def finish(root: Path, class_names, rows, drop_unlabeled: bool):
    """Shared last step of the references: rows = [(file name, set of columns)] in file order."""
    kept = [(name, cols) for name, cols in rows if cols or not drop_unlabeled]
    paths, labels, missing = [], [], []
    for name, cols in kept:
        path = str(root / name)
        if is_image(root, name):
            paths.append(path)
            labels.append([int(c in cols) for c in range(len(class_names))])
        else:
            missing.append(path)
    if not paths:
        event("no usable image")
        return ERROR
    return {"class_names": class_names, "paths": paths, "labels": labels,
            "num_dropped": len(rows) - len(kept), "missing": missing}


# ----------------------------------------------------------------------------------------------
# COCO


def anything_but_int():
    return st.one_of(st.text(max_size=2), st.none(), st.floats(allow_nan=True), st.booleans(), st.just([1]),
                     st.just(1.0))


FILE_NAMES = [*PRESENT, *PRESENT, "missing.jpg", "sub", "./a.jpg", "sub/../b.jpg", "x/../a.jpg", "d/" + "x" * 300]
CATEGORY_NAMES = ["cat", "dog", "bird", "cat ", "Cat", "big bird", "é"]
COCO_DEFECTS = [
    "image-id-type", "category-id-type", "annotation-image-id-type", "annotation-category-id-type",
    "duplicate-image-id", "duplicate-category-id", "duplicate-category-name", "unknown-image", "unknown-category",
    "bad-file-name", "bad-category-name", "drop-key", "drop-field", "not-list", "not-object", "entry-not-object",
]


@st.composite
def coco_documents(draw, defect: str | None):
    """A valid document, or one with ``defect`` (and now and then a second, random one).
    Valid variations: negative and 2**40 ids, ids out of list order, repeated annotations,
    crowd flags, file names that are absent, in subfolders, or need the OS to resolve."""
    image_ids = draw(st.lists(st.integers(-5, 2**40), unique=True, min_size=1, max_size=6))
    images = [{"id": i, "file_name": draw(st.sampled_from(FILE_NAMES)), "width": 8} for i in image_ids]
    category_ids = draw(st.lists(st.integers(0, 100), unique=True, min_size=1, max_size=4))
    category_names = draw(st.lists(st.sampled_from(CATEGORY_NAMES), unique=True, min_size=len(category_ids),
                                   max_size=len(category_ids)))
    categories = [{"id": i, "name": n, "supercategory": "x"} for i, n in zip(category_ids, category_names)]
    annotations = [{"id": k, "image_id": draw(st.sampled_from(image_ids)),
                    "category_id": draw(st.sampled_from(category_ids)), "iscrowd": draw(st.sampled_from([0, 1]))}
                   for k in range(draw(st.integers(1, 10)))]
    doc = {"images": images, "categories": categories, "annotations": annotations, "info": {}}
    if defect is not None:
        doc = _coco_defect(draw, doc, defect)
        if draw(st.integers(0, 3)) == 0:
            doc = _coco_defect(draw, doc, draw(st.sampled_from(COCO_DEFECTS)))
    return doc


def _dicts(doc, key):
    """The object entries of ``doc[key]``; none when an earlier defect made it a non-list."""
    value = doc.get(key)
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def _coco_defect(draw, doc, defect):
    if not isinstance(doc, dict):
        return doc
    section, _, rest = defect.partition("-")
    section = {"image": "images", "category": "categories", "annotation": "annotations"}.get(section)
    entries = _dicts(doc, section) if section else []
    if section and not entries:
        return doc
    if defect.endswith("-type"):
        field = {"id-type": "id", "image-id-type": "image_id", "category-id-type": "category_id"}[rest]
        draw(st.sampled_from(entries))[field] = draw(anything_but_int())
    elif defect.startswith("duplicate-"):
        key = "images" if defect == "duplicate-image-id" else "categories"
        entries = _dicts(doc, key)
        if entries:
            copy = dict(draw(st.sampled_from(entries)))
            if defect == "duplicate-category-id":
                copy["name"] = "new name"
            elif defect == "duplicate-category-name":
                copy["id"] = draw(st.integers(101, 200))
            doc[key].append(copy)
    elif defect.startswith("unknown-"):
        anns = _dicts(doc, "annotations")
        if anns:
            draw(st.sampled_from(anns))[defect[8:] + "_id"] = draw(st.integers(-(2**70), 2**70))
    elif defect.startswith("bad-"):
        key, field = ("images", "file_name") if defect == "bad-file-name" else ("categories", "name")
        entries = _dicts(doc, key)
        if entries:
            draw(st.sampled_from(entries))[field] = draw(st.sampled_from(["", " ", "a\x00", 3, None, ["a"]]))
    elif defect == "drop-key":
        doc.pop(draw(st.sampled_from(["images", "categories", "annotations"])), None)
    elif defect == "drop-field":
        entries = [e for k in ("images", "categories", "annotations") for e in _dicts(doc, k)]
        if entries:
            entry = draw(st.sampled_from(entries))
            entry.pop(draw(st.sampled_from(sorted(entry))))
    elif defect == "not-list":
        doc[draw(st.sampled_from(["images", "categories", "annotations"]))] = draw(st.sampled_from([{}, "x", None, 1]))
    elif defect == "not-object":
        doc = draw(st.sampled_from([[doc], "coco", None, 3]))
    elif defect == "entry-not-object":
        lists = [k for k in ("images", "categories", "annotations") if isinstance(doc.get(k), list)]
        if lists:
            doc[draw(st.sampled_from(lists))].append(draw(st.sampled_from([1, "x", None, []])))
    return doc


def coco_reference(doc, root: Path, drop_unlabeled: bool):
    """The COCO instances format as documented: integer ids, unique image ids, category ids and
    names, non-empty file names and category names, every annotation naming a listed image and
    category; classes in category-id order."""
    if type(doc) is not dict:
        return ERROR
    need = {"images": ("id", "file_name"), "categories": ("id", "name"), "annotations": ("image_id", "category_id")}
    for key, fields in need.items():
        if type(doc.get(key)) is not list:
            return ERROR
        for entry in doc[key]:
            if type(entry) is not dict or any(f not in entry for f in fields):
                return ERROR

    def integer(v):
        return type(v) is int

    def text(v):
        return type(v) is str and v.strip() != "" and "\x00" not in v

    images, categories, annotations = doc["images"], doc["categories"], doc["annotations"]
    if not all(integer(i["id"]) and text(i["file_name"]) for i in images):
        return ERROR
    if not all(integer(c["id"]) and text(c["name"]) for c in categories):
        return ERROR
    if not all(integer(a["image_id"]) and integer(a["category_id"]) for a in annotations):
        return ERROR
    for values in ([i["id"] for i in images], [c["id"] for c in categories], [c["name"] for c in categories]):
        if len(set(values)) != len(values):
            return ERROR
    by_id = sorted(categories, key=lambda c: c["id"])
    column = {c["id"]: j for j, c in enumerate(by_id)}
    row_of = {i["id"]: r for r, i in enumerate(images)}
    columns = [set() for _ in images]
    for a in annotations:
        if a["image_id"] not in row_of or a["category_id"] not in column:
            return ERROR
        columns[row_of[a["image_id"]]].add(column[a["category_id"]])
    rows = [(i["file_name"], cols) for i, cols in zip(images, columns)]
    return finish(root, [c["name"] for c in by_id], rows, drop_unlabeled)


def _fuzz_coco(workdir, doc, drop):
    path = workdir / "ann.json"
    path.write_text(json.dumps(doc))
    check(lambda: read_coco(path, workdir / "img", drop_unlabeled=drop), coco_reference(doc, workdir / "img", drop))


@pytest.mark.parametrize("defect", [None, None, *COCO_DEFECTS])
def test_coco_fuzz(workdir, defect):
    @FAST
    @given(doc=coco_documents(defect), drop=st.booleans())
    def run(doc, drop):
        _fuzz_coco(workdir, doc, drop)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("defect", [None, *COCO_DEFECTS])
def test_coco_fuzz_more(workdir, defect):
    @SLOW
    @given(doc=coco_documents(defect), drop=st.booleans())
    def run(doc, drop):
        _fuzz_coco(workdir, doc, drop)

    run()


def mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, pos, byte in edits:
        if not out:
            break
        pos %= len(out)
        if kind == "set":
            out[pos] = byte
        elif kind == "insert":
            out.insert(pos, byte)
        elif kind == "delete":
            del out[pos]
        else:
            del out[pos:]
    return bytes(out)


# Byte edits; half of the bytes written are digits, which often leave the JSON valid (other ids).
EDITS = st.lists(st.tuples(st.sampled_from(["set", "set", "insert", "delete", "truncate"]), st.integers(0, 10**6),
                           st.one_of(st.integers(0x30, 0x39), st.integers(0, 255))), min_size=1, max_size=3)


@settings(FAST, max_examples=150)
@given(edits=EDITS)
def test_coco_fuzz_mutated_bytes(workdir, edits):
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
           "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
           "annotations": [{"image_id": 1, "category_id": 3}, {"image_id": 2, "category_id": 1}]}
    data = mutate(json.dumps(doc).encode(), edits)
    path = workdir / "mutated.json"
    path.write_bytes(data)
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError)
        expected = ERROR
    else:
        expected = coco_reference(parsed, workdir / "img", True)
    check(lambda: read_coco(path, workdir / "img"), expected)


# ----------------------------------------------------------------------------------------------
# List files

LABELS = ["cat", "dog", "big bird", "x", "é"]
LIST_PATHS = [*PRESENT, *PRESENT, *PRESENT, "missing.jpg", "sub", "Path", " a.jpg ", "a\u2028.jpg", "b\x0cc.jpg", "d/" + "x" * 300,
              "a\x00.jpg"]
LIST_DEFECTS = ["repeat-name", "unknown-label", "empty-path", "no-names", "labels-not-list", "not-object", "not-json"]


@st.composite
def list_inputs(draw, defect: str | None):
    """(names file text, list file name, list file text, expected), valid but for ``defect``
    (and now and then a second one), with line ends, blank lines, a byte-order mark, padding,
    separators, quoting and header drawn at random."""
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    defects = {defect} - {None}
    if defects and draw(st.integers(0, 3)) == 0:
        defects.add(draw(st.sampled_from(LIST_DEFECTS)))
    names = draw(st.lists(st.sampled_from(LABELS), unique=True, min_size=1, max_size=len(LABELS)))
    if "repeat-name" in defects:
        names.append(draw(st.sampled_from(names)))
    if "no-names" in defects:
        names = []
    padded = [draw(st.sampled_from(["", " ", "\t"])) + n + draw(st.sampled_from(["", " "])) for n in names]
    for k in sorted(draw(st.sets(st.integers(0, len(padded)), max_size=2)), reverse=True):
        padded.insert(k, draw(st.sampled_from(["", "  "])))  # blank lines
    names_text = ("\ufeff" if draw(st.booleans()) else "") + "".join(n + newline for n in padded)
    fmt = draw(st.sampled_from(["csv", "jsonl"]))
    pool = names or LABELS
    rows = [(draw(st.sampled_from(LIST_PATHS)), draw(st.lists(st.sampled_from(pool), max_size=3)))
            for _ in range(draw(st.integers(0, 6) if draw(st.booleans()) else st.integers(2, 6)))]
    if rows and "unknown-label" in defects:
        rows[draw(st.integers(0, len(rows) - 1))][1].append("horse")
    if rows and "empty-path" in defects:
        k = draw(st.integers(0, len(rows) - 1))
        rows[k] = (draw(st.sampled_from(["", " "])) if fmt == "csv" else "", rows[k][1] or [pool[0]])
    bad_jsonl = next((d for d in ("labels-not-list", "not-object", "not-json") if d in defects), None)
    bad_jsonl = bad_jsonl if fmt == "jsonl" and rows else None
    header = fmt == "csv" and draw(st.booleans())
    blank_after = draw(st.sets(st.integers(0, 6), max_size=2))
    out = io.StringIO(newline="")
    if header:
        out.write("path,labels" + newline)
    writer = csv.writer(out, lineterminator=newline)
    for k, (path, labels) in enumerate(rows):
        if fmt == "csv":
            sep = draw(st.sampled_from([";", "|", " ; "]))
            writer.writerow([path, sep.join(labels)])
        else:
            record = {"path": path, "labels": labels}
            if k == 0 and bad_jsonl == "labels-not-list":
                record["labels"] = "cat"
            text = json.dumps(record, ensure_ascii=draw(st.booleans()))
            if k == 0 and bad_jsonl == "not-object":
                text = json.dumps([path])
            if k == 0 and bad_jsonl == "not-json":
                text = text[:-1]
            out.write(text + newline)
        if k in blank_after:
            out.write(newline)
    expected = list_reference(names, rows, fmt, header, bad_jsonl)
    return names_text, f"list.{fmt}", out.getvalue(), expected


def list_reference(names, rows, fmt, header, bad_jsonl):
    """The list format as documented: names stripped, blank ones skipped, no repeats; CSV paths
    and labels stripped, an all-blank row skipped, a first (non-blank) row 'path' a header; JSONL
    paths as given; every label a known name; no empty path, no NUL character."""
    class_names = [n.strip() for n in names if n.strip()]
    if not class_names or len(set(class_names)) != len(class_names):
        return ERROR
    if bad_jsonl is not None:
        return ERROR
    parsed, first = [], not header
    for path, labels in rows:
        if fmt == "csv":
            path = path.strip()
            if not path and not labels:
                continue  # ",": an all-blank row
            if first and path.lower() == "path":
                first = False
                continue  # the first non-blank row is a header
            first = False
        if not path or "\x00" in path:
            return ERROR
        if any(label not in class_names for label in labels):
            return ERROR
        parsed.append((path, {class_names.index(label) for label in labels}))
    return class_names, parsed


def _fuzz_list(workdir, names_text, list_name, list_text, expected, drop):
    (workdir / "names.txt").write_text(names_text, encoding="utf-8", newline="")
    (workdir / list_name).write_text(list_text, encoding="utf-8", newline="")
    if expected != ERROR:
        expected = finish(workdir / "img", expected[0], expected[1], drop)
    check(lambda: read_list(workdir / list_name, workdir / "names.txt", workdir / "img", drop_unlabeled=drop), expected)


@pytest.mark.parametrize("defect", [None, None, None, *LIST_DEFECTS])
def test_list_fuzz(workdir, defect):
    @FAST
    @given(case=list_inputs(defect), drop=st.booleans())
    def run(case, drop):
        _fuzz_list(workdir, *case, drop)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("defect", [None, *LIST_DEFECTS])
def test_list_fuzz_more(workdir, defect):
    @SLOW
    @given(case=list_inputs(defect), drop=st.booleans())
    def run(case, drop):
        _fuzz_list(workdir, *case, drop)

    run()


@settings(FAST, max_examples=150)
@given(edits=EDITS, fmt=st.sampled_from(["csv", "jsonl"]))
def test_list_fuzz_mutated_bytes(workdir, edits, fmt):
    (workdir / "names.txt").write_text("cat\ndog\n")
    text = ('a.jpg,cat\n"c,d.jpg",dog|cat\nsub/e.jpg,\n' if fmt == "csv"
            else '{"path": "a.jpg", "labels": ["cat"]}\n{"path": "b.jpg", "labels": ["dog"]}\n')
    path = workdir / f"mutated.{fmt}"
    path.write_bytes(mutate(text.encode(), edits))
    try:
        images = read_list(path, workdir / "names.txt", workdir / "img")
    except FastMLGANError as e:
        assert "\n" not in str(e)
        return
    # No independent reading of arbitrary bytes here: the result must at least be consistent.
    assert images.class_names == ["cat", "dog"] and images.labels.shape == (len(images.paths), 2)
    assert images.labels.any(axis=1).all() and all(os.path.isfile(p) for p in images.paths)


# ----------------------------------------------------------------------------------------------
# NUS-WIDE (three concepts instead of 81: the same code, fewer files per example)

CONCEPTS = ["sky", "water", "dog"]


NUSWIDE_DEFECTS = ["count", "repeat", "slash", "nul", "value", "lines"]
NUSWIDE_VARIANTS = [None, "blank", "pad"]  # valid: blank lines and spaces around the 0/1 values


@st.composite
def nuswide_layouts(draw, defect: str | None):
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    concepts = list(CONCEPTS)
    if defect == "count":
        concepts = concepts[: draw(st.integers(0, 2))] if draw(st.booleans()) else concepts + ["cloud"]
    elif defect == "repeat":
        concepts[2] = concepts[0]
    elif defect == "slash":
        concepts[1] = draw(st.sampled_from(["a/b", "a\\b", "..", "."]))
    elif defect == "nul":
        concepts[1] = "wa\x00ter"
    prefix = draw(st.sampled_from(["C:\\ImageData\\Flickr\\", "", "Flickr/", "\\"]))
    # U+2028 and form feed are no line ends: an entry holding one is still one entry.
    entries = [prefix + draw(st.sampled_from(["sky", "dog", "x y", "f\x0cg"])) + draw(st.sampled_from(["\\", "/"]))
               + draw(st.sampled_from(["0001_1.jpg", "0002_2.jpg", "é.jpg", "u\u2028v.jpg"]))
               for _ in range(draw(st.integers(0, 5)))]
    labels = draw(st.lists(st.lists(st.sampled_from(["0", "1"]), min_size=len(entries), max_size=len(entries)),
                           min_size=len(concepts), max_size=len(concepts)))
    columns = [list(c) for c in labels]
    if defect == "value" and entries:
        columns[draw(st.integers(0, len(columns) - 1))][draw(st.integers(0, len(entries) - 1))] = draw(
            st.sampled_from(["2", "x", "01", "1.0", "\u00a0"]))
    if defect == "lines" and columns:
        columns[0] = columns[0] + ["0"]
    files = {"Concepts81.txt": "".join(c + newline for c in concepts),
             "ImageList/Imagelist.txt": "".join(e + newline for e in entries)}
    pad = " " if defect == "pad" else ""
    for concept, column in zip(concepts, columns):
        if "/" in concept or "\\" in concept or "\x00" in concept or concept in (".", ".."):
            continue  # cannot be written; the reader must refuse the name itself
        body = "".join(f"{pad}{v}{pad}{newline}" for v in column)
        if defect == "blank":
            body = newline + body + newline
        files[f"Groundtruth/AllLabels/Labels_{concept}.txt"] = body
    return files, nuswide_reference(concepts, entries, columns)


def nuswide_reference(concepts, entries, columns):
    """The official layout as documented: exactly the concept count of names, unique, usable in a
    file name; an image list entry names concept folder/file (its last two path parts); one 0/1
    line per image in every label file (surrounding spaces and blank lines ignored)."""
    if len(concepts) != len(CONCEPTS) or len(set(concepts)) != len(concepts):
        return ERROR
    if any(re.search(r"[/\\\x00]", c) or c in (".", "..") for c in concepts):
        return ERROR
    rel = ["/".join([p for p in re.split(r"[\\/]", e) if p][-2:]) for e in entries]
    matrix = []
    for column in columns:
        values = [v.strip() for v in column if v.strip()]
        if len(values) != len(entries) or any(v not in ("0", "1") for v in values):
            return ERROR
        matrix.append([int(v) for v in values])
    labels = np.array(matrix, dtype=np.uint8).T.reshape(len(entries), len(concepts)).tolist()
    return rel, labels, concepts


def _fuzz_nuswide(layout, monkeypatch):
    files, expected = layout
    monkeypatch.setattr(nuswide, "NUM_CONCEPTS", len(CONCEPTS))
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text, encoding="utf-8", newline="")
        event("invalid input" if expected == ERROR else "valid input")
        try:
            entries, labels, concepts = nuswide.read_listing(root, "all")
        except FastMLGANError as e:
            assert "\n" not in str(e)
            assert expected == ERROR, f"rejected a valid layout: {e}"
            return
        assert expected != ERROR, "accepted an invalid layout"
        assert (entries, labels.tolist(), concepts) == expected
        # The paper split on top: a partition of the labelled images, or a one-line error.
        (root / "Flickr" / "sky").mkdir(parents=True)
        (root / "Flickr" / "sky" / "0001_1.jpg").write_bytes(b"jpeg")
        try:
            train, test = nuswide.read_nuswide(root, "paper", num_train=1, seed=0)
        except FastMLGANError as e:
            assert "\n" not in str(e)
            return
        labelled = sum(1 for row in expected[1] if any(row))
        assert len(train) + len(train.missing) + len(test) + len(test.missing) == labelled


@pytest.mark.parametrize("defect", NUSWIDE_VARIANTS + NUSWIDE_DEFECTS)
def test_nuswide_fuzz(defect):
    @FAST
    @given(layout=nuswide_layouts(defect))
    def run(layout):
        with pytest.MonkeyPatch.context() as monkeypatch:
            _fuzz_nuswide(layout, monkeypatch)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("defect", NUSWIDE_VARIANTS + NUSWIDE_DEFECTS)
def test_nuswide_fuzz_more(defect):
    @SLOW
    @given(layout=nuswide_layouts(defect))
    def run(layout):
        with pytest.MonkeyPatch.context() as monkeypatch:
            _fuzz_nuswide(layout, monkeypatch)

    run()
