"""The ARFF reader on bad input (issue 11): duplicate sparse indices and non-finite or odd numbers
are one-line DataErrors naming the file, line and attribute; and the real MULAN/MEKA files against
liac-arff (dev only). The fuzz test is in test_arff_fuzz.py."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from extras import import_extra

from fastmlgan.data.sources.arff import read_meka, read_mulan
from fastmlgan.data.sources.features import load_feature_dataset, read_matrix
from fastmlgan.errors import DataError

NS = "http://mulan.sourceforge.net/labels"


def _xml(names) -> str:
    body = "\n".join(f'<label name="{n}"></label>' for n in names)
    return f'<?xml version="1.0" encoding="utf-8"?>\n<labels xmlns="{NS}">\n{body}\n</labels>\n'


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


HEADER = "@relation r\n@attribute a numeric\n@attribute b numeric\n@attribute kind {u,v}\n@attribute y {0,1}\n@data\n"


# ----------------------------------------------------------------------------------------------
# Issue 11: bad values are one-line errors naming file, line and attribute


def test_duplicate_sparse_index_names_file_and_line(tmp_path):
    # Before: the second value silently won ('{1 2,1 5}' read as b = 5) and the run went on.
    path = _write(tmp_path, "dup.arff", HEADER + "{0 1,3 1}\n{0 1,1 2,1 5,3 0}\n")
    xml = _write(tmp_path, "dup.xml", _xml(["y"]))
    with pytest.raises(DataError) as err:
        read_mulan(path, xml)
    message = str(err.value)
    assert message.startswith(f"{path}:8: ") and "sparse index 1 appears twice" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "value, what",
    [
        ("inf", "not a finite number"),
        ("-Infinity", "not a finite number"),
        ("nan", "not a finite number"),
        ("NaN", "not a finite number"),
        ("1e39", "beyond float32's range"),  # finite in float64, inf once the features are float32
        ("1_0", "not a decimal"),  # float() reads it as 10
        ("\u0661", "not a decimal"),  # ARABIC-INDIC DIGIT ONE: float() reads it as 1
    ],
)
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_non_finite_or_odd_feature_names_file_line_and_column(tmp_path, value, what, layout):
    row = f"1,{value},u,0" if layout == "dense" else f"{{1 {value}}}"
    path = _write(tmp_path, "inf.arff", HEADER + "1,2,u,0\n" + row + "\n")
    xml = _write(tmp_path, "inf.xml", _xml(["y"]))
    with pytest.raises(DataError) as err:
        read_mulan(path, xml)
    message = str(err.value)
    # file:line (the row), the column's attribute name, the value, what is wrong
    assert message.startswith(f"{path}:8: 'b': {value!r} is ") and what in message and "data row 2" in message
    # ... and before any training: load_feature_dataset is what the data config calls
    with pytest.raises(DataError, match=re.escape(f"{path}:8: 'b'")):
        load_feature_dataset(path, path, xml=xml)


def test_missing_value_is_still_nan_and_plain_decimals_still_read(tmp_path):
    path = _write(tmp_path, "ok.arff", HEADER + "?,-2.5e-3,u,1\n{0 +.5,1 3.}\n 7 , 1E2 ,v,0\n")
    fs = read_mulan(path, _write(tmp_path, "ok.xml", _xml(["y"])))
    np.testing.assert_array_equal(fs.features, np.float32([[np.nan, -2.5e-3, 1, 0], [0.5, 3.0, 1, 0], [7, 100, 0, 1]]))


def test_a_brace_inside_a_comment_closes_nothing(tmp_path):
    # '%' comments run to the end of the line (found by test_arff_fuzz.py): before, '{0 1 % c}'
    # read as the row {0 1}, and a '}' in a header comment became part of the nominal values.
    xml = _write(tmp_path, "c.xml", _xml(["y"]))
    path = _write(tmp_path, "c.arff", HEADER + "{0 1,3 1}\n{0 1 % a comment}\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:8: sparse row has no closing '}}'")):
        read_mulan(path, xml)
    header = HEADER.replace("{u,v}", "{u,v} % values {u, v}")
    fs = read_mulan(_write(tmp_path, "h.arff", header + "{0 1,2 v} % {3 1}\n"), xml)
    assert fs.feature_names == ["a", "b", "kind=u", "kind=v"]
    np.testing.assert_array_equal(fs.features, [[1, 0, 0, 1]])
    np.testing.assert_array_equal(fs.labels, [[0]])


def test_non_finite_label_and_csv_cells(tmp_path):
    labels = "@relation r\n@attribute a numeric\n@attribute y numeric\n@data\n1,0\n2,inf\n"
    path = _write(tmp_path, "lab.arff", labels)
    with pytest.raises(DataError, match=re.escape(f"{path}:6: 'y': 'inf' is not a finite number")):
        read_mulan(path, _write(tmp_path, "lab.xml", _xml(["y"])))
    csv = _write(tmp_path, "t.csv", "a,b,y\n1,2,0\n1,-inf,1\n")
    with pytest.raises(DataError, match=re.escape(f"{csv}:3: 'b': '-inf' is not a finite number")):
        read_matrix(csv, num_labels=1)
    blank = _write(tmp_path, "blank.csv", "a,b,y\n1,,0\n")  # an empty cell is a missing value
    assert np.isnan(read_matrix(blank, num_labels=1).features[0, 1])


# ----------------------------------------------------------------------------------------------
# The real files against liac-arff (dev only: pip install liac-arff)


def _liac_table(arff_module, path: Path, label_names: list[str]):
    """(features, labels, feature names) from liac-arff's parse, with the reader's encoding rules."""
    with open(path, encoding="utf-8") as f:
        data = arff_module.load(f)
    attrs, rows = data["attributes"], data["data"]
    names = [name for name, _ in attrs]
    label_idx = [names.index(n) for n in label_names]
    labels = np.array([[float(row[j]) for j in label_idx] for row in rows]).astype(np.uint8)
    columns, feature_names = [], []
    for j, (name, kind) in enumerate(attrs):
        if j in label_idx:
            continue
        cells = [row[j] for row in rows]
        if isinstance(kind, str) or sorted(kind) == ["0", "1"]:  # numeric, or a 0/1 indicator
            columns.append([math.nan if c is None else float(c) for c in cells])
            feature_names.append(name)
        else:
            for v in kind:
                columns.append([1.0 if c == v else 0.0 for c in cells])
                feature_names.append(f"{name}={v}")
    return np.float32(columns).T, labels, feature_names


def _mulan_labels(xml: Path) -> list[str]:
    return [e.get("name") for e in ET.parse(xml).iter() if e.tag.rsplit("}", 1)[-1] == "label"]


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["scene", "emotions", "flags", "medical"])
def test_real_mulan_files_match_liac_arff(shared_data, name):
    liac = import_extra("dev", "arff")  # liac-arff
    folder = shared_data / "mulan" / name
    xml = folder / f"{name}.xml"
    label_names = _mulan_labels(xml)
    for split in ("train", "test"):
        path = folder / f"{name}-{split}.arff"
        fs = read_mulan(path, xml)
        features, labels, feature_names = _liac_table(liac, path, label_names)
        assert fs.class_names == label_names and fs.feature_names == feature_names
        assert fs.features.shape == features.shape and len(fs) > 0
        np.testing.assert_array_equal(fs.features, features)
        np.testing.assert_array_equal(fs.labels, labels)


@pytest.mark.realdata
def test_real_meka_music_matches_liac_arff(shared_data):
    liac = import_extra("dev", "arff")  # liac-arff
    for split in ("train", "test"):
        path = shared_data / "meka" / f"Music-{split}.arff"
        with open(path, encoding="utf-8") as f:
            data = liac.load(f)
        c = int(re.search(r"-C\s+(-?\d+)", data["relation"]).group(1))
        names = [n for n, _ in data["attributes"]]
        label_names = names[:c] if c > 0 else names[c:]
        fs = read_meka(path)
        features, labels, feature_names = _liac_table(liac, path, label_names)
        assert fs.class_names == label_names and fs.feature_names == feature_names
        np.testing.assert_array_equal(fs.features, features)
        np.testing.assert_array_equal(fs.labels, labels)
