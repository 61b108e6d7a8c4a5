"""A property-based fuzz test of the ARFF reader (issue 11): on random valid tables, and on the same
text after one to three random edits, ``read_mulan`` either returns exactly the table that an
independent parse (``reference_parse``, written from the ARFF specification) gives, or raises a
one-line ``FastMLGANError`` where that parse rejects the text. Never another exception.

Deterministic (``derandomize``) so that CI sees the same examples; FASTMLGAN_FUZZ_EXAMPLES=5000
runs a longer search.
"""

from __future__ import annotations

import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
from extras import import_extra

hypothesis = import_extra("dev", "hypothesis")
st = hypothesis.strategies

from fastmlgan.data.sources.arff import read_mulan  # noqa: E402
from fastmlgan.errors import FastMLGANError  # noqa: E402

NS = "http://mulan.sourceforge.net/labels"


def _xml(names) -> str:
    body = "\n".join(f'<label name="{n}"></label>' for n in names)
    return f'<?xml version="1.0" encoding="utf-8"?>\n<labels xmlns="{NS}">\n{body}\n</labels>\n'


FUZZ_EXAMPLES = int(os.environ.get("FASTMLGAN_FUZZ_EXAMPLES", "200"))
F32_MAX = float(np.finfo(np.float32).max)
DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class Reject(Exception):
    """Not a valid ARFF table: the reader must raise a FastMLGANError."""


class Unsupported(Exception):
    """Syntax this reference does not model (quoted names and values)."""


def reference_parse(text: str, label_names: list[str]):
    """(features, labels, feature names) of an ARFF text with MULAN labels ``label_names``, by the
    ARFF specification and the encoding rules of fastmlgan.data.sources.arff, written independently."""
    lines = text.split("\n")
    attrs: list[tuple[str, list[str] | None]] = []  # (name, nominal values or None for numeric)
    k = 0
    while True:
        if k == len(lines):
            raise Reject("no @data")
        if "'" in lines[k] or '"' in lines[k]:
            raise Unsupported("quotes in the header")
        s = lines[k].split("%", 1)[0].strip()  # '%' starts a comment to the end of the line
        k += 1
        if not s:
            continue
        m = re.match(r"@([A-Za-z]+)", s)
        if not m:
            raise Reject("text before @data")
        keyword, rest = m.group(1).lower(), s[m.end() :].strip()
        if keyword == "relation":
            continue
        if keyword == "data":
            if not attrs:
                raise Reject("@data before any @attribute")
            break
        if keyword != "attribute":
            raise Reject("unknown directive")
        m = re.match(r"([^\s{]+)\s*(.*)", rest)
        if not m:
            raise Reject("no attribute name")
        name, kind = m.group(1), m.group(2)
        if any(name == a for a, _ in attrs):
            raise Reject("attribute declared twice")
        if kind.startswith("{"):
            if "}" not in kind:
                raise Reject("no closing brace")
            values = [v.strip() for v in kind[1 : kind.rindex("}")].split(",")]
            if "" in values or len(set(values)) != len(values):
                raise Reject("empty or repeated nominal value")
            attrs.append((name, values))
        elif kind.split() and kind.split()[0].lower() in ("numeric", "real", "integer"):
            attrs.append((name, None))
        else:
            raise Reject("unknown attribute type")

    rows = []
    for line in lines[k:]:
        if "'" in line or '"' in line:
            raise Unsupported("quotes in the data")
        s = line.split("%", 1)[0].strip()  # '%' starts a comment to the end of the line
        if not s:
            continue
        if s.startswith("{"):
            if not s.endswith("}"):
                raise Reject("sparse row without a closing brace")
            row = [values[0] if values else "0" for _, values in attrs]
            body, seen = s[1:-1], set()
            if body.strip():
                for entry in body.split(","):
                    parts = entry.split(None, 1)
                    if len(parts) != 2 or not re.fullmatch(r"[+-]?[0-9]+", parts[0]):
                        raise Reject("bad sparse entry")
                    j = int(parts[0])
                    if not 0 <= j < len(attrs) or j in seen:
                        raise Reject("sparse index out of range or repeated")
                    seen.add(j)
                    row[j] = parts[1].strip()
        else:
            row = [v.strip() for v in s.split(",")]
            if len(row) != len(attrs):
                raise Reject("wrong number of values")
        rows.append(row)
    if not rows:
        raise Reject("no data rows")

    names = [a for a, _ in attrs]
    if any(n not in names for n in label_names):
        raise Reject("a label is not an attribute")
    label_idx = [names.index(n) for n in label_names]
    if len(label_idx) == len(attrs):
        raise Reject("no features")

    def number(cell: str) -> float:
        if not DECIMAL.fullmatch(cell) or abs(float(cell)) > F32_MAX:
            raise Reject(f"bad number {cell!r}")
        return float(cell)

    labels = np.zeros((len(rows), len(label_idx)), np.uint8)
    for c, j in enumerate(label_idx):
        values = attrs[j][1]
        if values is not None and sorted(values) != ["0", "1"]:
            raise Reject("nominal label not {0,1}")
        for i, row in enumerate(rows):
            if values is not None and row[j] not in values:
                raise Reject("unknown or missing label value")
            v = number(row[j])
            if v not in (0.0, 1.0):
                raise Reject("label not 0/1")
            labels[i, c] = v
    columns, feature_names = [], []
    for j, (name, values) in enumerate(attrs):
        if j in label_idx:
            continue
        cells = [row[j] for row in rows]
        if any(c != "?" and values is not None and c not in values for c in cells):
            raise Reject("unknown nominal value")
        if values is None or sorted(values) == ["0", "1"]:
            columns.append([math.nan if c == "?" else number(c) for c in cells])
            feature_names.append(name)
        else:
            for v in values:
                columns.append([1.0 if c == v else 0.0 for c in cells])
                feature_names.append(f"{name}={v}")
    return np.float32(columns).T.reshape(len(rows), -1), labels, feature_names


NUMBER_TEXT = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.floats(-1e6, 1e6, allow_nan=False, width=32).map(repr),
    st.floats(-1e30, 1e30, allow_nan=False).map(lambda v: f"{v:.4e}"),
    st.sampled_from(["0", "1", ".5", "-0.", "+3", "1E2", "007"]),
)
NOMINAL_VALUES = st.lists(
    st.sampled_from(["a", "b", "red", "x1", "0", "1", "2", "n/a"]), min_size=1, max_size=4, unique=True
)


@st.composite
def arff_tables(draw):
    """(ARFF text, label names, expected features, expected labels) of a random valid table."""
    attrs = []  # (name, nominal values or None, is_label)
    for j in range(draw(st.integers(1, 4))):
        attrs.append((f"f{j}", draw(st.one_of(st.none(), NOMINAL_VALUES)), False))
    for c in range(draw(st.integers(1, 3))):
        attrs.append((f"l{c}", draw(st.sampled_from([None, ["0", "1"], ["1", "0"]])), True))
    attrs = draw(st.permutations(attrs))
    label_names = [n for n, _, is_label in attrs if is_label]

    def kw(word: str) -> str:
        return draw(st.sampled_from([word, word.upper(), word.capitalize()]))

    header = [kw("@relation") + " fuzz"]
    for name, values, _ in attrs:
        kind = "{" + ",".join(values) + "}" if values else kw(draw(st.sampled_from(["numeric", "real", "integer"])))
        header.append(f"{kw('@attribute')} {name} {kind}")
    text = [*header, draw(st.sampled_from(["", "% a comment"])), kw("@data")]

    num_rows = draw(st.integers(1, 5))
    features = []
    labels = np.zeros((num_rows, len(label_names)), np.uint8)
    for i in range(num_rows):
        cells, row_features = [], []
        for name, values, is_label in attrs:
            if is_label:
                bit = draw(st.integers(0, 1))
                labels[i, label_names.index(name)] = bit
                cells.append(str(bit) if values else draw(st.sampled_from([str(bit), f"{bit}.0", f"{bit}e0"])))
            elif values is None:
                cell = draw(st.one_of(st.just("?"), NUMBER_TEXT))
                cells.append(cell)
                row_features.append(math.nan if cell == "?" else float(np.float32(float(cell))))
            else:
                cell = draw(st.sampled_from(["?", *values]))
                cells.append(cell)
                if sorted(values) == ["0", "1"]:
                    row_features.append(math.nan if cell == "?" else float(cell))
                else:
                    row_features.extend(1.0 if cell == v else 0.0 for v in values)
        features.append(row_features)
        if draw(st.booleans()):
            text.append(",".join(draw(st.sampled_from(["", " "])) + c for c in cells))
        else:
            defaults = [values[0] if values else "0" for _, values, _ in attrs]
            entries = [f"{j} {c}" for j, c in enumerate(cells) if c != defaults[j] or draw(st.booleans())]
            text.append("{" + ",".join(draw(st.permutations(entries))) + "}")
        if draw(st.integers(0, 4)) == 0:
            text.append(draw(st.sampled_from(["", "% between rows", "   "])))
    return "\n".join(text) + "\n", label_names, np.float32(features), labels


TOKENS = [",", "{", "}", "?", "%", "% c", "'", '"', " ", "\t", "\n", "@data", "@attribute z numeric", "-", ".",
          "e", "1", "0 1", "_", "\u0661", "x", "a", "{0,1}", "}\n{"]  # fmt: skip
BAD_CELLS = ["inf", "-inf", "nan", "NaN", "Infinity", "1e39", "1_0", "\u0661", "", "?", "x", "0x1", "1 2", "1e", "--1"]


@st.composite
def mutated(draw, text: str) -> str:
    """``text`` after one to three random edits: insert a token into a line, delete a few characters,
    duplicate or drop a line, or put a bad value into a cell of a data row."""
    # Positions and edits come from a seeded uniform Random: hypothesis's own draws favour small
    # integers and the first choices, which put nearly every edit into the first header lines.
    # (The seed shrinks, the edits do not; a failure prints the edited text.)
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(rnd.randint(1, 3)):
        lines = text.split("\n")
        data_start = next((i + 1 for i, s in enumerate(lines) if s.strip().lower() == "@data"), 0)
        in_data = data_start < len(lines) and rnd.random() < 0.6
        k = rnd.randrange(data_start, len(lines)) if in_data else rnd.randrange(len(lines))
        line = lines[k]
        at = rnd.randint(0, len(line))
        op = rnd.choice(["insert", "insert", "delete", "duplicate_line", "drop_line", "bad_cell", "bad_cell"])
        if op == "insert":
            lines[k] = line[:at] + rnd.choice(TOKENS) + line[at:]
        elif op == "delete":
            lines[k] = line[:at] + line[at + rnd.randint(1, 4) :]
        elif op == "duplicate_line":
            lines.insert(k, line)
        elif op == "drop_line":
            del lines[k]
        else:  # the value after a separator of this line ("," or the space of a sparse entry)
            starts = [m.end() for m in re.finditer(r"[,{ ]", line)]
            if starts:
                start = rnd.choice(starts)
                end = min([len(line)] + [m.start() for m in re.finditer(r"[,}]", line) if m.start() >= start])
                lines[k] = line[:start] + rnd.choice(BAD_CELLS) + line[end:]
        text = "\n".join(lines)
    return text


def _read(path: Path, xml: Path):
    try:
        fs = read_mulan(path, xml)
    except FastMLGANError as e:
        assert "\n" not in str(e), f"a multi-line error: {e}"
        return e
    return fs


def _same_table(fs, features, labels, feature_names=None) -> bool:
    return (
        np.array_equal(fs.features, features, equal_nan=True)
        and np.array_equal(fs.labels, labels)
        and (feature_names is None or fs.feature_names == feature_names)
    )


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None)
@hypothesis.given(table=arff_tables(), data=st.data())
def test_fuzz_reader_gives_the_right_table_or_a_clear_error(fuzz_dir, table, data):
    text, label_names, features, labels = table
    path, xml = fuzz_dir / "t.arff", fuzz_dir / "t.xml"
    xml.write_text(_xml(label_names))
    # The valid table: the reader and the reference both give the generated matrix.
    path.write_text(text, encoding="utf-8")
    got = _read(path, xml)
    assert not isinstance(got, Exception), f"valid table refused: {got}\n{text}"
    assert _same_table(got, features, labels), text
    ref = reference_parse(text, label_names)
    assert _same_table(got, *ref), text
    # Mutated: the reference's table, or a FastMLGANError where the reference rejects the text.
    bad = data.draw(mutated(text), label="mutated text")
    path.write_text(bad, encoding="utf-8")
    got = _read(path, xml)  # any exception other than FastMLGANError fails the test here
    try:
        ref = reference_parse(bad, label_names)
    except Reject as why:
        hypothesis.event("mutated: rejected by both")
        assert isinstance(got, FastMLGANError), f"invalid table accepted ({why}):\n{bad}"
        return
    except Unsupported:
        hypothesis.event("mutated: outside the reference (no-crash check only)")
        return
    hypothesis.event("mutated: still valid, same table")
    assert not isinstance(got, Exception), f"valid table refused: {got}\n{bad}"
    assert _same_table(got, *ref), bad
