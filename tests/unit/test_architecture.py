"""The package's shape, read from its source (the AST of every module under ``fastmlgan/``, not
``sys.modules``): imports go one way with no circle, command-line entry points live in
``fastmlgan/commands/``, no module grows past 700 lines, no private name crosses a module
boundary, and a function-level import is kept for what is optional and heavy.

The import graph counts every import statement, at the top of a module or inside a function (an
import inside a function that closes a circle is still a circle: it only works because it runs
late). An import of ``a.b.c`` also imports the packages ``a.b`` and ``a`` first; that edge is
counted except to a package that already holds the importing module (Python has initialised it
before the module started). Each rule is also run on a small package written to a temporary
folder with the fault planted, so a rule that stopped seeing its fault fails here too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 700
# Optional and heavy: imported where used, so that the package imports without them.
LAZY_PACKAGES = ("nvidia", "triton", "matplotlib", "torch.utils.tensorboard", "tensorboard", "onnx", "onnxruntime",
                 "onnxscript", "timm", "webdataset")
# Modules allowed function-level imports of anything, and why.
LAZY_MODULES = {
    "fastmlgan.commands.cli": "the dispatcher imports a command (and torch) only when that command runs, "
                              "so `fastmlgan --help` and `fastmlgan embedded` stay light",
}
# Single function-level imports of fastmlgan modules allowed, and why.
LAZY_EDGES = {
    ("fastmlgan", "fastmlgan.classifier"): "fastmlgan.load_classifier: `import fastmlgan.x` must not import torch "
                                           "and the model stack through the root package",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (``from a import b``: ``a.b`` when that is a module, else ``a``)
    names: tuple[str, ...]  # the names taken from ``target`` (``from a import b``), () for a module
    line: int
    in_function: bool


def modules(root: Path, package: str = "fastmlgan") -> dict[str, Path]:
    """Module name -> file of every module under ``root/package``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _function_nodes(tree: ast.AST) -> set[int]:
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    inside = _function_nodes(tree)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        in_function = id(node) in inside
        if isinstance(node, ast.Import):
            out += [Import(name, alias.name, (), node.lineno, in_function) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upward
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            plain = []
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # a submodule: an import of that module
                    out.append(Import(name, f"{base}.{alias.name}", (), node.lineno, in_function))
                else:
                    plain.append(alias.name)
            if plain:
                out.append(Import(name, base, tuple(plain), node.lineno, in_function))
    return out


def all_imports(root: Path, package: str = "fastmlgan") -> list[Import]:
    known = modules(root, package)
    return [imp for name, path in known.items() for imp in imports_of(name, path, known)]


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(imports: list[Import], known) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in known}
    for imp in imports:
        if imp.target not in known:
            continue
        graph[imp.module].add(imp.target)
        for package in _ancestors(imp.target):
            # The packages that hold the importing module are initialised before it starts.
            if package in known and package not in _ancestors(imp.module) and package != imp.module:
                graph[imp.module].add(package)
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def circle_problems(root: Path, package: str = "fastmlgan") -> list[str]:
    known = modules(root, package)
    circle = find_circle(import_graph(all_imports(root, package), known))
    return [f"import circle: {' -> '.join(circle)}"] if circle else []


def main_problems(root: Path, package: str = "fastmlgan") -> list[str]:
    problems = []
    commands = f"{package}.commands"
    for name, path in modules(root, package).items():
        if name == commands or name.startswith(commands + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "main":
                problems.append(f"{path.relative_to(root)}:{node.lineno}: def main() outside {package}/commands/")
    return problems


def size_problems(root: Path, package: str = "fastmlgan", limit: int = MAX_LINES) -> list[str]:
    problems = []
    for path in modules(root, package).values():
        lines = len(path.read_text().splitlines())
        if lines > limit:
            problems.append(f"{path.relative_to(root)}: {lines} lines (at most {limit})")
    return problems


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_problems(root: Path, package: str = "fastmlgan") -> list[str]:
    """A ``_name`` imported from another module, or a ``_module`` imported from outside its package."""
    problems = []
    known = modules(root, package)
    for imp in all_imports(root, package):
        where = f"{known[imp.module].relative_to(root)}:{imp.line}"
        for name in imp.names:
            if _private(name) and imp.target.startswith(package):
                problems.append(f"{where}: imports the private {imp.target}.{name}")
        parts = imp.target.split(".")
        for i, part in enumerate(parts):
            owner = ".".join(parts[:i])  # the package the private module belongs to
            if _private(part) and imp.target.startswith(package) and not (imp.module + ".").startswith(owner + "."):
                problems.append(f"{where}: imports the private module {imp.target} from outside {owner}")
    return problems


def lazy_problems(root: Path, package: str = "fastmlgan") -> list[str]:
    problems = []
    known = modules(root, package)
    for imp in all_imports(root, package):
        if not imp.in_function or imp.module in LAZY_MODULES:
            continue
        where = f"{known[imp.module].relative_to(root)}:{imp.line}"
        if imp.target == package or imp.target.startswith(package + "."):
            if (imp.module, imp.target) not in LAZY_EDGES:
                problems.append(f"{where}: function-level import of {imp.target} (import it at the top)")
        elif not any(imp.target == p or imp.target.startswith(p + ".") for p in LAZY_PACKAGES):
            problems.append(f"{where}: function-level import of {imp.target}, not an optional heavy dependency "
                            f"({', '.join(LAZY_PACKAGES)})")
    return problems


# The layers of the README's Layout section, lowest first: a module imports from its own layer or
# below (the longest matching name decides; entry points ``__main__`` sit with the commands).
LAYERS = {
    "fastmlgan": [
        ("", "errors", "safeio", "logs", "environment", "distributed"),
        ("data", "data.types", "data.sources", "data.backends"),  # data.backends: the package (its CHOICES) only
        ("config",),
        ("data.geometry", "data.backends.", "data.imagecache", "data.factory", "data.stream", "data.check"),
        ("models", "kernels", "losses", "metrics", "scoring"),
        ("train",),
        ("classifier", "export"),
        ("reproduce",),
        ("commands", "__main__", "train.__main__", "reproduce.__main__"),
    ],
    "pkg": [("", "errors"), ("data",), ("commands",)],  # the planted-fault package below
}


def layer_of(module: str, package: str) -> int:
    """The layer of ``module``: that of the longest entry naming it or a package holding it (an
    entry ending in ``.`` names only what is under that package)."""
    best, level = -1, -1
    for i, names in enumerate(LAYERS[package]):
        for name in names:
            full = f"{package}.{name}" if name else package
            under = full.endswith(".")
            if (not under and module == full) or module.startswith(full if under else full + "."):
                if len(full) > best:
                    best, level = len(full), i
    return level


def layer_problems(root: Path, package: str = "fastmlgan") -> list[str]:
    problems = []
    known = modules(root, package)
    for imp in all_imports(root, package):
        if imp.target not in known or (imp.module, imp.target) in LAZY_EDGES:
            continue
        here, there = layer_of(imp.module, package), layer_of(imp.target, package)
        if there > here:
            where = f"{known[imp.module].relative_to(root)}:{imp.line}"
            problems.append(f"{where}: {imp.module} (layer {here}) imports {imp.target} (layer {there}), a layer above")
    return problems


def missing_problems(root: Path, package: str = "fastmlgan") -> list[str]:
    """An import of a module of the package that does not exist in it (one left behind by a
    move, which an older install of the package on ``sys.path`` could still satisfy)."""
    known = modules(root, package)
    return [
        f"{known[imp.module].relative_to(root)}:{imp.line}: imports {imp.target}, which is not a module of {package}/"
        for imp in all_imports(root, package)
        if (imp.target == package or imp.target.startswith(package + ".")) and imp.target not in known
    ]


RULES = {
    "missing": missing_problems,
    "circle": circle_problems,
    "layers": layer_problems,
    "main": main_problems,
    "size": size_problems,
    "private": private_problems,
    "lazy": lazy_problems,
}


@pytest.mark.parametrize("rule", list(RULES))
def test_the_package_keeps_the_rule(rule):
    problems = RULES[rule](REPO)
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------
# Each rule sees its fault when it is planted.

_CLEAN = {
    "__init__.py": "",
    "errors.py": "class Error(Exception):\n    pass\n",
    "data/__init__.py": "",
    "data/reader.py": "from pkg.errors import Error\n\n\ndef read():\n    raise Error\n",
    "data/factory.py": "import numpy as np\n\nfrom pkg.data.reader import read\n\n\ndef build():\n"
                       "    import matplotlib  # optional and heavy\n\n    return np, read, matplotlib\n",
    "commands/__init__.py": "",
    "commands/run.py": "from pkg.data.factory import build\n\n\ndef main():\n    return build()\n",
}
_FAULTS = {
    # a circle that works only because one import sits in a function
    "circle": ("data/reader.py", "\n\ndef late():\n    from pkg.data.factory import build\n\n    return build\n"),
    "missing": ("commands/run.py", "\nfrom pkg.loaders.reader import read  # noqa\n"),
    "layers": ("errors.py", "\nimport pkg.data  # noqa\n"),
    "main": ("data/factory.py", "\n\ndef main():\n    return 0\n"),
    "size": ("errors.py", "\n" * MAX_LINES),
    "private": ("commands/run.py", "\nfrom pkg.data.reader import _helper  # noqa\n"),
    "lazy": ("commands/run.py", "\n\ndef other():\n    import json\n\n    return json\n"),
}


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("rule", list(RULES))
def test_a_planted_fault_is_found(tmp_path, rule):
    _write(tmp_path, _CLEAN)
    for other in RULES:
        assert not RULES[other](tmp_path, "pkg"), f"{other} on the clean package"
    rel, extra = _FAULTS[rule]
    _write(tmp_path, {rel: _CLEAN[rel] + extra})
    problems = RULES[rule](tmp_path, "pkg")
    assert len(problems) == 1, problems
    if rule == "circle":
        assert problems[0] == "import circle: pkg.data.factory -> pkg.data.reader -> pkg.data.factory"


def test_a_package_that_imports_its_importer_is_a_circle(tmp_path):
    """``a/__init__`` importing ``b``, whose module imports a submodule of ``a``: importing ``b``
    first fails at run time (``a`` runs its ``__init__`` while ``b`` is half made)."""
    _write(tmp_path, {"__init__.py": "", "a/__init__.py": "from pkg.b import thing\n", "a/leaf.py": "X = 1\n",
                      "b.py": "from pkg.a.leaf import X\n\nthing = X\n"})
    assert circle_problems(tmp_path, "pkg") == ["import circle: pkg.a -> pkg.b -> pkg.a"]
    # A package's own modules importing each other through it is not a circle.
    _write(tmp_path, {"a/__init__.py": "from pkg.a.leaf import X\n", "b.py": "thing = 1\n"})
    assert circle_problems(tmp_path, "pkg") == []


# ----------------------------------------------------------------------------------------------
# The tables: one source of truth each.


def test_the_sources_table_is_what_config_accepts():
    from fastmlgan.config import DataConfig
    from fastmlgan.data.sources import SOURCES
    from fastmlgan.errors import ConfigError

    for kind, source in SOURCES.items():
        assert source.kind == kind
    with pytest.raises(ConfigError, match=", ".join(SOURCES)):
        DataConfig(dataset="nosuchkind")


def test_every_backend_choice_has_its_builders():
    from fastmlgan.data.backends import CHOICES
    from fastmlgan.data.factory import BACKENDS

    assert set(BACKENDS) == set(CHOICES) - {"auto"} | {"features", "shards"}  # the loaders sources pick


# ----------------------------------------------------------------------------------------------
# What a run writes names no fastmlgan module, so files written before a move still load.


def pickled_globals(path: Path) -> set[str]:
    """``module.name`` of every class or function a torch checkpoint's pickle refers to."""
    import io
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
    return found


def test_a_checkpoint_pickles_no_fastmlgan_class(tmp_path_factory, tmp_path):
    """Checkpoints are read with ``torch.load(weights_only=True)`` and hold plain containers and
    tensors only: no class path of this package, so moving a module never breaks an old run. A
    planted fastmlgan object in a saved state is seen."""
    import torch
    from trained_model import smoke_run

    from fastmlgan.data.imagecache.format import Geometry

    run = smoke_run(tmp_path_factory)
    for name in ("last.pt", "baseline.pt"):
        names = pickled_globals(run / "checkpoints" / name)
        assert names and not [n for n in names if n.startswith("fastmlgan")], names
    torch.save({"geometry": Geometry("train", 32)}, tmp_path / "planted.pt")
    assert "fastmlgan.data.imagecache.format.Geometry" in pickled_globals(tmp_path / "planted.pt")


def test_datasets_generated_before_the_move_are_reused(tmp_path, caplog):
    """The embedded set's dataset.json names its generator by the module's old name; ``ensure``
    regenerates a folder whose manifest differs, so the name stays what existing folders hold."""
    import json
    import logging

    from fastmlgan.data.sources.embedded import ensure

    params = dict(num_train=3, num_val=2, image_size=16, seed=0)
    ensure(tmp_path, **params)
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["generator"] == "fastmlgan.loaders.embedded" and manifest["generator_version"] == 1
    with caplog.at_level(logging.INFO, logger="fastmlgan.data.sources.embedded"):
        ensure(tmp_path, **params)
    assert "reusing embedded dataset" in caplog.text


def test_every_command_of_the_dispatcher_is_a_commands_module_with_a_main():
    """The dispatcher imports its commands by name (so that ``fastmlgan --help`` stays light),
    out of the import graph's sight: each name must be a module of ``fastmlgan/commands/``."""
    from fastmlgan.commands.cli import COMMANDS

    known = modules(REPO)
    for command, (module, _) in COMMANDS.items():
        if not module:  # bench: the scripts of a source checkout
            continue
        assert module.startswith("fastmlgan.commands.") and module in known, (command, module)
        tree = ast.parse(known[module].read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), module
    assert {"train", "evaluate", "predict", "export", "check", "cache", "embedded", "metrics", "reproduce",
            "sweep"} <= set(COMMANDS)
