"""Phase 2 at full batch efficiency: one loader batch per iteration, f_ext and G's no-grad forward
run once per iteration, and the result equal to the paper's procedure run one D update at a time."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fastmlgan.config import build_config
from fastmlgan.data.stream import BatchStream, IterationLayout
from fastmlgan.distributed import DistInfo
from fastmlgan.losses import GanSpec, discriminator_loss_from_images, generator_loss_from_images
from fastmlgan.models import build_generator
from fastmlgan.models.chunked_norm import batch_norm_chunks, make_chunkable
from fastmlgan.scoring import generator_scores
from fastmlgan.train.trainer import Trainer

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    from fastmlgan.data.sources import embedded

    root = tmp_path_factory.mktemp("phase2") / "embedded"
    embedded.ensure(root, num_train=256, num_val=64, image_size=40, seed=0)
    return root


def _trainer(root, tmp_path, **overrides) -> Trainer:
    cfg = build_config({"data.root": str(root), "data.embedded_num_val": "64", "out": str(tmp_path), **overrides}, preset="smoke")
    return Trainer(cfg, CPU, tmp_path)


# ----------------------------------------------------------------------------------------------
# the layout


@pytest.mark.parametrize("negative_sampling", [True, False])
@pytest.mark.parametrize("d_steps", [1, 3])
def test_layout_partitions_the_batch_with_pixel_rows_first(negative_sampling, d_steps):
    lay = IterationLayout(batch_size=4, d_steps=d_steps, negative_sampling=negative_sampling)
    parts = [lay.generator_rows(), *[lay.generated_rows(k) for k in range(d_steps)]]
    pixel_parts = len(parts)
    parts += [lay.matched_rows(k) for k in range(d_steps)]
    if negative_sampling:
        parts += [lay.mismatched_rows(k) for k in range(d_steps)]
    rows = np.concatenate([np.arange(lay.size)[p] for p in parts])
    assert len(parts) == lay.num_batches == 1 + d_steps * (3 if negative_sampling else 2)
    assert sorted(rows.tolist()) == list(range(lay.size))  # disjoint and covering
    assert all(len(np.arange(lay.size)[p]) == 4 for p in parts)
    assert max(p.stop for p in parts[:pixel_parts]) == lay.pixel_rows
    assert np.arange(lay.size)[lay.generated_rows()].tolist() == list(range(4, 4 + 4 * d_steps))


# ----------------------------------------------------------------------------------------------
# chunked BatchNorm


@pytest.mark.parametrize("momentum", [0.1, None])
def test_chunked_batch_norm_equals_separate_forwards(momentum):
    torch.manual_seed(0)
    g = make_chunkable(build_generator("smallcnn", 5, width=8))
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    g.train()
    g2 = copy.deepcopy(g)
    x = torch.randn(12, 3, 16, 16) * 3 + 1
    with torch.no_grad():
        separate = torch.cat([g(chunk) for chunk in x.chunk(3)])
        with batch_norm_chunks(g2, 3):
            chunked = g2(x)
        together = copy.deepcopy(g)(x)  # one BatchNorm batch of 12: what chunking avoids
    torch.testing.assert_close(chunked, separate, rtol=1e-5, atol=1e-5)
    assert (together - separate).abs().max() > 1e-3
    for (name, a), b in zip(g.state_dict().items(), g2.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # Outside the block the modules are plain BatchNorm again.
    assert all(getattr(m, "chunks", 1) == 1 for m in g2.modules())


# ----------------------------------------------------------------------------------------------
# the batched iteration against the paper's procedure, one D update at a time


def _snapshot(trainer: Trainer):
    return {
        "g": copy.deepcopy(trainer.steps.generator.state_dict()),
        "d": copy.deepcopy(trainer.steps.discriminator.state_dict()),
        "opt_g": copy.deepcopy(trainer.steps.opt_g.state_dict()),
        "opt_d": copy.deepcopy(trainer.steps.opt_d.state_dict()),
        "rng": torch.get_rng_state(),
        "mismatch": None if trainer.steps.mismatch_sampler is None else trainer.steps.mismatch_sampler.generator.get_state(),
    }


def _restore(trainer: Trainer, snap) -> None:
    trainer.steps.generator.load_state_dict(snap["g"])
    trainer.steps.discriminator.load_state_dict(snap["d"])
    trainer.steps.opt_g.load_state_dict(copy.deepcopy(snap["opt_g"]))
    trainer.steps.opt_d.load_state_dict(copy.deepcopy(snap["opt_d"]))
    torch.set_rng_state(snap["rng"])
    if snap["mismatch"] is not None:
        trainer.steps.mismatch_sampler.generator.set_state(snap["mismatch"])


def _reference_iteration(trainer: Trainer, batch, spec: GanSpec) -> dict[str, list[float]]:
    """§4.1 read literally: per D update, G and f_ext run on that update's three batches. ``spec``
    is the test's own (from the options it passed), not ``trainer.steps.spec``."""
    lay = trainer.layout
    x, y = trainer.steps.model_input(batch), batch["labels"]  # uint8 from the cache (auto): normalised as the trainer does
    record: dict[str, list[float]] = {"loss_d": [], "gp": [], "loss_g": []}
    for k in range(lay.d_steps):
        d_batch = {
            "matched_x": x[lay.matched_rows(k)],
            "matched_y": y[lay.matched_rows(k)],
            "generated_x": x[lay.generated_rows(k)],
            "generated_real_y": y[lay.generated_rows(k)],
        }
        if spec.negative_sampling:
            d_batch["mismatched_x"] = x[lay.mismatched_rows(k)]
            d_batch["mismatched_y"] = trainer.steps.mismatch_sampler.sample(y[lay.mismatched_rows(k)])
        trainer.steps.opt_d.zero_grad()
        out = discriminator_loss_from_images(
            trainer.steps.discriminator, trainer.steps.generator, trainer.steps.feature_extractor, d_batch, spec, trainer.steps.penalty
        )
        out["loss_d"].backward()
        trainer.steps.opt_d.step()
        record["loss_d"].append(out["loss_d"].item())
        record["gp"].append(out["gp"].item())
    trainer.steps.opt_g.zero_grad()
    g = lay.generator_rows()
    out = generator_loss_from_images(
        trainer.steps.discriminator, trainer.steps.generator, trainer.steps.feature_extractor, {"x": x[g], "y": y[g]}, spec
    )
    out["loss_g"].backward(inputs=list(trainer.steps.generator.parameters()))
    trainer.steps.opt_g.step()
    record["loss_g"].append(out["loss_g"].item())
    return record


def _batched_iteration(trainer: Trainer, batch) -> dict[str, list[float]]:
    record: dict[str, list[float]] = {"loss_d": [], "gp": [], "loss_g": []}
    d_step, g_step = trainer.steps.discriminator_step, trainer.steps.generator_step

    def recording_d(d_batch):
        out = d_step(d_batch)
        record["loss_d"].append(out["loss_d"].item())
        record["gp"].append(out["gp"].item())
        return out

    def recording_g(g_batch):
        out = g_step(g_batch)
        record["loss_g"].append(out["loss_g"].item())
        return out

    trainer.steps.discriminator_step, trainer.steps.generator_step = recording_d, recording_g
    try:
        trainer.steps.train_step(batch)
    finally:
        trainer.steps.discriminator_step, trainer.steps.generator_step = d_step, g_step
    return record


def _spec_of(overrides: dict[str, str]) -> GanSpec:
    """The GanSpec the options ask for, with the smoke preset's (the paper's) values otherwise:
    α = λ = 10, β = 0.9 (§4.1)."""
    def flag(key: str) -> bool:
        return overrides.get(key, "true") == "true"

    return GanSpec(
        bce_weight=float(overrides.get("gan.bce_weight", 10.0)),
        gp_weight=float(overrides.get("gan.gp_weight", 10.0)),
        inv_temperature=float(overrides.get("gan.inv_temperature", 0.9)),
        negative_sampling=flag("gan.negative_sampling"),
        conditional=flag("gan.conditional"),
        gumbel=flag("gan.gumbel"),
        hard_samples=False,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # conditional D, negative sampling, Gumbel samples
        # Table 3 (d), with α, λ and β all different (and λ ≠ 1/β): a swap between them shows.
        {"gan.conditional": "false", "gan.negative_sampling": "false",
         "gan.bce_weight": "3", "gan.gp_weight": "7", "gan.inv_temperature": "0.25"},
        {"gan.gumbel": "false", "gan.d_steps": "2"},
    ],
    ids=["paper", "unconditional-a3-l7-b0.25", "no-gumbel-2-steps"],
)
def test_batched_iteration_equals_one_update_at_a_time(smoke_root, tmp_path, overrides):
    """Same losses at every D and G update and the same parameters afterwards. Not bit-identical:
    f_ext and G now see 10 and 3 batches in one forward (other float summation order inside the
    convolutions), and chunked BatchNorm computes its statistics with other kernels; 1e-4
    relative absorbs that, while a wrong slice, a shared noise draw or one BatchNorm batch of 3B
    moves the losses by far more (the test checks the last one)."""
    trainer = _trainer(smoke_root, tmp_path, **overrides)
    trainer.start_gan_phase()
    # f_ext exists only where D sees it (issue 12: no frozen copy of G for an unconditional D).
    assert (trainer.steps.feature_extractor is None) == (overrides.get("gan.conditional") == "false")
    stream = BatchStream(trainer.build_gan_loader(), data_epoch=1)
    batch = stream.next()
    assert batch["image"].shape[0] == trainer.layout.size
    snap = _snapshot(trainer)
    batched = _batched_iteration(trainer, batch)
    after_batched = _snapshot(trainer)
    _restore(trainer, snap)
    reference = _reference_iteration(trainer, batch, _spec_of(overrides))
    after_reference = _snapshot(trainer)
    for key in reference:
        torch.testing.assert_close(torch.tensor(batched[key]), torch.tensor(reference[key]), rtol=1e-4, atol=1e-5, msg=key)
    for part in ("g", "d"):
        for name, value in after_reference[part].items():
            torch.testing.assert_close(after_batched[part][name], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")
    # The check has teeth: G's generated forward as one BatchNorm batch of d·B gives other losses.
    _restore(trainer, snap)
    unchunked = trainer.steps.generated_logits

    def one_batch_norm_batch(images):
        with torch.no_grad():
            return trainer.steps.generator(images).float()

    trainer.steps.generated_logits = one_batch_norm_batch
    wrong = _batched_iteration(trainer, batch)
    trainer.steps.generated_logits = unchunked
    assert not np.allclose(wrong["loss_d"], reference["loss_d"], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the stream: resumable position, pixels only where needed


def test_stream_resumes_at_its_position(smoke_root, tmp_path):
    trainer = _trainer(smoke_root, tmp_path)
    loader = trainer.train_loader
    full = BatchStream(loader)
    seen = [full.next()["index"] for _ in range(len(loader) + 3)]  # crosses an epoch boundary
    for stop in (1, len(loader) - 1, len(loader), len(loader) + 1):
        partial = BatchStream(loader)
        for _ in range(stop):
            partial.next()
        resumed = BatchStream(loader, **partial.state_dict())
        for i in range(stop, len(seen)):
            torch.testing.assert_close(resumed.next()["index"], seen[i], msg=f"stopped after {stop}, batch {i}")


def test_pixels_per_batch_decodes_only_the_leading_images(smoke_root, tmp_path, monkeypatch):
    from fastmlgan.data.backends import torch_dataloader
    from fastmlgan.data.factory import build_train_loader

    trainer = _trainer(smoke_root, tmp_path, **{"data.backend": "torch"})  # counts the torch loader's decodes
    cfg, lay = trainer.cfg.data, trainer.layout
    full = build_train_loader(cfg, trainer.splits, CPU, 0, lay.size)
    skipping = build_train_loader(cfg, trainer.splits, CPU, 0, lay.size, pixels_per_batch=lay.pixel_rows)
    decoded = []
    real_decode = torch_dataloader.decode_rgb
    monkeypatch.setattr(torch_dataloader, "decode_rgb", lambda path: decoded.append(path) or real_decode(path))
    full.set_epoch(3)
    skipping.set_epoch(3)
    a, b = next(iter(full)), next(iter(skipping))
    assert len(decoded) == lay.size + lay.pixel_rows
    assert b["image"].shape[0] == lay.pixel_rows
    torch.testing.assert_close(b["image"], a["image"][: lay.pixel_rows])
    for key in ("labels", "index", "crop"):
        torch.testing.assert_close(b[key], a[key], msg=key)


# ----------------------------------------------------------------------------------------------
# evaluation scores in fp32 (issue: bf16 heads tie)


def test_scores_do_not_tie_under_autocast():
    torch.manual_seed(0)
    g = build_generator("smallcnn", 4, width=8)
    x = torch.randn(256, 3, 16, 16)
    # BatchNorm statistics of the data (a fresh G's would map every image to nearly one score).
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        g.train()(x)
    g.eval()
    with torch.no_grad():
        scores = generator_scores(g, x, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_head = torch.sigmoid(g(x)).float()
        exact = generator_scores(g, x, None)
    assert scores.dtype == torch.float32
    distinct = min(len(torch.unique(scores[:, c])) for c in range(4))
    distinct_bf16 = min(len(torch.unique(bf16_head[:, c])) for c in range(4))
    assert distinct >= 250, distinct  # fp32 scores of 256 random images: (almost) no ties
    assert distinct_bf16 < 200, distinct_bf16  # what the bf16 head did
    torch.testing.assert_close(scores, exact, rtol=0.05, atol=0.02)  # the trunk alone in bf16
