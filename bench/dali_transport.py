"""Carry NVIDIA DALI to a GPU machine that cannot reach a package index, in parts small enough for
one transfer each.

    python bench/dali_transport.py pack [--python 3.12] [--part-mib 55] [--out .dali]
        # here (online): download the DALI wheels for that Python, keep only what it needs,
        # compress (xz -9e), split into .dali/p0/part, .dali/p1/part, ... (one folder per transfer)
    python bench/dali_transport.py install [--src .dali]
        # there: join the parts, check the sha256, unpack into .dali/site; prints the folder to put
        # on PYTHONPATH (bench/gpu_check.sh does this by itself when .dali/ holds the parts)

DALI for CUDA 13 is three wheels (nvidia-dali-cuda130, nvidia-nvimgcodec-cu13,
nvidia-libnvcomp-cu13), about 250 MB compressed and 570 MB unpacked. They carry extension modules
for every CPython from 3.9 to 3.15; only the target's are kept, and nvcomp's command-line tool and
headers are dropped. xz rather than zstd: Python's own ``lzma`` unpacks it, so the GPU machine
needs no zstd binary. The manifest (``.dali/manifest.json``, carried with the first part) lists the
parts with their sizes and the archive's sha256.
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

WHEELS = ("nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-libnvcomp-cu13")
DROP = ("nvidia/libnvcomp/bin/", "nvidia/libnvcomp/include/", "nvidia/nvimgcodec/include/")


def keep(name: str, python_tag: str) -> bool:
    """Whether a wheel member is needed on CPython ``python_tag`` (e.g. ``312``)."""
    if name.startswith(DROP) or ".dist-info/RECORD" in name:
        return False
    if ".cpython-" in name:
        return f".cpython-{python_tag}-" in name  # not 312t (free-threaded), not other versions
    return True


def pack(args) -> int:
    out = Path(args.out)
    tag = args.python.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", args.python,
               "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64", "-d", tmp, *WHEELS]
        subprocess.run(cmd, check=True)
        buffer = io.BytesIO()
        kept = dropped = 0
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for wheel in sorted(Path(tmp).glob("*.whl")):
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
    digest = hashlib.sha256(archive).hexdigest()
    if out.exists():
        shutil.rmtree(out)
    part_bytes = args.part_mib * 2**20
    parts = []
    for i in range(0, len(archive), part_bytes):
        folder = out / f"p{len(parts)}"
        folder.mkdir(parents=True)
        (folder / "part").write_bytes(archive[i : i + part_bytes])
        parts.append({"folder": folder.name, "bytes": len(archive[i : i + part_bytes])})
    manifest = {"python": args.python, "wheels": list(WHEELS), "sha256": digest, "bytes": len(archive), "parts": parts}
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
    print(os.fspath(site.resolve()))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--python", default="3.12")
    a.add_argument("--part-mib", type=int, default=55)
    a.add_argument("--out", default=".dali")
    b = sub.add_parser("install")
    b.add_argument("--src", default=".dali")
    args = p.parse_args(argv)
    return pack(args) if args.command == "pack" else install(args)


if __name__ == "__main__":
    raise SystemExit(main())
