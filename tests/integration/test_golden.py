"""A golden record of per-step losses for a tiny configuration: catches accidental changes to the
maths (eqs. 1-5, the samplers, the optimizer wiring). After an intended change, regenerate with
``python tests/integration/test_golden.py --regenerate`` and say why in the commit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fastmlgan.kernels import gradient_penalty
from fastmlgan.losses import GanSpec, bce_loss, discriminator_loss_from_images, generator_loss_from_images
from fastmlgan.models import Discriminator, build_feature_extractor, build_generator

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "golden" / "tiny_losses.json"
C, B, S = 5, 6, 16


def _record() -> dict[str, list[float]]:
    torch.manual_seed(0)
    g = build_generator("smallcnn", C, width=4)
    d = Discriminator(C, g.feature_dim, proj_dim=8, hidden_dim=16, num_layers=3)
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-4)
    data = torch.Generator().manual_seed(1)

    def batch():
        return torch.randn(B, 3, S, S, generator=data), torch.randint(0, 2, (B, C), generator=data).float()

    record: dict[str, list[float]] = {"bce": [], "loss_d": [], "gp": [], "loss_g": []}
    for _ in range(3):  # phase 1
        x, y = batch()
        opt_g.zero_grad()
        out = bce_loss(g, {"x": x, "y": y})
        out["loss_g"].backward()
        opt_g.step()
        record["bce"].append(out["bce"].item())
    f = build_feature_extractor(g, "phase1")
    spec = GanSpec()
    for _ in range(2):  # phase 2: 3 D updates per G update
        for _ in range(3):
            (xm, ym), (xg, yg), (xn, yn) = batch(), batch(), batch()
            opt_d.zero_grad()
            out = discriminator_loss_from_images(
                d, g, f,
                {"matched_x": xm, "matched_y": ym, "generated_x": xg, "generated_real_y": yg,
                 "mismatched_x": xn, "mismatched_y": yn},
                spec, gradient_penalty,
            )
            out["loss_d"].backward()
            opt_d.step()
            record["loss_d"].append(out["loss_d"].item())
            record["gp"].append(out["gp"].item())
        x, y = batch()
        opt_g.zero_grad()
        out = generator_loss_from_images(d, g, f, {"x": x, "y": y}, spec)
        out["loss_g"].backward(inputs=list(g.parameters()))
        opt_g.step()
        record["loss_g"].append(out["loss_g"].item())
    return record


def test_losses_match_the_golden_record():
    golden = json.loads(GOLDEN.read_text())
    record = _record()
    assert record.keys() == golden.keys()
    for key in golden:
        # 1e-3 relative absorbs float summation order across CPUs; any change to a loss term,
        # weight or sampler moves these by far more.
        torch.testing.assert_close(torch.tensor(record[key]), torch.tensor(golden[key]), rtol=1e-3, atol=1e-5, msg=key)


if __name__ == "__main__" and "--regenerate" in sys.argv:
    GOLDEN.write_text(json.dumps(_record(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
