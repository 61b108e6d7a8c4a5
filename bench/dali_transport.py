"""Carry NVIDIA DALI to a GPU machine that cannot reach a package index, in parts small enough for
one transfer each.

    python bench/dali_transport.py pack [--python 3.12] [--part-mib 55] [--out .dali]
        # here (online): download the DALI wheels for that Python, keep only what it needs,
        # compress (xz -9e), split into .dali/p0/part, .dali/p1/part, ... (one folder per transfer)
    python bench/dali_transport.py install [--src .dali]
        # there: join the parts, check the sha256, unpack into .dali/site, drop what the machine's
        # Python already has; prints the folder to add to the END of PYTHONPATH (bench/gpu_check.sh
        # does this by itself when .dali/ holds the parts)
    python bench/dali_transport.py pack --site DIR [--out .dali]
        # pack a folder laid out like site-packages instead of downloading (the GPU check's CPU
        # dry run carries a probe package through the same parts, join and unpack)

DALI for CUDA 13 is nvidia-dali-cuda130 with its dependencies as pip resolves them for the target
Python (nvimgcodec and its nvjpeg/nvjpeg2k/nvtiff codecs, the nvcomp version DALI pins, and small
Python packages: optree, libcst, gast, ...), about 270 MB of wheels. Packages the GPU machine's
torch environment already has (``--exclude``: numpy, typing_extensions) are left out. The DALI and
nvimgcodec wheels carry extension modules for every CPython from 3.9 to 3.15; only the target's are
kept, and command-line tools and headers are dropped. xz rather than zstd: Python's own ``lzma``
unpacks it, so the GPU machine needs no zstd binary. The manifest (``p0/manifest.json``, carried
with the first part) lists the parts with their sizes and the archive's sha256.

Never shadow the machine: every entry on PYTHONPATH comes before site-packages, so a carried
``packaging``, ``six`` or ``yaml`` would replace the machine's own (DALI's resolution pulls them
in). ``install`` therefore removes every top-level module the installing Python can already import
and every distribution's metadata it already has; ``nvidia`` stays (a namespace package: DALI,
nvimgcodec and nvcomp live in it beside the machine's CUDA libraries).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "nvidia-dali-cuda130"
DROP = ("nvidia/libnvcomp/bin/", "nvidia/libnvcomp/include/", "nvidia/nvimgcodec/include/", "bin/")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")


def keep(name: str, python_tag: str) -> bool:
    """Whether a wheel member is needed on CPython ``python_tag`` (e.g. ``312``)."""
    if name.startswith(DROP) or ".dist-info/RECORD" in name:
        return False
    if ".cpython-" in name:
        return f".cpython-{python_tag}-" in name  # not 312t (free-threaded), not other versions
    return True


def _site_archive(site: Path) -> bytes:
    """A folder laid out like site-packages, as the xz'd tar that ``install`` unpacks."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(site.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(site).as_posix())
    return lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME)


def pack(args) -> int:
    out = Path(args.out)
    tag = args.python.replace(".", "")
    if args.site:
        site = Path(args.site)
        if not site.is_dir():
            print(f"pack --site: {site} is not a folder", file=sys.stderr)
            return 2
        return _write_parts(out, _site_archive(site), args.part_mib, {"python": args.python, "wheels": [], "site": str(site)})
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", args.python,
               "--implementation", "cp", "--abi", f"cp{tag}", *[a for p in PLATFORMS for a in ("--platform", p)],
               "-d", tmp, PACKAGE]
        subprocess.run(cmd, check=True)
        excluded = {name.lower().replace("-", "_") for name in args.exclude.split(",") if name}
        wheels = [w for w in sorted(Path(tmp).glob("*.whl")) if w.name.split("-")[0].lower() not in excluded]
        print("packing", ", ".join(w.name.split("-")[0] for w in wheels))
        buffer = io.BytesIO()
        kept = dropped = 0
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as z:
                    for info in z.infolist():
                        if info.is_dir():
                            continue
                        if not keep(info.filename, tag):
                            dropped += info.file_size
                            continue
                        data = z.read(info)
                        member = tarfile.TarInfo(info.filename)
                        member.size = len(data)
                        member.mode = 0o755 if info.filename.endswith(".so") or ".so." in info.filename else 0o644
                        tar.addfile(member, io.BytesIO(data))
                        kept += len(data)
        print(f"kept {kept / 2**20:.0f} MiB, dropped {dropped / 2**20:.0f} MiB (other Pythons, tools, headers)")
        archive = lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME)
    return _write_parts(out, archive, args.part_mib, {"python": args.python, "wheels": [w.name for w in wheels]})


def _write_parts(out: Path, archive: bytes, part_mib: int, about: dict) -> int:
    digest = hashlib.sha256(archive).hexdigest()
    if out.exists():
        shutil.rmtree(out)
    part_bytes = part_mib * 2**20
    parts = []
    for i in range(0, len(archive), part_bytes):
        folder = out / f"p{len(parts)}"
        folder.mkdir(parents=True)
        (folder / "part").write_bytes(archive[i : i + part_bytes])
        parts.append({"folder": folder.name, "bytes": len(archive[i : i + part_bytes])})
    manifest = {**about, "sha256": digest, "bytes": len(archive), "parts": parts}
    (out / "p0" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(archive) / 2**20:.1f} MiB in {len(parts)} parts under {out}/p*/ (carry one folder per transfer)")
    return 0


def install(args) -> int:
    src = Path(args.src)
    manifest_file = src / "p0" / "manifest.json"
    if not manifest_file.is_file():
        print(f"no DALI parts: {manifest_file} is missing (run 'pack' first and carry {src}/p0 ...)", file=sys.stderr)
        return 2
    manifest = json.loads(manifest_file.read_text())
    missing = [p["folder"] for p in manifest["parts"] if not (src / p["folder"] / "part").is_file()]
    if missing:
        print(f"DALI parts missing under {src}: {', '.join(missing)}", file=sys.stderr)
        return 2
    archive = b"".join((src / p["folder"] / "part").read_bytes() for p in manifest["parts"])
    if hashlib.sha256(archive).hexdigest() != manifest["sha256"]:
        print(f"DALI parts under {src} do not match their manifest's sha256 (a part is damaged or from another pack)",
              file=sys.stderr)
        return 2
    site = src / "site"
    if site.exists():
        shutil.rmtree(site)
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(archive)), mode="r") as tar:
        tar.extractall(site, filter="data")
    dropped = drop_shadowing(site)
    if dropped:
        print(f"left out (this Python has them already): {', '.join(dropped)}", file=sys.stderr)
    print(os.fspath(site.resolve()))
    return 0


def _dist_name(info: Path) -> str:
    return info.name[: -len(".dist-info")].rsplit("-", 1)[0]


def drop_shadowing(site: Path) -> list[str]:
    """Remove from ``site`` what this Python can already import or has installed (see the module
    docstring); returns the names removed. Must run before ``site`` is on ``sys.path``."""
    import importlib.metadata
    import importlib.util

    resolved = site.resolve()
    dropped = []
    for info in sorted(site.glob("*.dist-info")):
        try:
            importlib.metadata.distribution(_dist_name(info))
        except importlib.metadata.PackageNotFoundError:
            continue
        shutil.rmtree(info)
        dropped.append(info.name)
    for entry in sorted(site.iterdir()):
        if entry.name.endswith(".dist-info") or entry.name == "nvidia":
            continue
        name = entry.name.split(".", 1)[0] if entry.is_file() else entry.name
        if not name.isidentifier():
            continue
        spec = importlib.util.find_spec(name)
        origin = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
        if spec is None or (origin and Path(origin).resolve().is_relative_to(resolved)):
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        dropped.append(entry.name)
    return dropped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--python", default="3.12")
    a.add_argument("--part-mib", type=int, default=55)
    a.add_argument("--out", default=".dali")
    a.add_argument("--site", default="", help="pack this folder (laid out like site-packages) instead of downloading")
    a.add_argument("--exclude", default="numpy,typing_extensions",
                   help="comma-separated packages the GPU machine already has (left out of the pack)")
    b = sub.add_parser("install")
    b.add_argument("--src", default=".dali")
    args = p.parse_args(argv)
    return pack(args) if args.command == "pack" else install(args)


if __name__ == "__main__":
    raise SystemExit(main())
