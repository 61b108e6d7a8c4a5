"""Two gloo ranks with D wrapped in DistributedDataParallel: the gradient penalty's D-parameter
gradients after backward equal one process's on the concatenated batch (the mean over ranks of
per-shard means is the full-batch mean when the shards are equal).

The ranks are spawned processes (fresh interpreters), so the Triton path runs there through
TRITON_INTERPRET=1 whatever this process imported first.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kernel_helpers import penalty_epsilon
from torch.nn.parallel import DistributedDataParallel

from fastmlgan.kernels import _dispatch
from fastmlgan.kernels.gradient_penalty import gradient_penalty, gradient_penalty_autograd
from fastmlgan.models.discriminator import Discriminator

WORLD_SIZE = 2
SHARD = 6  # samples per rank
NUM_LABELS, FEATURE_DIM = 7, 11


def _discriminator() -> Discriminator:
    torch.manual_seed(0)
    d = Discriminator(NUM_LABELS, FEATURE_DIM, proj_dim=8, hidden_dim=16, num_layers=3)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0.0, 0.5)
    return d


def _full_batch():
    gen = torch.Generator().manual_seed(1)
    n = WORLD_SIZE * SHARD
    real = (torch.rand(n, NUM_LABELS, generator=gen) < 0.3).float()
    fake = torch.rand(n, NUM_LABELS, generator=gen)
    features = torch.randn(n, FEATURE_DIM, generator=gen)
    return real, fake, real.roll(1, dims=0), features


def d_loss(discriminator, real, fake, mismatched, features, penalty):
    """Eq. (4) with λ = 10; ``penalty`` is the already computed L_gp."""
    scores = discriminator(torch.cat([real, fake, mismatched]), torch.cat([features] * 3))
    matched, generated, negative = scores.split(real.shape[0])
    return -matched.mean() + 0.5 * generated.mean() + 0.5 * negative.mean() + 10.0 * penalty


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        ddp = DistributedDataParallel(_discriminator())
        shard = slice(rank * SHARD, (rank + 1) * SHARD)
        real, fake, mismatched, features = (t[shard] for t in _full_batch())
        epsilon = penalty_epsilon(SHARD, 100 + rank, "cpu")

        # (1) The penalty alone, ε drawn from this rank's generator (in-kernel on the Triton path). DDP all-reduces only
        # once its forward has armed the reducer and every parameter has received a gradient; a
        # zero-weighted D term does both (the full D loss below does it for real).
        gp = gradient_penalty(ddp, real, fake, features, generator=torch.Generator().manual_seed(100 + rank))
        (gp + 0.0 * ddp(real, features).sum()).backward()
        penalty_grads = [p.grad.clone() for p in ddp.parameters()]

        # (2) The whole D loss of eq. (4), as the trainer runs it.
        ddp.zero_grad(set_to_none=True)
        d_loss(
            ddp, real, fake, mismatched, features, gradient_penalty(ddp, real, fake, features, epsilon=epsilon)
        ).backward()
        loss_grads = [p.grad.clone() for p in ddp.parameters()]
        torch.save(
            {"epsilon": epsilon, "penalty": penalty_grads, "loss": loss_grads}, os.path.join(out_dir, f"rank{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_penalty_gradients_under_ddp_equal_full_batch(tmp_path, monkeypatch, backend):
    monkeypatch.setenv(_dispatch.ENV_VAR, backend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned ranks' fresh triton import
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    d = _discriminator()
    names = [n for n, _ in d.named_parameters()]
    params = list(d.parameters())
    real, fake, mismatched, features = _full_batch()
    epsilon = torch.cat([r["epsilon"] for r in ranks])
    assert not torch.equal(ranks[0]["epsilon"], ranks[1]["epsilon"])

    def grads(loss):
        got = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]

    # The single-process reference is the textbook double backward on the whole batch.
    expected = {
        "penalty": grads(gradient_penalty_autograd(d, real, fake, features, epsilon)),
        "loss": grads(
            d_loss(d, real, fake, mismatched, features, gradient_penalty_autograd(d, real, fake, features, epsilon))
        ),
    }
    for kind, want in expected.items():
        for name, w, g0, g1 in zip(names, want, ranks[0][kind], ranks[1][kind]):
            assert torch.equal(g0, g1), f"{kind} {name}: ranks disagree after all-reduce"
            torch.testing.assert_close(g0, w, rtol=1e-5, atol=1e-6, msg=lambda m, n=name, k=kind: f"{k} {n}: {m}")
    # The penalty really moves the weights (the comparison above is not between zeros).
    assert expected["penalty"][names.index("body.0.weight")].abs().max() > 1e-3
