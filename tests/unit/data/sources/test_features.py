"""ARFF (MULAN / MEKA), .npz and .csv readers and the train-statistics Standardizer."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import pytest
import torch

from fastmlgan.data.backends.vectors import Standardizer
from fastmlgan.data.sources.arff import read_meka, read_mulan
from fastmlgan.data.sources.features import load_feature_dataset, read_matrix
from fastmlgan.data.sources.tables import FeatureSet
from fastmlgan.errors import ConfigError, DataError

NS = "http://mulan.sourceforge.net/labels"


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def line_of(path, needle: str) -> int:
    """1-based line of ``path`` equal to ``needle``, else the first one containing it."""
    lines = path.read_text().split("\n")
    if needle in lines:
        return lines.index(needle) + 1
    for i, line in enumerate(lines, start=1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {path}")


def write_xml(tmp_path, names, name="labels.xml"):
    body = "\n".join(f'<label name="{n}"></label>' for n in names)
    return write(tmp_path, name, f'<?xml version="1.0" encoding="utf-8"?>\n<labels xmlns="{NS}">\n{body}\n</labels>\n')


DENSE = """
% a comment line
@RELATION toy
@Attribute x1 NUMERIC
@attribute x2 real   % trailing comment
@ATTRIBUTE x3 integer

@attribute A {0,1}
@attribute B numeric
@DATA
% comment inside the data
1.5,-2,3,1,0

0.25, 1e-3 ,7,0,1
-1,0,0,1,1
"""


# ----------------------------------------------------------------------------------------------
# Small fixtures


def test_dense_mulan_labels_last_values_exact(tmp_path):
    fs = read_mulan(write(tmp_path, "toy.arff", DENSE), write_xml(tmp_path, ["A", "B"]))
    assert fs.name == "toy"
    assert (len(fs), fs.feature_dim, fs.num_classes) == (3, 3, 2)
    assert fs.feature_names == ["x1", "x2", "x3"] and fs.class_names == ["A", "B"]
    assert fs.features.dtype == np.float32 and fs.labels.dtype == np.uint8
    np.testing.assert_array_equal(fs.features, np.float32([[1.5, -2, 3], [0.25, 1e-3, 7], [-1, 0, 0]]))
    np.testing.assert_array_equal(fs.labels, [[1, 0], [0, 1], [1, 1]])


def test_mulan_labels_matched_by_name_not_position(tmp_path):
    arff = write(
        tmp_path,
        "mid.arff",
        """
        @relation mid
        @attribute f0 numeric
        @attribute lab_b {0,1}
        @attribute f1 numeric
        @attribute lab_a numeric
        @data
        1,1,2,0
        3,0,4,1
        """,
    )
    fs = read_mulan(arff, write_xml(tmp_path, ["lab_a", "lab_b"]))  # XML order, not file order
    assert fs.feature_names == ["f0", "f1"] and fs.class_names == ["lab_a", "lab_b"]
    np.testing.assert_array_equal(fs.features, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(fs.labels, [[0, 1], [1, 0]])


def test_xml_without_namespace_and_nested_labels(tmp_path):
    arff = write(
        tmp_path, "t.arff", "@relation t\n@attribute f numeric\n@attribute p {0,1}\n@attribute q {0,1}\n@data\n5,0,1\n"
    )
    xml = write(tmp_path, "t.xml", '<labels><label name="p"><label name="q"/></label></labels>')
    fs = read_mulan(arff, xml)
    assert fs.class_names == ["p", "q"]
    np.testing.assert_array_equal(fs.labels, [[0, 1]])


def test_nominal_one_hot_exact(tmp_path):
    arff = write(
        tmp_path,
        "nom.arff",
        """
        @relation nom
        @attribute colour {red,green,blue}
        @attribute size numeric
        @attribute flag {0,1}
        @attribute shape { square , round }
        @attribute L {0,1}
        @data
        green,1,1,round,1
        blue,2,0,square,0
        red,3,1, round ,1
        ?,4,?,square,0
        """,
    )
    fs = read_mulan(arff, write_xml(tmp_path, ["L"]))
    assert fs.feature_names == [
        "colour=red",
        "colour=green",
        "colour=blue",
        "size",
        "flag",
        "shape=square",
        "shape=round",
    ]
    expected = np.array(
        [
            [0, 1, 0, 1, 1, 0, 1],
            [0, 0, 1, 2, 0, 1, 0],
            [1, 0, 0, 3, 1, 0, 1],
            [0, 0, 0, 4, np.nan, 1, 0],  # missing nominal: all-zero block; missing {0,1}: NaN
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(fs.features, expected)
    np.testing.assert_array_equal(fs.labels[:, 0], [1, 0, 1, 0])


def test_quoted_names_and_values(tmp_path):
    arff = write(
        tmp_path,
        "q.arff",
        """
        @relation 'quoted relation: -C 1'
        @attribute "has label" {0,1}
        @attribute 'first feature' numeric
        @attribute "kind, of" {'a b', "c,d", e}
        @data
        1,2.5,'a b'
        0,-1,"c,d"
        1, 3 , e
        """,
    )
    fs = read_meka(arff)
    assert fs.class_names == ["has label"]
    assert fs.feature_names == ["first feature", "kind, of=a b", "kind, of=c,d", "kind, of=e"]
    np.testing.assert_array_equal(fs.features, [[2.5, 1, 0, 0], [-1, 0, 1, 0], [3, 0, 0, 1]])
    np.testing.assert_array_equal(fs.labels[:, 0], [1, 0, 1])


def test_sparse_rows_absent_is_zero_or_first_nominal_value(tmp_path):
    arff = write(
        tmp_path,
        "sp.arff",
        """
        @relation sp
        @attribute w0 numeric
        @attribute w1 numeric
        @attribute kind {b,a}
        @attribute w3 numeric
        @attribute y0 {0,1}
        @attribute y1 {0,1}
        @data
        {0 1.5,3 2,5 1}
        {}
        { 1 -4 , 2 a , 4 1 }
        """,
    )
    fs = read_mulan(arff, write_xml(tmp_path, ["y0", "y1"]))
    assert fs.feature_names == ["w0", "w1", "kind=b", "kind=a", "w3"]
    # an absent nominal takes its FIRST declared value ("b"), not the value spelled "0"
    np.testing.assert_array_equal(fs.features, [[1.5, 0, 1, 0, 2], [0, 0, 1, 0, 0], [0, -4, 0, 1, 0]])
    np.testing.assert_array_equal(fs.labels, [[0, 1], [0, 0], [1, 0]])


def test_sparse_and_dense_rows_agree(tmp_path):
    dense = write(
        tmp_path,
        "d.arff",
        "@relation r -C 1\n@attribute y {0,1}\n@attribute a numeric\n@attribute b numeric\n@data\n1,0,3\n0,2,0\n",
    )
    sparse = write(
        tmp_path,
        "s.arff",
        "@relation r -C 1\n@attribute y {0,1}\n@attribute a numeric\n@attribute b numeric\n@data\n{0 1,2 3}\n{1 2}\n",
    )
    d, s = read_meka(dense), read_meka(sparse)
    np.testing.assert_array_equal(d.features, s.features)
    np.testing.assert_array_equal(d.labels, s.labels)


def test_missing_numeric_is_nan_and_imputed_with_training_mean(tmp_path):
    xml = write_xml(tmp_path, ["y"])
    train = write(tmp_path, "tr.arff", "@relation r\n@attribute a numeric\n@attribute y {0,1}\n@data\n1,0\n?,1\n3,0\n")
    test = write(tmp_path, "te.arff", "@relation r\n@attribute a numeric\n@attribute y {0,1}\n@data\n100,0\n?,1\n")
    tr, te = load_feature_dataset(train, test, xml=xml)
    assert np.isnan(tr.features[1, 0]) and np.isnan(te.features[1, 0])
    st = Standardizer().fit(tr.features)
    # train mean over the present values (1, 3) is 2, std 1; the test's own mean (100) must not leak
    np.testing.assert_allclose(st.mean, [2.0])
    np.testing.assert_allclose(st.std, [1.0])
    np.testing.assert_allclose(st.transform(te.features), [[98.0], [0.0]])
    np.testing.assert_allclose(st.transform(tr.features), [[-1.0], [0.0], [1.0]])


@pytest.mark.parametrize(
    "relation, expected_labels",
    [("'Toy: -C 2'", ["p", "q"]), ('"Toy: -C -2 -split 1"', ["r", "s"]), ("Toy:-C 2", None)],
)
def test_meka_labels_first_or_last(tmp_path, relation, expected_labels):
    text = f"@relation {relation}\n@attribute p {{0,1}}\n@attribute q {{0,1}}\n@attribute r numeric\n@attribute s numeric\n@data\n1,0,0,1\n0,1,1,0\n"
    path = write(tmp_path, "m.arff", text)
    if expected_labels is None:  # "-C" must be an option, not glued to another word
        with pytest.raises(DataError, match=r"m\.arff:1: .*-C"):
            read_meka(path)
        return
    fs = read_meka(path)
    assert fs.class_names == expected_labels
    assert fs.feature_names == [n for n in "pqrs" if n not in expected_labels]
    np.testing.assert_array_equal(fs.labels, [[1, 0], [0, 1]] if expected_labels == ["p", "q"] else [[0, 1], [1, 0]])
    np.testing.assert_array_equal(fs.features, [[0, 1], [1, 0]] if expected_labels == ["p", "q"] else [[1, 0], [0, 1]])


def test_numeric_label_must_be_binary(tmp_path):
    path = write(
        tmp_path, "nl.arff", "@relation 'x -C 1'\n@attribute y numeric\n@attribute a numeric\n@data\n1,0\n0.5,1\n"
    )
    with pytest.raises(DataError, match=r"nl\.arff:6: label 'y' must be 0 or 1, got 0\.5"):
        read_meka(path)


def test_featureset_subset_and_validation():
    fs = FeatureSet("t", np.arange(6).reshape(3, 2), np.eye(3)[:, :2], ["a", "b"], ["c0", "c1"])
    sub = fs.subset([2, 0], name="s")
    assert sub.name == "s" and len(sub) == 2
    np.testing.assert_array_equal(sub.features, [[4, 5], [0, 1]])
    np.testing.assert_array_equal(sub.labels, [[0, 0], [1, 0]])
    with pytest.raises(ValueError, match="labels must have shape"):
        FeatureSet("t", np.zeros((3, 2)), np.zeros((2, 2)), ["a", "b"], ["c0", "c1"])


# ----------------------------------------------------------------------------------------------
# Errors name the file and the line


HEADER = "@relation r\n@attribute a numeric\n@attribute b numeric\n@attribute kind {u,v}\n@attribute y {0,1}\n@data\n"


@pytest.mark.parametrize(
    "data, needle, message",
    [
        ("1,2,u,0\n1,2,u\n", "1,2,u", "expected 4 values, got 3"),
        ("1,2,u,0\n1,x2,u,1\n", "x2", r"'b': 'x2' is not a number"),
        ("1,2,u,0\n1,2,w,1\n", ",w,", r"attribute 'kind': unknown nominal value 'w'"),
        ("{0 1}\n{1 2,3 1,7 1}\n", "7 1", r"sparse index 7 out of range: 4 attributes"),
        ("{0 1}\n{x 2}\n", "{x 2}", r"sparse index 'x' is not an integer"),
        ("{0 1,3 1\n", "{0 1,3 1", r"no closing"),
        ("1,2,u,?\n", "1,2,u,?", r"label 'y' is missing"),
        ("1,2,u,2\n", "1,2,u,2", r"label 'y' must be 0 or 1|unknown nominal value '2'"),
        ("1,2,'u,0\n", "'u,0", r"unterminated ' quote"),
    ],
)
def test_data_errors_name_file_and_line(tmp_path, data, needle, message):
    path = write(tmp_path, "bad.arff", HEADER + data)
    xml = write_xml(tmp_path, ["y"])
    with pytest.raises(DataError, match=message) as err:
        read_mulan(path, xml)
    assert f"bad.arff:{line_of(path, needle)}:" in str(err.value)


@pytest.mark.parametrize(
    "header, line, message",
    [
        ("@relation r\n@attribute a numeric\n@attribute y {0,1}\n1,0\n", 4, "expected @relation, @attribute or @data"),
        ("@relation r\n@attribute a numeric\n@attribute y {0,1}\n", 3, "no @data section"),
        ("@relation r\n@attribute a string\n@attribute y {0,1}\n@data\n", 2, "'a' is of type string"),
        ("@relation r\n@attribute y {0,1}\n@attribute when date 'yyyy'\n@data\n", 3, "'when' is of type date"),
        (
            "@relation r\n@attribute a numeric\n@attribute a numeric\n@attribute y {0,1}\n@data\n",
            3,
            "already declared on line 2",
        ),
        ("@relation r\n@attribute a numeric\n@attribute y {0,1,2}\n@data\n", 3, "label attribute 'y' {0,1,2} must be"),
        ("@relation r\n@attribute a numeric\n@attribute y {0,1\n@data\n", 3, "no closing"),
        ("@relation r\n@attribute a numeric\n@attribute y {0,1}\n@frobnicate\n@data\n", 4, "unknown directive"),
        ("@relation r\n@attribute a numeric\n@attribute y {0,1}\n\n@data\n% nothing\n", 5, "no data rows after @data"),
    ],
)
def test_header_errors_name_file_and_line(tmp_path, header, line, message):
    path = write(tmp_path, "hdr.arff", header)
    with pytest.raises(DataError, match=message) as err:
        read_mulan(path, write_xml(tmp_path, ["y"]))
    assert f"hdr.arff:{line}:" in str(err.value)


def test_xml_errors_name_file_and_line(tmp_path):
    arff = write(tmp_path, "d.arff", DENSE)
    xml = write(tmp_path, "wrong.xml", f'<labels xmlns="{NS}">\n<label name="A"/>\n  <label name="Nope"/>\n</labels>\n')
    with pytest.raises(DataError, match=r"wrong\.xml:3: label 'Nope' is not an attribute of .*d\.arff"):
        read_mulan(arff, xml)
    broken = write(tmp_path, "broken.xml", '<labels>\n<label name="A">\n<label name="B"/>\n</labelz>\n')
    with pytest.raises(DataError, match=r"broken\.xml:4: not valid XML"):
        read_mulan(arff, broken)
    empty = write(tmp_path, "empty.xml", "<labels>\n</labels>\n")
    with pytest.raises(DataError, match=r"empty\.xml:1: no <label"):
        read_mulan(arff, empty)
    # a missing file has no line to name; the message names the file
    with pytest.raises(DataError, match=r"absent\.xml: no such file"):
        read_mulan(arff, tmp_path / "absent.xml")
    with pytest.raises(DataError, match=r"absent\.arff: no such file"):
        read_mulan(tmp_path / "absent.arff", write_xml(tmp_path, ["A"]))


def test_meka_without_c_names_relation_line(tmp_path):
    path = write(
        tmp_path,
        "noc.arff",
        "% header comment\n\n@relation plain\n@attribute a numeric\n@attribute y {0,1}\n@data\n1,0\n",
    )
    with pytest.raises(DataError, match=r"noc\.arff:3: @relation 'plain' has no '-C"):
        read_meka(path)
    with pytest.raises(DataError, match=r"noc\.arff:3: cannot tell which attributes are labels"):
        load_feature_dataset(path, path)
    too_many = write(tmp_path, "big.arff", "@relation 'r -C 2'\n@attribute a numeric\n@attribute y {0,1}\n@data\n1,0\n")
    with pytest.raises(DataError, match=r"big\.arff:1: -C 2 must name between 1 and 1"):
        read_meka(too_many)


# ----------------------------------------------------------------------------------------------
# Train/test pairs and matrix files


def test_load_pair_checks_headers(tmp_path):
    xml = write_xml(tmp_path, ["A", "B"])
    train = write(tmp_path, "train.arff", DENSE)
    other = write(tmp_path, "test.arff", DENSE.replace("@attribute x2 real", "@attribute x2b real"))
    tr, te = load_feature_dataset(train, train, xml=xml)
    assert tr.feature_names == te.feature_names and len(tr) == len(te) == 3
    with pytest.raises(
        DataError, match=r"test\.arff:4: attribute 2 is 'x2b' numeric but .*train\.arff:4 declares 'x2' numeric"
    ):
        load_feature_dataset(train, other, xml=xml)
    nominal = write(tmp_path, "n1.arff", "@relation 'r -C 1'\n@attribute y {0,1}\n@attribute k {a,b}\n@data\n1,a\n")
    nominal2 = write(tmp_path, "n2.arff", "@relation 'r -C 1'\n@attribute y {0,1}\n@attribute k {a,b,c}\n@data\n1,a\n")
    with pytest.raises(DataError, match=r"n2\.arff:3: attribute 2 is 'k' \{a,b,c\}"):
        load_feature_dataset(nominal, nominal2)
    c2 = write(tmp_path, "c2.arff", "@relation 'r -C -1'\n@attribute y {0,1}\n@attribute k {a,b}\n@data\n1,a\n")
    with pytest.raises(DataError, match=r"c2\.arff:1: -C names"):
        load_feature_dataset(nominal, c2)
    # a "-C" beside a MULAN label file is ambiguous: auto refuses, an explicit format decides
    write_xml(tmp_path, ["y"], name="n1.xml")
    with pytest.raises(DataError, match=r"n1\.arff:1: .*n1\.xml sits beside it"):
        load_feature_dataset(nominal, nominal)
    assert load_feature_dataset(nominal, nominal, format="meka")[0].class_names == ["y"]
    (tmp_path / "n1.xml").unlink()
    with pytest.raises(ConfigError, match="format="):
        load_feature_dataset(train, train, xml=xml, format="weka")
    tr, te = load_feature_dataset(nominal, nominal)  # auto → MEKA
    assert tr.class_names == ["y"] and tr.feature_names == ["k=a", "k=b"]


def test_read_matrix_npz_and_csv(tmp_path):
    x = np.array([[1.0, 2.0], [3.0, np.nan]], dtype=np.float32)
    y = np.array([[1, 0, 1], [0, 0, 1]], dtype=np.uint8)
    np.savez(tmp_path / "a.npz", X=x, Y=y)
    np.savez(tmp_path / "b.npz", features=x, labels=y, class_names=np.array(["p", "q", "r"]))
    a, b = read_matrix(tmp_path / "a.npz"), read_matrix(tmp_path / "b.npz")
    np.testing.assert_array_equal(a.features, x)
    np.testing.assert_array_equal(b.labels, y)
    assert b.class_names == ["p", "q", "r"] and a.feature_names == ["f0", "f1"]
    np.savez(tmp_path / "bad.npz", X=x, Y=y * 2)
    with pytest.raises(DataError, match=r"bad\.npz: Y\[0, 0\] = 2"):
        read_matrix(tmp_path / "bad.npz")
    np.savez(tmp_path / "nokey.npz", data=x)
    with pytest.raises(DataError, match=r"nokey\.npz: needs an array named 'X' or 'features'"):
        read_matrix(tmp_path / "nokey.npz")

    csv_path = write(tmp_path, "t.csv", 'f0,"f 1",lab,other\n1,2,1,0\n3,,0,1\n"5",?,1,1\n')
    by_name = read_matrix(csv_path, label_columns=["lab"])
    assert by_name.feature_names == ["f0", "f 1", "other"] and by_name.class_names == ["lab"]
    np.testing.assert_array_equal(by_name.features, [[1, 2, 0], [3, np.nan, 1], [5, np.nan, 1]])
    last_two = read_matrix(csv_path, num_labels=2)
    assert last_two.class_names == ["lab", "other"]
    np.testing.assert_array_equal(last_two.labels, [[1, 0], [0, 1], [1, 1]])
    with pytest.raises(DataError, match=r"t\.csv:1: label column 'nope' is not in the header"):
        read_matrix(csv_path, label_columns=["nope"])
    with pytest.raises(ConfigError, match="num_labels or label_columns"):
        read_matrix(csv_path)
    bad = write(tmp_path, "bad.csv", "a,b,y\n1,2,0\n1,2\n1,zz,1\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: expected 3 values, got 2"):
        read_matrix(bad, num_labels=1)
    bad2 = write(tmp_path, "bad2.csv", "a,b,y\n1,2,0\n1,zz,1\n")
    with pytest.raises(DataError, match=r"bad2\.csv:3: 'b': 'zz' is not a number"):
        read_matrix(bad2, num_labels=1)
    tr, te = load_feature_dataset(csv_path, csv_path, label_columns=["lab"])  # auto → matrix
    assert tr.class_names == ["lab"]
    other = write(tmp_path, "o.csv", "f0,g,lab,other\n1,2,1,0\n")
    with pytest.raises(DataError, match=r"o\.csv:1: feature column 2 is 'g' but .*t\.csv has 'f 1'"):
        load_feature_dataset(csv_path, other, label_columns=["lab"])


# ----------------------------------------------------------------------------------------------
# Standardizer


def test_standardizer_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    train = rng.normal(loc=[0.0, 10.0, 5.0], scale=[1.0, 3.0, 0.0], size=(200, 3)).astype(np.float32)
    test = rng.normal(loc=[50.0, -10.0, 7.0], scale=[9.0, 0.5, 2.0], size=(100, 3)).astype(np.float32)
    st = Standardizer().fit(train)
    np.testing.assert_allclose(st.mean, train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(st.std[:2], train.std(0)[:2], rtol=1e-5)
    assert st.std[2] == 1.0  # a constant column is centred, not divided by 0
    z_train = st.transform(train)
    np.testing.assert_allclose(z_train[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z_train[:, :2].std(0), 1, rtol=1e-4)
    z_test = st.transform(test)
    np.testing.assert_allclose(
        z_test, (test - train.mean(0)) / np.array([*train.std(0)[:2], 1.0]), rtol=1e-4, atol=1e-4
    )
    assert z_test[:, 0].mean() > 10  # centring with the test's own mean would give ~0 here


def test_standardizer_nan_aware_state_dict_and_tensors():
    train = np.array([[1.0, np.nan], [3.0, 4.0], [np.nan, 8.0]], dtype=np.float32)
    st = Standardizer().fit(train)
    np.testing.assert_allclose(st.mean, [2.0, 6.0])
    np.testing.assert_allclose(st.std, [1.0, 2.0])
    z = st.transform(train)
    np.testing.assert_allclose(z, [[-1, 0], [1, -1], [0, 1]])
    state = st.state_dict()
    assert state == {"mean": [2.0, 6.0], "std": [1.0, 2.0]} and isinstance(state["mean"], list)
    again = Standardizer.from_state_dict({k: torch.tensor(v) for k, v in state.items()})
    zt = again.transform(torch.from_numpy(train))
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    np.testing.assert_allclose(zt.numpy(), z)
    with pytest.raises(ValueError, match="expected 2 feature columns"):
        again.transform(np.zeros((1, 3), dtype=np.float32))
    all_missing = Standardizer().fit(np.array([[np.nan], [np.nan]]))
    assert all_missing.state_dict() == {"mean": [0.0], "std": [1.0]}


# ----------------------------------------------------------------------------------------------
# Real files (../shared/data)


def _mulan_pair(root, name):
    d = root / "mulan" / name
    return load_feature_dataset(d / f"{name}-train.arff", d / f"{name}-test.arff", xml=d / f"{name}.xml")


def _cardinality(*sets):
    return float(np.concatenate([s.labels for s in sets]).sum(1).mean())


@pytest.mark.realdata
def test_real_scene(shared_data):
    tr, te = _mulan_pair(shared_data, "scene")
    assert (len(tr), len(te), tr.feature_dim, tr.num_classes) == (1211, 1196, 294, 6)
    assert tr.class_names == ["Beach", "Sunset", "FallFoliage", "Field", "Mountain", "Urban"]
    assert abs(_cardinality(tr, te) - 1.074) < 1e-3  # MULAN's table, over the 2407 rows
    assert len({tuple(r) for r in np.concatenate([tr.labels, te.labels])}) == 15
    # first data row against the raw text
    lines = (shared_data / "mulan/scene/scene-train.arff").read_text().split("\n")
    first = lines[next(i for i, s in enumerate(lines) if s.strip().lower() == "@data") + 1].split(",")
    np.testing.assert_array_equal(tr.features[0], np.float32(first[:294]))
    np.testing.assert_array_equal(tr.labels[0], np.uint8(first[294:]))


@pytest.mark.realdata
def test_real_emotions(shared_data):
    tr, te = _mulan_pair(shared_data, "emotions")
    assert (len(tr), len(te), tr.feature_dim, tr.num_classes) == (391, 202, 72, 6)
    assert abs(_cardinality(tr, te) - 1.869) < 1e-3
    assert len({tuple(r) for r in np.concatenate([tr.labels, te.labels])}) == 27


@pytest.mark.realdata
def test_real_flags_nominal_one_hot(shared_data):
    tr, te = _mulan_pair(shared_data, "flags")
    assert (len(tr), len(te), tr.num_classes) == (129, 65, 7)
    # 19 attributes: landmass(6) zone(4) language(10) religion(8) one-hot = 28 columns,
    # 5 nominal {0,1} indicators stay 1 column each, 10 numeric
    assert tr.feature_dim == 28 + 5 + 10
    assert [n for n in tr.feature_names if n.startswith("zone=")] == ["zone=1", "zone=2", "zone=3", "zone=4"]
    for attr in ("landmass", "zone", "language", "religion"):
        block = tr.features[:, [j for j, n in enumerate(tr.feature_names) if n.startswith(attr + "=")]]
        np.testing.assert_array_equal(block.sum(1), 1)  # exactly one hot value per row (no missing)
    first = (shared_data / "mulan/flags/flags-train.arff").read_text().split("@data")[1].split()[0].split(",")
    assert tr.features[0, tr.feature_names.index(f"landmass={first[0]}")] == 1
    assert tr.features[0, tr.feature_names.index("area")] == float(first[2])
    assert abs(_cardinality(tr, te) - 3.39) < 5e-3  # flags/README.txt


@pytest.mark.realdata
def test_real_medical_sparse_against_manual_parse(shared_data):
    tr, te = _mulan_pair(shared_data, "medical")
    assert (len(tr), len(te), tr.feature_dim, tr.num_classes) == (333, 645, 1449, 45)
    # its @relation still says "-C 45" although the labels are the LAST 45: auto must not guess MEKA
    d = shared_data / "mulan" / "medical"
    with pytest.raises(DataError, match="medical.xml sits beside it"):
        load_feature_dataset(d / "medical-train.arff", d / "medical-test.arff")
    text = (shared_data / "mulan/medical/medical-train.arff").read_text().split("\n")
    names = [s.split()[1] for s in text if s.lower().startswith("@attribute")]
    start = next(i for i, s in enumerate(text) if s.strip().lower() == "@data") + 1
    rows = [s for s in text[start:] if s.strip()]
    for r in range(5):
        entries = dict(e.split() for e in rows[r].strip()[1:-1].split(","))
        expected_features = np.zeros(tr.feature_dim, np.float32)
        expected_labels = np.zeros(tr.num_classes, np.uint8)
        for j, v in entries.items():
            name = names[int(j)]
            if name in tr.class_names:
                expected_labels[tr.class_names.index(name)] = int(v)
            else:
                expected_features[tr.feature_names.index(name)] = float(v)
        np.testing.assert_array_equal(tr.features[r], expected_features)
        np.testing.assert_array_equal(tr.labels[r], expected_labels)
    assert abs(_cardinality(tr, te) - 1.245) < 1e-3  # MULAN's table for medical


@pytest.mark.realdata
def test_real_meka_music_is_emotions(shared_data):
    music = read_meka(shared_data / "meka/Music.arff")
    emotions = read_mulan(shared_data / "mulan/emotions/emotions.arff", shared_data / "mulan/emotions/emotions.xml")
    parts = [read_meka(shared_data / f"meka/Music-{s}.arff") for s in ("train", "test")]  # '-C -6': labels last
    assert (len(music), music.feature_dim, music.num_classes) == (592, 71, 6)
    assert [len(p) for p in parts] == [491, 101]
    np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), music.labels)
    np.testing.assert_array_equal(np.concatenate([p.features for p in parts]), music.features)
    # Measured: MEKA's Music = MULAN emotions without row 216 (1-based) and without the feature
    # BH_HighLowRatio, min-max scaled to [0, 1] and rounded to 6 decimals; same row order.
    assert set(emotions.feature_names) - set(music.feature_names) == {"BH_HighLowRatio"}
    keep = np.delete(np.arange(len(emotions)), 215)
    np.testing.assert_array_equal(music.labels, emotions.labels[keep])
    x = emotions.features[keep][:, [emotions.feature_names.index(n) for n in music.feature_names]].astype(np.float64)
    scaled = (x - x.min(0)) / (x.max(0) - x.min(0))
    np.testing.assert_allclose(music.features, scaled, atol=2e-6)
    # the label names differ by MEKA's typo, positions agree
    assert [re.sub("clam", "calm", n) for n in music.class_names] == emotions.class_names
