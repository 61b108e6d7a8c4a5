"""Multi-label tables (MULAN / MEKA ARFF, .npz, .csv) read into one feature matrix and one label matrix.

These are the standard non-image benchmarks (scene, emotions, medical, ...): the classifier of §3
sees a fixed feature vector instead of CNN features, and the label sets are what the
discriminator models. Every reader returns a ``FeatureSet``; every malformed file raises a
``DataError`` whose message starts with ``path:line:``.

Encoding rules, shared by all ARFF files:

* numeric/real/integer attributes are one float column; ``?`` is NaN, which ``Standardizer``
  replaces by the TRAINING mean (never a statistic of the file being read);
* nominal attributes are one-hot, one column per declared value named ``attr=value``; a missing
  value is an all-zero block. The exception is a nominal ``{0,1}`` attribute, which is already a
  0/1 indicator and stays one column named ``attr`` (``?`` is NaN): otherwise the 1449 binary
  words of ``medical`` would become 2898 redundant columns;
* label attributes must be nominal ``{0,1}`` or numeric with values 0/1, and never missing;
* in sparse rows ``{index value, ...}`` an absent value is 0, which for a nominal attribute is
  its first declared value (ARFF specification).
"""

from __future__ import annotations

import csv
import dataclasses
import re
import xml.parsers.expat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmlgan.errors import ConfigError, DataError

__all__ = [
    "FeatureSet",
    "Standardizer",
    "load_feature_dataset",
    "read_matrix",
    "read_meka",
    "read_mulan",
]


@dataclass
class FeatureSet:
    """A multi-label table: ``features[i]`` is the input of row ``i``, ``labels[i, c] == 1`` when it
    carries class ``c`` (``class_names[c]``). NaN in ``features`` marks a missing value."""

    name: str
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N, C) uint8
    feature_names: list[str]
    class_names: list[str]

    def __post_init__(self) -> None:
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.uint8)
        if self.features.ndim != 2 or self.features.shape[1] != len(self.feature_names):
            raise ValueError(
                f"{self.name}: features must have shape (N, {len(self.feature_names)}), got {self.features.shape}"
            )
        if self.labels.ndim != 2 or self.labels.shape != (len(self.features), len(self.class_names)):
            raise ValueError(
                f"{self.name}: labels must have shape ({len(self.features)}, {len(self.class_names)}), "
                f"got {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.features)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_dim(self) -> int:
        return len(self.feature_names)

    def subset(self, indices, name: str | None = None) -> FeatureSet:
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            name=name or self.name,
            features=self.features[idx],
            labels=self.labels[idx],
            feature_names=list(self.feature_names),
            class_names=list(self.class_names),
        )


# ----------------------------------------------------------------------------------------------
# ARFF


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


_MISSING = "?"
_DIRECTIVE = re.compile(r"@([A-Za-z]+)\s*(.*)$")
_NUMERIC_TYPES = {"numeric", "real", "integer"}
_MEKA_C = re.compile(r"(?:^|\s)-C\s+(-?\d+)")


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


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_header(path: Path, lines: list[str]) -> tuple[str, int, list[_Attribute], int]:
    relation, relation_line = "", 0
    attributes: list[_Attribute] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(lines):
        s = raw.strip()
        if not s or s[0] == "%":
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


def _read_arff(path) -> _ArffTable:
    path = Path(path)
    lines = _read_text(path).split("\n")
    relation, relation_line, attributes, data_line = _read_header(path, lines)
    num_attrs = len(attributes)
    # The value an absent sparse entry takes: 0, i.e. the first declared value of a nominal.
    sparse_default = [a.values[0] if a.kind == "nominal" else "0" for a in attributes]

    rows: list[list[str]] = []
    row_lines: list[int] = []
    for i in range(data_line, len(lines)):
        s = lines[i]
        if "'" in s or '"' in s or "%" in s:
            slow = True
            s = s.strip()
            if not s or s[0] == "%":
                continue
        else:
            slow = False
            s = s.strip()
            if not s:
                continue
        where = f"{path}:{i + 1}"
        if s[0] == "{":
            close = s.rfind("}")
            if close < 0:
                raise DataError(f"{where}: sparse row has no closing '}}'")
            if s[close + 1 :].strip() and not s[close + 1 :].strip().startswith("%"):
                raise DataError(f"{where}: unexpected text after the sparse row: {s[close + 1 :][:40]!r}")
            body = s[1:close]
            row = list(sparse_default)
            if body.strip():
                try:
                    entries = _split_quoted(body) if slow else body.split(",")
                except ValueError as e:
                    raise DataError(f"{where}: {e}") from None
                for entry in entries:
                    parts = entry.split(None, 1)
                    if len(parts) != 2:
                        raise DataError(f"{where}: sparse entry {entry.strip()!r} is not 'index value'")
                    try:
                        j = int(parts[0])
                    except ValueError:
                        raise DataError(f"{where}: sparse index {parts[0]!r} is not an integer") from None
                    if not 0 <= j < num_attrs:
                        raise DataError(
                            f"{where}: sparse index {j} out of range: {num_attrs} attributes (0..{num_attrs - 1})"
                        )
                    row[j] = parts[1].strip()
            rows.append(row)
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


def _to_float(cells: np.ndarray, names, lines: np.ndarray, path, missing=(_MISSING,)) -> np.ndarray:
    """(N, k) float64 from string cells; a ``missing`` token is NaN; a bad number names its line."""
    try:
        return cells.astype(np.float64)  # the common case: one vectorised pass, blanks allowed
    except ValueError:
        pass
    stripped = np.char.strip(cells)
    is_missing = np.isin(stripped, list(missing))
    try:
        return np.where(is_missing, "nan", stripped).astype(np.float64)
    except ValueError:
        pass
    # Slow path, only to report the first bad value in file order.
    out = np.full(cells.shape, np.nan)
    for i in range(cells.shape[0]):
        for j in range(cells.shape[1]):
            if is_missing[i, j]:
                continue
            try:
                out[i, j] = float(stripped[i, j])
            except ValueError:
                raise DataError(f"{path}:{lines[i]}: {names[j]!r}: {str(stripped[i, j])!r} is not a number") from None
    return out


def _nominal_codes(column: np.ndarray, attr: _Attribute, lines: np.ndarray, path) -> np.ndarray:
    """(N,) index of each value in ``attr.values``; -1 where missing."""
    uniq, inverse = np.unique(np.char.strip(column), return_inverse=True)
    index = {v: k for k, v in enumerate(attr.values)}
    table = np.empty(len(uniq), dtype=np.int64)
    unknown = []
    for u, value in enumerate(uniq.tolist()):
        if value == _MISSING:
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


def _check_labels(values: np.ndarray, names, lines: np.ndarray, path) -> np.ndarray:
    bad = ~((values == 0) | (values == 1))  # NaN (missing) is bad too
    if bad.any():
        i, c = np.argwhere(bad)[0]
        v = values[i, c]
        what = "is missing" if np.isnan(v) else f"must be 0 or 1, got {v:g}"
        raise DataError(f"{path}:{lines[i]}: label {names[c]!r} {what}")
    return values.astype(np.uint8)


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
            label_values[:, c] = _to_float(cells[:, [j]], [a.name], lines, path)[:, 0]
    class_names = [attrs[j].name for j in label_idx]
    labels = _check_labels(label_values, class_names, lines, path)

    feature_idx = [j for j in range(len(attrs)) if j not in label_set]
    numeric_idx = [j for j in feature_idx if attrs[j].kind == "numeric"]
    numeric = _to_float(cells[:, numeric_idx], [attrs[j].name for j in numeric_idx], lines, path)
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
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (the MULAN label XML)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
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
# .npz / .csv


def _read_npz(path: Path, num_labels, label_columns) -> FeatureSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz archive: {e}") from None

    def pick(*keys):
        for k in keys:
            if k in arrays:
                return k, arrays[k]
        raise DataError(f"{path}: needs an array named {' or '.join(map(repr, keys))}; found {sorted(arrays)}")

    x_key, x = pick("X", "features")
    y_key, y = pick("Y", "labels")
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise DataError(f"{path}: {x_key} {x.shape} and {y_key} {y.shape} must be 2-D with the same number of rows")
    feature_names = [str(s) for s in arrays.get("feature_names", [f"f{j}" for j in range(x.shape[1])])]
    class_names = [str(s) for s in arrays.get("class_names", [f"c{j}" for j in range(y.shape[1])])]
    if len(feature_names) != x.shape[1] or len(class_names) != y.shape[1]:
        raise DataError(f"{path}: feature_names/class_names do not match the columns of {x_key}/{y_key}")
    if num_labels is not None and num_labels != y.shape[1]:
        raise DataError(f"{path}: {y_key} has {y.shape[1]} label columns, num_labels={num_labels} was asked")
    if label_columns is not None and list(label_columns) != class_names:
        raise DataError(f"{path}: class_names {class_names} differ from label_columns={list(label_columns)}")
    try:
        x = x.astype(np.float32)
        y = y.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {x_key}/{y_key} are not numeric: {e}") from None
    bad = np.argwhere(~((y == 0) | (y == 1)))
    if len(bad):
        i, c = bad[0]
        raise DataError(f"{path}: {y_key}[{i}, {c}] = {y[i, c]:g}; labels must be 0 or 1")
    return FeatureSet(path.stem, x, y.astype(np.uint8), feature_names, class_names)


def _read_csv(path: Path, num_labels, label_columns) -> FeatureSet:
    text = _read_text(path)
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{path}:1: empty file; expected a header row of column names")
        header = [h.strip() for h in header]
        if label_columns is not None:
            label_columns = list(label_columns)
            unknown = [c for c in label_columns if c not in header]
            if unknown:
                raise DataError(f"{path}:1: label column {unknown[0]!r} is not in the header")
            label_idx = [header.index(c) for c in label_columns]
        elif num_labels is not None:
            if not 1 <= num_labels < len(header):
                raise DataError(f"{path}:1: num_labels={num_labels} but the header has {len(header)} columns")
            label_idx = list(range(len(header) - num_labels, len(header)))
        else:
            raise ConfigError(f"read_matrix({path}): pass num_labels or label_columns to say which columns are labels")
        rows, lines = [], []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: expected {len(header)} values, got {len(row)}")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: {e}") from None
    if not rows:
        raise DataError(f"{path}:{reader.line_num}: no data rows after the header")
    cells, line_arr = np.array(rows, dtype=str), np.asarray(lines)
    values = _to_float(cells, header, line_arr, path, missing=("", _MISSING))
    feature_idx = [j for j in range(len(header)) if j not in set(label_idx)]
    labels = _check_labels(values[:, label_idx], [header[j] for j in label_idx], line_arr, path)
    return FeatureSet(
        path.stem, values[:, feature_idx], labels, [header[j] for j in feature_idx], [header[j] for j in label_idx]
    )


def read_matrix(path, num_labels: int | None = None, label_columns=None) -> FeatureSet:
    """A ``.npz`` (arrays ``X``/``features`` and ``Y``/``labels``, optional ``feature_names`` and
    ``class_names``) or a ``.csv`` with a header row whose label columns are ``label_columns`` (names)
    or the last ``num_labels``; empty or ``?`` cells are missing features."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, num_labels, label_columns)
    if suffix == ".csv":
        return _read_csv(path, num_labels, label_columns)
    raise DataError(f"{path}: read_matrix reads .npz or .csv files, not {suffix or 'files without a suffix'}")


# ----------------------------------------------------------------------------------------------
# Train/test pairs


_FORMATS = ("auto", "mulan", "meka", "matrix")


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


def _check_same_columns(train: FeatureSet, test: FeatureSet, train_path, test_path) -> None:
    for what, a, b in (
        ("feature", train.feature_names, test.feature_names),
        ("label", train.class_names, test.class_names),
    ):
        if a != b:
            k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            got = repr(b[k]) if k < len(b) else "nothing"
            want = repr(a[k]) if k < len(a) else "nothing"
            raise DataError(
                f"{test_path}:1: {what} column {k + 1} is {got} but {train_path} has {want} "
                f"({len(b)} vs {len(a)} {what} columns); train and test must have the same columns"
            )


def _mulan_xml_beside(arff: Path) -> Path | None:
    """``<dir>/<name>.xml`` for ``<dir>/<name>[-train|-test|...].arff``, if it exists."""
    for xml_path in sorted(arff.parent.glob("*.xml")):
        if arff.stem == xml_path.stem or arff.stem.startswith(xml_path.stem + "-"):
            return xml_path
    return None


def load_feature_dataset(
    train, test, xml=None, format: str = "auto", num_labels: int | None = None, label_columns=None
) -> tuple[FeatureSet, FeatureSet]:
    """Read a train/test pair and check that both splits have the same columns and labels.

    ``format="auto"`` picks MULAN when ``xml`` is given, the matrix reader for .npz/.csv, and MEKA
    when the ARFF @relation holds ``-C``.
    """
    if format not in _FORMATS:
        raise ConfigError(f"format={format!r}: choose one of {', '.join(_FORMATS)}")
    train_table = None
    if format == "auto":
        if xml is not None:
            format = "mulan"
        elif Path(train).suffix.lower() in (".npz", ".csv"):
            format = "matrix"
        else:
            train_table = _read_arff(train)
            if not _MEKA_C.search(train_table.relation):
                raise DataError(
                    f"{train}:{max(train_table.relation_line, 1)}: cannot tell which attributes are labels: "
                    "the @relation has no MEKA '-C <num_labels>'; pass xml= for a MULAN dataset"
                )
            # MULAN files can carry a leftover "-C" too (medical's relation says -C 45 but its labels
            # are the LAST 45 attributes): refuse to guess when a MULAN label file sits beside them.
            beside = _mulan_xml_beside(Path(train))
            if beside is not None:
                raise DataError(
                    f"{train}:{max(train_table.relation_line, 1)}: the @relation has a MEKA '-C' but the "
                    f"MULAN label file {beside} sits beside it; pass xml= (MULAN) or format='meka'"
                )
            format = "meka"
    if format == "mulan" and xml is None:
        raise ConfigError("format='mulan' needs xml=, the MULAN label file")

    if format == "matrix":
        train_set = read_matrix(train, num_labels, label_columns)
        test_set = read_matrix(test, num_labels, label_columns)
    else:
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
        train_set = _encode(train_table, train_idx, Path(train).stem)
        test_set = _encode(test_table, test_idx, Path(test).stem)
    _check_same_columns(train_set, test_set, train, test)
    return train_set, test_set


# ----------------------------------------------------------------------------------------------
# Standardisation


class Standardizer:
    """Per-column z-scoring with the mean/std of the TRAINING rows; a missing (NaN) value becomes the
    training mean, i.e. 0 after centring, so no statistic of the test split leaks into it."""

    def __init__(self, mean=None, std=None) -> None:
        self.mean = None if mean is None else np.asarray(_to_numpy(mean), dtype=np.float32).reshape(-1)
        self.std = None if std is None else np.asarray(_to_numpy(std), dtype=np.float32).reshape(-1)
        if (self.mean is None) != (self.std is None) or (self.mean is not None and self.mean.shape != self.std.shape):
            raise ValueError("Standardizer needs both mean and std, of the same length")

    def fit(self, features) -> Standardizer:
        x = np.asarray(_to_numpy(features), dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"Standardizer.fit expects a non-empty (N, D) matrix, got shape {x.shape}")
        present = ~np.isnan(x)
        count = present.sum(axis=0)
        x0 = np.where(present, x, 0.0)
        mean = x0.sum(axis=0) / np.maximum(count, 1)  # an all-missing column gets mean 0
        var = (np.where(present, x - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count, 1)
        std = np.sqrt(var)
        # A constant column has std 0 up to float64 rounding of its mean: leave it unscaled.
        std = np.where(std > 1e-10 * np.abs(mean), std, 1.0)
        std = np.where(std > 0, std, 1.0)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        return self

    def transform(self, features):
        """Standardised copy of ``features`` (numpy in → numpy float32 out; tensor in → tensor out)."""
        if self.mean is None:
            raise RuntimeError("Standardizer.transform called before fit")
        if features.shape[-1] != len(self.mean):
            raise ValueError(f"expected {len(self.mean)} feature columns, got {features.shape[-1]}")
        if isinstance(features, np.ndarray):
            z = (features.astype(np.float32) - self.mean) / self.std
            return np.where(np.isnan(z), np.float32(0), z)
        import torch

        mean = torch.as_tensor(self.mean, device=features.device)
        std = torch.as_tensor(self.std, device=features.device)
        z = (features.float() - mean) / std
        return torch.where(torch.isnan(z), torch.zeros_like(z), z)

    def state_dict(self) -> dict:
        if self.mean is None:
            raise RuntimeError("Standardizer.state_dict called before fit")
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> Standardizer:
        return cls(state["mean"], state["std"])


def _to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch for numpy users
        return x.detach().cpu().numpy()
    return np.asarray(x)


class FeatureDataset:
    """A ``FeatureSet`` as loader samples with the same keys as the image loaders.

    ``image`` holds the standardised feature vector (the generator's input whatever its kind),
    ``crop`` is [-1, -1] (no augmentation), ``bad`` is always False. Accepts ``ds[i]`` and the
    ``ds[(epoch, i)]`` form the training loader's sampler uses.
    """

    def __init__(self, features: FeatureSet, standardizer: Standardizer) -> None:
        import torch

        self.features = features
        self._x = torch.from_numpy(np.asarray(standardizer.transform(features.features), dtype=np.float32))
        self._y = torch.from_numpy(features.labels.astype(np.float32))

    def __len__(self) -> int:
        return len(self.features)

    def set_epoch(self, epoch: int) -> None:  # no per-epoch randomness: nothing to do
        pass

    def __getitem__(self, item) -> dict:
        import torch

        index = int(item[1] if isinstance(item, tuple) else item)
        return {
            "image": self._x[index],
            "labels": self._y[index],
            "crop": torch.tensor([-1, -1], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
            "bad": torch.tensor(False),
        }
