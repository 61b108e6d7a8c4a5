"""Install metadata, the Makefile, the Docker image's files and the README's docker lines (issue 10,
items 6 and 7). No docker engine here: the Dockerfile is checked as text (and linted with hadolint
where it is installed)."""

from __future__ import annotations

import ast
import fnmatch
import itertools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastmlgan.commands import cli

REPO = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement_names(requirements: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {Requirement(r).name.lower() for r in requirements}


def test_pep621_metadata(project):
    import fastmlgan

    assert project["name"] == "fastmlgan" and project["requires-python"] == ">=3.10"
    # The version has one source: fastmlgan.__version__, read by setuptools without importing.
    assert project["dynamic"] == ["version"]
    dynamic = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "fastmlgan.__version__"}
    tree = ast.parse((REPO / "fastmlgan" / "__init__.py").read_text())
    literal = [n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"]
    assert literal == [fastmlgan.__version__]
    assert {"torch", "torchvision", "numpy", "pillow", "safetensors"} <= requirement_names(project["dependencies"])


def test_extras(project):
    extras = project["optional-dependencies"]
    assert requirement_names(extras["plots"]) == {"matplotlib"}
    assert requirement_names(extras["tb"]) == {"tensorboard"}
    assert requirement_names(extras["shards"]) == {"webdataset"}
    assert requirement_names(extras["timm"]) == {"timm"}
    assert {"pytest", "hypothesis", "liac-arff", "pyyaml"} <= requirement_names(extras["dev"])
    assert "matplotlib" not in requirement_names(extras["dev"])


@pytest.mark.parametrize(
    "system, machine, installs",
    [("Linux", "x86_64", True), ("Linux", "aarch64", True), ("Darwin", "arm64", False), ("Darwin", "x86_64", False),
     ("Windows", "AMD64", False)],
)
def test_dali_extra_only_where_dali_ships_wheels(project, system, machine, installs):
    from packaging.requirements import Requirement

    (dali,) = [Requirement(r) for r in project["optional-dependencies"]["dali"]]
    assert dali.name.startswith("nvidia-dali")
    environment = {"platform_system": system, "platform_machine": machine, "sys_platform": system.lower()}
    assert dali.marker is not None and dali.marker.evaluate(environment) is installs


def test_console_scripts(project):
    import importlib

    scripts = project["scripts"]
    assert scripts["fastmlgan"] == "fastmlgan.commands.cli:entry"
    for target in scripts.values():  # the old entry points stay
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    assert {"fastmlgan-train", "fastmlgan-evaluate"} <= set(scripts)


def test_setup_py_is_a_shim():
    tree = ast.parse((REPO / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert len(calls) == 1 and calls[0].func.id == "setup" and not calls[0].args and not calls[0].keywords


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("system, extras", [("Linux", "dev,plots,tb,shards,timm,dali"), ("Darwin", "dev,plots,tb,shards,timm")])
def test_makefile_extras_follow_the_platform(tmp_path, system, extras):
    done = subprocess.run(["make", "-n", "install", f"UNAME_S={system}", f"VENV={tmp_path / 'venv'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    installs = [line for line in done.stdout.splitlines() if "pip install" in line and "-e" in line]
    assert installs == [f"{tmp_path / 'venv'}/bin/python -m pip install -q -e '.[{extras}]'"]


def test_makefile_names_no_package_index_and_trains_with_the_command():
    makefile = (REPO / "Makefile").read_text()
    assert "://" not in makefile and "index-url" not in makefile
    assert "$(PY) -m fastmlgan train $(ARGS)" in makefile


def test_ci_runs_the_tests_the_fault_runs_then_the_dockerfile_lint():
    lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-5:] == ["make test", "make test-slow", "make gpu-check-dry", "make test-faults", "make docker-lint"]


def _stage_selections() -> dict[str, str]:
    """The ``-m`` expression of each pytest stage in the Makefile."""
    makefile = (REPO / "Makefile").read_text()
    stages = {}
    for target in ("test", "test-slow", "test-faults"):
        recipe = re.search(rf"^{target}: .*\n\t(.*)$", makefile, re.M)
        assert recipe is not None, target
        selection = re.search(r'-m pytest .*?-m (?:"([^"]+)"|(\w+))', recipe.group(1))
        assert selection is not None, target
        stages[target] = selection.group(1) or selection.group(2)
    return stages


def test_every_test_runs_in_one_ci_stage():
    """make test + make test-slow + make test-faults (all three in .ci/run) leave no test out,
    whatever its markers (gpu tests skip themselves on CPU): a marker combination no stage
    selects would be a test CI never runs."""
    stages = _stage_selections()
    markers = ("slow", "benchmark", "faults", "gpu", "realdata")
    for combo in itertools.product((False, True), repeat=len(markers)):
        env = dict(zip(markers, combo))
        chosen = [name for name, expr in stages.items() if eval(expr, {}, env)]  # and/or/not only
        assert chosen, f"no stage runs a test marked {[m for m, on in env.items() if on]}"


# ---------------------------------------------------------------- Docker


def dockerfile() -> str:
    return (REPO / "Dockerfile.cuda").read_text()


def base_image() -> str:
    (tag,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile(), re.M)
    return tag


def test_dockerfile_base_entrypoint_and_contents():
    text = dockerfile()
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base_image())
    assert "FROM ${BASE_IMAGE}" in text
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[-2:] == ['ENTRYPOINT ["fastmlgan"]', 'CMD ["--help"]']
    copied = {line.split()[1] for line in instructions if line.startswith("COPY ")}
    assert {"fastmlgan", "bench", "tests"} <= copied
    workdirs = [line.split()[1] for line in instructions if line.startswith("WORKDIR ")]
    assert workdirs[-1] == "/workspace"  # runs/ and data/ land where the README mounts volumes
    assert "--no-deps -e ." in text  # never replace the base image's torch


def test_readme_names_the_base_image_and_its_torch():
    readme = (REPO / "README.md").read_text()
    tag = base_image()
    assert tag in readme
    torch_line = re.search(rf"{re.escape(tag)}.*?PyTorch (2\.\d+\.\w+)", readme, re.S)
    assert torch_line and torch_line.group(1).startswith("2.14")  # the series `make test` tests


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether docker leaves ``path`` (or a folder above it) out of the build context."""
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pattern in patterns:
            if fnmatch.fnmatch(prefix, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pattern[3:])):
                return True
    return False


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = dockerignore_patterns()
    for heavy in (".venv", "runs", "data", ".git", "fastmlgan/__pycache__/x.pyc", ".pytest_cache", "bench/results/x.json"):
        assert ignored(heavy, patterns), heavy
    for needed in ("fastmlgan/commands/cli.py", "tests/conftest.py", "bench/gpu_check.sh", "pyproject.toml", "README.md"):
        assert not ignored(needed, patterns), needed


def test_gpu_check_runs_inside_the_image_unchanged():
    script = (REPO / "bench" / "gpu_check.sh").read_text().split("\n", 1)[1]  # after the #! line
    # `prepare` runs in a development checkout before the call (it copies ../shared/data's JPEGs
    # into .gpu-check/, which travels): the rest of the script is what runs inside the image.
    prepare = re.search(r"\nprepare\(\) \{\n.*?\n\}\n", script, re.S)
    assert prepare is not None and "../shared/data/coco128" in prepare.group(0)
    script = script.replace(prepare.group(0), "\n")
    script = "\n".join(line for line in script.splitlines() if not line.startswith("#"))
    text = dockerfile()
    patterns = dockerignore_patterns()
    referenced = sorted(set(re.findall(r"\b((?:tests|bench)/[\w./-]+\.(?:py|sh))\b", script)))
    assert "tests/unit/data/backends/test_dali.py" in referenced and "bench/loader.py" in referenced
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ")}
    for path in referenced:
        assert (REPO / path).is_file(), path
        assert path.split("/")[0] in copied and not ignored(path, patterns), path
    # Nothing from outside the repository: no parent folders, no absolute paths but /tmp.
    assert "../" not in script.replace('"$(dirname "$0")/.."', "")
    assert set(re.findall(r"(?<![\w$.])/(?!tmp\b|dev/null\b)[a-z]+/", script)) == set()
    # The interpreter falls back from .venv/bin/python (absent in the image) to python3.
    assert 'if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi' in script


def hadolint() -> str | None:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.is_file() else shutil.which("hadolint")


def test_hadolint():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (the dev extra installs it where a wheel exists)")
    done = subprocess.run([binary, "Dockerfile.cuda"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- the README's docker lines


def readme_commands(prefix: str) -> list[list[str]]:
    """The README's shell commands starting with ``prefix``, continuation lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.strip(), comments=True) for line in text.splitlines() if line.strip().startswith(prefix)]


DOCKER_VALUE_OPTIONS = {"-v", "--volume", "-e", "--env", "--entrypoint", "--gpus", "-w", "--shm-size", "--name", "-u", "--user"}


def docker_run_parts(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(docker options, image, the command and its arguments) of ``docker run ...``."""
    assert argv[:2] == ["docker", "run"]
    i, options = 2, []
    while argv[i].startswith("-"):
        options.append(argv[i])
        if argv[i] in DOCKER_VALUE_OPTIONS:
            options.append(argv[i + 1])
            i += 1
        i += 1
    return options, argv[i], argv[i + 1:]


def test_readme_docker_run_shows_every_subcommand_with_volumes():
    runs = [docker_run_parts(argv) for argv in readme_commands("docker run")]
    shown = set()
    for options, image, command in runs:
        assert image == "fastmlgan", image
        mounts = [options[i + 1] for i, o in enumerate(options) if o in ("-v", "--volume")]
        assert mounts, (options, command)  # results (and data) live outside the container
        if "--entrypoint" not in options:
            shown.add(command[0])
    assert shown >= set(cli.COMMANDS), set(cli.COMMANDS) - shown
    # Training writes under /workspace/runs, which a volume keeps.
    train = [(o, c) for o, _, c in runs if c and c[0] == "train"]
    assert train and all(any(v.endswith(":/workspace/runs") for v in o) for o, _ in train)
