"""The ARFF reader: MULAN files (labels named in an XML file) and MEKA files (labels given by
``-C`` in the @relation line), dense and sparse rows, numeric and nominal attributes. Every
malformed file raises a ``DataError`` whose message starts with ``path:line:``.

Encoding rules, shared by all ARFF files:

* numeric/real/integer attributes are one float column; ``?`` is NaN, which ``Standardizer``
  replaces by the TRAINING mean (never a statistic of the file being read);
* nominal attributes are one-hot, one column per declared value named ``attr=value``; a missing
  value is an all-zero block. The exception is a nominal ``{0,1}`` attribute, which is already a
  0/1 indicator and stays one column named ``attr`` (``?`` is NaN): otherwise the 1449 binary
  words of ``medical`` would become 2898 redundant columns;
* label attributes must be nominal ``{0,1}`` or numeric with values 0/1, and never missing;
* in sparse rows ``{index value, ...}`` an absent value is 0, which for a nominal attribute is
  its first declared value (ARFF specification); an index may appear only once in a row;
* a number cell is a plain decimal that fits float32: ``inf``, ``nan`` and the like are refused
  (``fastmlgan.data.sources.tables.to_float``), since ``?`` is how ARFF writes a missing value.
"""

from __future__ import annotations

import re
import xml.parsers.expat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmlgan.data.sources.tables import MISSING, FeatureSet, check_labels, read_text, to_float
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.safeio import read_bytes

__all__ = ["ARFF_FORMATS", "load_arff_pair", "read_meka", "read_mulan"]


# ----------------------------------------------------------------------------------------------
# Text to a table of string cells


@dataclass(frozen=True)
class _Attribute:
    name: str
    kind: str  # "numeric" or "nominal"
    values: tuple[str, ...]  # declared nominal values, in order; () for numeric
    line: int

    @property
    def is_binary(self) -> bool:
        return self.kind == "nominal" and sorted(self.values) == ["0", "1"]

    def describe(self) -> str:
        return f"{self.name!r} " + ("numeric" if self.kind == "numeric" else "{" + ",".join(self.values) + "}")


@dataclass
class _ArffTable:
    path: str
    relation: str
    relation_line: int
    attributes: list[_Attribute]
    cells: np.ndarray  # (N, A) str; "?" = missing
    lines: np.ndarray  # (N,) 1-based line number of each row
    data_line: int  # line of @data


_DIRECTIVE = re.compile(r"@([A-Za-z]+)\s*(.*)$")
_NUMERIC_TYPES = {"numeric", "real", "integer"}
_MEKA_C = re.compile(r"(?:^|\s)-C\s+(-?\d+)")
# int() would also take '1_0' or non-ASCII digits: a sparse index is ASCII digits (Java's sign allowed).
_SPARSE_INDEX = re.compile(r"[+-]?[0-9]+")


def _split_quoted(text: str) -> list[str]:
    """Split on commas outside '...' / "..." quotes, unquote, and drop a trailing % comment."""
    tokens: list[str] = []
    cur: list[str] = []
    quote = None
    was_quoted = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote:
            if ch == "\\" and i + 1 < n:
                cur.append(text[i + 1])
                i += 1
            elif ch == quote:
                quote = None
            else:
                cur.append(ch)
        elif ch == "'" or ch == '"':
            if not "".join(cur).strip():
                cur = []  # blanks before an opening quote are not part of the value
            quote, was_quoted = ch, True
        elif ch == ",":
            tokens.append("".join(cur) if was_quoted else "".join(cur).strip())
            cur, was_quoted = [], False
        elif ch == "%":
            break
        elif not (was_quoted and ch.isspace()):  # spaces around a quoted token are not part of it
            cur.append(ch)
        i += 1
    if quote:
        raise ValueError(f"unterminated {quote} quote")
    tokens.append("".join(cur) if was_quoted else "".join(cur).strip())
    return tokens


def _strip_comment(line: str) -> str:
    """``line`` up to its first ``%`` outside quotes: the comment runs to the end of the line, so
    a '}' after it does not close a sparse row or a nominal declaration."""
    quote = None
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 1  # an escaped character, as _split_quoted reads it
            elif ch == quote:
                quote = None
        elif ch == "'" or ch == '"':
            quote = ch
        elif ch == "%":
            return line[:i]
        i += 1
    return line


def _unquote_name(text: str) -> tuple[str, str]:
    """(name, rest) for the start of ``text``: a quoted name may hold spaces, a bare one may not."""
    if text[:1] in ("'", '"'):
        q = text[0]
        i = 1
        name: list[str] = []
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text):
                name.append(text[i + 1])
                i += 2
                continue
            if ch == q:
                return "".join(name), text[i + 1 :].strip()
            name.append(ch)
            i += 1
        raise ValueError(f"unterminated {q} quote")
    m = re.match(r"([^\s{]+)\s*(.*)$", text)
    if not m:
        raise ValueError("missing name")
    return m.group(1), m.group(2)


def _parse_attribute(rest: str, where: str) -> tuple[str, str, tuple[str, ...]]:
    try:
        name, type_text = _unquote_name(rest.strip())
    except ValueError as e:
        raise DataError(f"{where}: bad @attribute name: {e}") from None
    if type_text.startswith("{"):
        close = type_text.rfind("}")
        if close < 0:
            raise DataError(f"{where}: nominal attribute {name!r} has no closing '}}'")
        try:
            values = _split_quoted(type_text[1:close])
        except ValueError as e:
            raise DataError(f"{where}: attribute {name!r}: {e}") from None
        if any(v == "" for v in values):
            raise DataError(f"{where}: nominal attribute {name!r} has an empty value in {type_text[: close + 1]}")
        if len(set(values)) != len(values):
            raise DataError(f"{where}: nominal attribute {name!r} repeats a value in {type_text[: close + 1]}")
        return name, "nominal", tuple(values)
    kind = type_text.split()[0].lower() if type_text.split() else ""
    if kind in _NUMERIC_TYPES:
        return name, "numeric", ()
    if kind in ("string", "date", "relational"):
        raise DataError(
            f"{where}: attribute {name!r} is of type {kind}; only numeric and nominal attributes "
            "can be turned into features (remove it or convert it, e.g. with Weka's StringToWordVector)"
        )
    raise DataError(f"{where}: attribute {name!r} has unknown type {type_text!r}")


def _read_header(path: Path, lines: list[str]) -> tuple[str, int, list[_Attribute], int]:
    relation, relation_line = "", 0
    attributes: list[_Attribute] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(lines):
        s = (_strip_comment(raw) if "%" in raw else raw).strip()
        if not s:
            continue
        where = f"{path}:{i + 1}"
        m = _DIRECTIVE.match(s)
        if not m:
            raise DataError(f"{where}: expected @relation, @attribute or @data before the data, got {s[:60]!r}")
        keyword, rest = m.group(1).lower(), m.group(2)
        if keyword == "relation":
            rest = rest.strip()
            try:
                # Unquoted, keep the whole rest: MEKA options may follow an unquoted name.
                relation = _unquote_name(rest)[0] if rest[:1] in ("'", '"') else rest
            except ValueError as e:
                raise DataError(f"{where}: bad @relation name: {e}") from None
            relation_line = i + 1
        elif keyword == "attribute":
            name, kind, values = _parse_attribute(rest, where)
            if name in seen:
                raise DataError(f"{where}: attribute {name!r} already declared on line {seen[name]}")
            seen[name] = i + 1
            attributes.append(_Attribute(name, kind, values, i + 1))
        elif keyword == "data":
            if not attributes:
                raise DataError(f"{where}: @data before any @attribute")
            return relation, relation_line, attributes, i + 1
        else:
            raise DataError(f"{where}: unknown directive @{m.group(1)}")
    last = len(lines) - 1 if len(lines) > 1 and lines[-1] == "" else len(lines)  # "" after the final newline
    raise DataError(f"{path}:{last}: no @data section")


def _sparse_row(body: str, slow: bool, defaults: list[str]) -> list[str]:
    """The cells of a sparse row ``{index value, ...}`` (``body`` without the braces); ``defaults``
    holds the value of every absent index. ValueError says what is wrong with the row."""
    row = list(defaults)
    if not body.strip():
        return row
    entries = _split_quoted(body) if slow else body.split(",")
    seen: dict[int, str] = {}
    for entry in entries:
        parts = entry.split(None, 1)
        if len(parts) != 2:
            raise ValueError(f"sparse entry {entry.strip()!r} is not 'index value'")
        if not _SPARSE_INDEX.fullmatch(parts[0]):
            raise ValueError(f"sparse index {parts[0]!r} is not an integer")
        j = int(parts[0])
        if not 0 <= j < len(defaults):
            raise ValueError(f"sparse index {j} out of range: {len(defaults)} attributes (0..{len(defaults) - 1})")
        if j in seen:
            # Weka keeps one of the two values without a word; a row is one value per attribute.
            raise ValueError(f"sparse index {j} appears twice in the row ({seen[j]!r} and {entry.strip()!r})")
        seen[j] = entry.strip()
        row[j] = parts[1].strip()
    return row


def _read_arff(path) -> _ArffTable:
    path = Path(path)
    lines = read_text(path).split("\n")
    relation, relation_line, attributes, data_line = _read_header(path, lines)
    num_attrs = len(attributes)
    # The value an absent sparse entry takes: 0, i.e. the first declared value of a nominal.
    sparse_default = [a.values[0] if a.kind == "nominal" else "0" for a in attributes]

    rows: list[list[str]] = []
    row_lines: list[int] = []
    for i in range(data_line, len(lines)):
        s = lines[i]
        slow = "'" in s or '"' in s or "%" in s
        s = (_strip_comment(s) if "%" in s else s).strip()
        if not s:
            continue
        where = f"{path}:{i + 1}"
        if s[0] == "{":
            close = s.rfind("}")
            if close < 0:
                raise DataError(f"{where}: sparse row has no closing '}}'")
            if s[close + 1 :].strip():
                raise DataError(f"{where}: unexpected text after the sparse row: {s[close + 1 :][:40]!r}")
            try:
                rows.append(_sparse_row(s[1:close], slow, sparse_default))
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
        else:
            if slow:
                try:
                    row = _split_quoted(s)
                except ValueError as e:
                    raise DataError(f"{where}: {e}") from None
            else:
                row = s.split(",")
            if len(row) != num_attrs:
                raise DataError(f"{where}: expected {num_attrs} values, got {len(row)}")
            rows.append(row)
        row_lines.append(i + 1)

    cells = np.array(rows, dtype=str) if rows else np.empty((0, num_attrs), dtype="<U1")
    return _ArffTable(
        str(path), relation, relation_line, attributes, cells, np.asarray(row_lines, dtype=np.int64), data_line
    )


# ----------------------------------------------------------------------------------------------
# From string cells to numbers


def _nominal_codes(column: np.ndarray, attr: _Attribute, lines: np.ndarray, path) -> np.ndarray:
    """(N,) index of each value in ``attr.values``; -1 where missing."""
    uniq, inverse = np.unique(np.char.strip(column), return_inverse=True)
    index = {v: k for k, v in enumerate(attr.values)}
    table = np.empty(len(uniq), dtype=np.int64)
    unknown = []
    for u, value in enumerate(uniq.tolist()):
        if value == MISSING:
            table[u] = -1
        elif value in index:
            table[u] = index[value]
        else:
            unknown.append(u)
    if unknown:
        row = min(int(np.flatnonzero(inverse == u)[0]) for u in unknown)
        value = str(uniq[inverse[row]])
        raise DataError(
            f"{path}:{lines[row]}: attribute {attr.name!r}: unknown nominal value {value!r} "
            f"(line {attr.line} declares {{{','.join(attr.values)}}})"
        )
    return table[inverse.reshape(-1)]


def _encode(table: _ArffTable, label_idx: list[int], name: str) -> FeatureSet:
    """Apply the module's encoding rules to a parsed ARFF table."""
    path, attrs, cells, lines = table.path, table.attributes, table.cells, table.lines
    for j in label_idx:
        if attrs[j].kind == "nominal" and not attrs[j].is_binary:
            a = attrs[j]
            raise DataError(f"{path}:{a.line}: label attribute {a.describe()} must be nominal {{0,1}} or numeric 0/1")
    label_set = set(label_idx)
    if len(label_set) == len(attrs):
        raise DataError(f"{path}:{table.data_line}: every attribute is a label; no features left")
    if len(cells) == 0:
        raise DataError(f"{path}:{table.data_line}: no data rows after @data")

    label_values = np.empty((len(cells), len(label_idx)))
    for c, j in enumerate(label_idx):
        a = attrs[j]
        if a.kind == "nominal":
            lut = np.array([float(v) for v in a.values] + [np.nan])  # code -1 (missing) -> NaN
            label_values[:, c] = lut[_nominal_codes(cells[:, j], a, lines, path)]
        else:
            label_values[:, c] = to_float(cells[:, [j]], [a.name], lines, path)[:, 0]
    class_names = [attrs[j].name for j in label_idx]
    labels = check_labels(label_values, class_names, lines, path)

    feature_idx = [j for j in range(len(attrs)) if j not in label_set]
    numeric_idx = [j for j in feature_idx if attrs[j].kind == "numeric"]
    numeric = to_float(cells[:, numeric_idx], [attrs[j].name for j in numeric_idx], lines, path)
    numeric_col = {j: k for k, j in enumerate(numeric_idx)}

    blocks: list[np.ndarray] = []
    feature_names: list[str] = []
    for j in feature_idx:
        a = attrs[j]
        if a.kind == "numeric":
            blocks.append(numeric[:, numeric_col[j] : numeric_col[j] + 1])
            feature_names.append(a.name)
            continue
        codes = _nominal_codes(cells[:, j], a, lines, path)
        if a.is_binary:
            lut = np.array([float(v) for v in a.values] + [np.nan])
            blocks.append(lut[codes][:, None])
            feature_names.append(a.name)
        else:
            one_hot = np.zeros((len(codes), len(a.values)))
            present = np.flatnonzero(codes >= 0)
            one_hot[present, codes[present]] = 1.0  # a missing value leaves the block all zero
            blocks.append(one_hot)
            feature_names.extend(f"{a.name}={v}" for v in a.values)
    features = np.concatenate(blocks, axis=1).astype(np.float32)
    return FeatureSet(name, features, labels, feature_names, class_names)


# ----------------------------------------------------------------------------------------------
# Where the labels are: MULAN XML or MEKA -C


def _read_mulan_labels(xml_path) -> list[tuple[str, int]]:
    """(label name, XML line) in document order; namespaces and nested (hierarchical) labels allowed."""
    path = Path(xml_path)
    if not path.exists():
        raise DataError(f"{path}: no such file (the MULAN label XML)")
    data = read_bytes(path, "MULAN label XML")  # a FIFO, a device or a folder: one line, never a wait
    labels: list[tuple[str, int]] = []
    parser = xml.parsers.expat.ParserCreate(namespace_separator="}")

    def start(tag, attributes):
        if tag.rsplit("}", 1)[-1] != "label":
            return
        line = parser.CurrentLineNumber
        if "name" not in attributes:
            raise DataError(f"{path}:{line}: <label> has no name attribute")
        labels.append((attributes["name"], line))

    parser.StartElementHandler = start
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as e:
        raise DataError(f"{path}:{e.lineno}: not valid XML: {xml.parsers.expat.ErrorString(e.code)}") from None
    if not labels:
        raise DataError(f'{path}:1: no <label name="..."> element')
    first: dict[str, int] = {}
    for name, line in labels:
        if name in first:
            raise DataError(f"{path}:{line}: label {name!r} already listed on line {first[name]}")
        first[name] = line
    return labels


def _mulan_label_idx(table: _ArffTable, labels: list[tuple[str, int]], xml_path) -> list[int]:
    index = {a.name: j for j, a in enumerate(table.attributes)}
    missing = [(name, line) for name, line in labels if name not in index]
    if missing:
        name, line = missing[0]
        raise DataError(
            f"{xml_path}:{line}: label {name!r} is not an attribute of {table.path} "
            f"(header lines 1-{table.data_line}); is this the XML of another dataset?"
        )
    return [index[name] for name, _ in labels]


def _meka_label_idx(table: _ArffTable) -> list[int]:
    where = f"{table.path}:{max(table.relation_line, 1)}"
    m = _MEKA_C.search(table.relation)
    if not m:
        raise DataError(
            f"{where}: @relation {table.relation!r} has no '-C <num_labels>' (MEKA layout); "
            "for a MULAN file pass its label XML"
        )
    c, num_attrs = int(m.group(1)), len(table.attributes)
    if c == 0 or abs(c) >= num_attrs:
        raise DataError(f"{where}: -C {c} must name between 1 and {num_attrs - 1} label attributes")
    # MEKA: C > 0 means the first C attributes, C < 0 the last |C|.
    return list(range(c)) if c > 0 else list(range(num_attrs + c, num_attrs))


def read_mulan(arff_path, xml_path) -> FeatureSet:
    """A MULAN ARFF file; its label attributes are the ones named in ``xml_path`` (in XML order)."""
    table = _read_arff(arff_path)
    label_idx = _mulan_label_idx(table, _read_mulan_labels(xml_path), xml_path)
    return _encode(table, label_idx, Path(arff_path).stem)


def read_meka(arff_path) -> FeatureSet:
    """A MEKA ARFF file: the labels are the first C attributes for ``-C C`` in @relation (last |C| if C < 0)."""
    table = _read_arff(arff_path)
    return _encode(table, _meka_label_idx(table), Path(arff_path).stem)


# ----------------------------------------------------------------------------------------------
# Train/test pairs


def _check_same_header(train: _ArffTable, test: _ArffTable) -> None:
    for k, (a, b) in enumerate(zip(train.attributes, test.attributes)):
        if (a.name, a.kind, a.values) != (b.name, b.kind, b.values):
            raise DataError(
                f"{test.path}:{b.line}: attribute {k + 1} is {b.describe()} but {train.path}:{a.line} "
                f"declares {a.describe()}; train and test must share one header"
            )
    if len(train.attributes) != len(test.attributes):
        raise DataError(
            f"{test.path}:{test.data_line}: {len(test.attributes)} attributes but {train.path} has "
            f"{len(train.attributes)}; train and test must share one header"
        )


def _mulan_xml_beside(arff: Path) -> Path | None:
    """``<dir>/<name>.xml`` for ``<dir>/<name>[-train|-test|...].arff``, if it exists."""
    for xml_path in sorted(arff.parent.glob("*.xml")):
        if arff.stem == xml_path.stem or arff.stem.startswith(xml_path.stem + "-"):
            return xml_path
    return None


ARFF_FORMATS = ("auto", "mulan", "meka")


def load_arff_pair(train, test, xml=None, format: str = "auto") -> tuple[FeatureSet, FeatureSet]:
    """A train/test pair of ARFF files with one header. ``format="auto"``: MULAN when ``xml`` is
    given, else MEKA when the @relation holds ``-C`` and no MULAN label file sits beside ``train``."""
    if format not in ARFF_FORMATS:
        raise ConfigError(f"format={format!r}: choose one of {', '.join(ARFF_FORMATS)}")
    train_table = None
    if format == "auto":
        if xml is not None:
            format = "mulan"
        else:
            train_table = _read_arff(train)
            _refuse_unclear_meka(train_table, Path(train))
            format = "meka"
    if format == "mulan" and xml is None:
        raise ConfigError("format='mulan' needs xml=, the MULAN label file")
    train_table = train_table or _read_arff(train)
    test_table = _read_arff(test)
    _check_same_header(train_table, test_table)
    if format == "mulan":
        labels = _read_mulan_labels(xml)
        train_idx = _mulan_label_idx(train_table, labels, xml)
        test_idx = _mulan_label_idx(test_table, labels, xml)
    else:
        train_idx, test_idx = _meka_label_idx(train_table), _meka_label_idx(test_table)
        if train_idx != test_idx:
            raise DataError(
                f"{test}:{max(test_table.relation_line, 1)}: -C names {len(test_idx)} label attributes "
                f"(positions {test_idx[0] + 1}..{test_idx[-1] + 1}) but {train} names {len(train_idx)} "
                f"(positions {train_idx[0] + 1}..{train_idx[-1] + 1})"
            )
    return _encode(train_table, train_idx, Path(train).stem), _encode(test_table, test_idx, Path(test).stem)


def _refuse_unclear_meka(table: _ArffTable, train: Path) -> None:
    """Auto-detection without an XML: the labels must be given by a MEKA ``-C``, unambiguously."""
    if not _MEKA_C.search(table.relation):
        raise DataError(
            f"{train}:{max(table.relation_line, 1)}: cannot tell which attributes are labels: "
            "the @relation has no MEKA '-C <num_labels>'; pass xml= for a MULAN dataset"
        )
    # MULAN files can carry a leftover "-C" too (medical's relation says -C 45 but its labels
    # are the LAST 45 attributes): refuse to guess when a MULAN label file sits beside them.
    beside = _mulan_xml_beside(train)
    if beside is not None:
        raise DataError(
            f"{train}:{max(table.relation_line, 1)}: the @relation has a MEKA '-C' but the "
            f"MULAN label file {beside} sits beside it; pass xml= (MULAN) or format='meka'"
        )
