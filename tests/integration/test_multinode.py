"""The multi-node examples (issue 10, item 8): the launch each builds, checked with torchrun's own
argument parser and fastmlgan's, and the SLURM script run for real as two "nodes" on this machine."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed.run as torchrun
from extras import import_extra

from fastmlgan.config import parse_args

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "slurm" / "train.sbatch"
PYTORCHJOB = REPO / "examples" / "kubernetes" / "pytorchjob.yaml"


def fake_bin(tmp_path: Path, srun_body: str, hosts: str) -> Path:
    """``srun``, ``scontrol`` and ``torchrun`` stand-ins on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "scontrol": f'[ "$1 $2" = "show hostnames" ] || exit 9\nprintf "{hosts}"\n',
        "srun": srun_body,
        "torchrun": f'exec {shlex.quote(sys.executable)} -m torch.distributed.run "$@"\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def sbatch_directives() -> dict[str, str]:
    out = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            out[key] = value
    return out


def test_slurm_script_launch(tmp_path):
    record = tmp_path / "srun.args"
    # srun records its arguments, one per line, instead of starting anything.
    bin_dir = fake_bin(tmp_path, f'printf "%s\\n" "$@" > {shlex.quote(str(record))}\n', "node017\\nnode018\\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[017-018]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242"}
    for name in ("GPUS_PER_NODE", "DATA", "RUNS", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(["bash", str(SBATCH), "--train.gan_epochs", "3"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    srun_args = record.read_text().splitlines()
    assert srun_args[:2] == ["--kill-on-bad-exit=1", "torchrun"]

    args = torchrun.get_args_parser().parse_args(srun_args[2:])
    directives = sbatch_directives()
    # One torchrun per node (srun --ntasks-per-node=1), one worker per GPU of the node.
    assert directives["--ntasks-per-node"] == "1"
    assert args.nnodes == "2" and directives["--nodes"] == "2"
    assert args.nproc_per_node == "8" == directives["--gpus-per-node"]
    # c10d rendezvous hosted on the first node of the allocation, port 29500, the job id as its id.
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "node017:29500", "4242")
    assert not args.standalone and args.module and args.training_script == "fastmlgan.train"
    cfg = parse_args(args.training_script_args)
    assert cfg.preset == "paper-coco-resnet101" and cfg.model.backbone == "resnet101"
    assert cfg.data.train_annotations == "/shared/coco/annotations/instances_train2014.json"
    assert cfg.out == "/shared/runs/coco-resnet101-4242"
    assert cfg.train.gan_epochs == 3  # the sbatch arguments reach fastmlgan.train


@pytest.mark.slow
def test_slurm_script_runs_two_nodes(tmp_path):
    # srun starts the command twice on this machine, as on two nodes; both torchruns meet in the
    # c10d rendezvous on localhost, and the two ranks train the smoke preset over gloo.
    srun = 'while [[ "$1" == -* ]]; do shift; done  # its own options\n"$@" & "$@" &\n' \
        'fail=0\nfor job in $(jobs -p); do wait "$job" || fail=1; done\nexit $fail\n'
    bin_dir = fake_bin(tmp_path, srun, "localhost\\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "GPUS_PER_NODE": "1", "MASTER_PORT": str(port),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    extra = ["--preset", "smoke", "--data.root", str(tmp_path / "data"), "--train.bce_epochs", "1",
             "--train.gan_epochs", "1", "--train.max_steps_per_epoch", "2", "--log.plots", "false", "--out", str(run)]
    done = subprocess.run(["bash", str(SBATCH), *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((run / "config.json").read_text())["run"]
    assert (record["world_size"], record["num_nodes"]) == (2, 2)
    assert json.loads((run / "metrics.json").read_text())["gan"]["num_images"] == 128


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) substitution in a container's command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def test_pytorchjob_launch():
    yaml = import_extra("dev", "yaml")
    job = yaml.safe_load(PYTORCHJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    name = job["metadata"]["name"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    num_pods = sum(r["replicas"] for r in replicas.values())
    # The training operator's environment: MASTER_ADDR is the Master pod's service.
    operator_env = {"MASTER_ADDR": f"{name}-master-0", "MASTER_PORT": "23456"}
    commands = []
    for kind, spec in replicas.items():
        # A restarted pod would find the run directory non-empty and be refused: resubmit with --resume.
        assert spec["restartPolicy"] == "Never", kind
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        command = [k8s_expand(part, operator_env) for part in container["command"]]
        commands.append(command)
        assert command[0] == "torchrun"
        args = torchrun.get_args_parser().parse_args(command[1:])
        assert args.nnodes == str(num_pods)
        assert args.nproc_per_node == str(container["resources"]["limits"]["nvidia.com/gpu"])
        assert (args.rdzv_backend, args.rdzv_endpoint) == ("c10d", f"{name}-master-0:23456")
        assert args.rdzv_id == name and args.module and args.training_script == "fastmlgan.train"
        cfg = parse_args(args.training_script_args)
        assert cfg.preset == "paper-coco-resnet101" and cfg.data.dataset == "coco"
        # Data and the run directory on the shared volume claim every pod mounts.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for path in (cfg.out, cfg.data.train_images, cfg.data.val_annotations):
            mount = next((m for m in mounts if path.startswith(m.rstrip("/") + "/")), None)
            assert mount is not None and mounts[mount] in claims, path
    assert commands[0] == commands[1]  # every pod runs the same launch
