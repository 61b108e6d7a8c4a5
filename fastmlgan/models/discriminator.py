"""The conditional discriminator D(label set, image features) of §3.1 and §4.1."""

from __future__ import annotations

import torch
from torch import nn

from fastmlgan.models.generator import check_parameter_count


class Discriminator(nn.Module):
    """§4.1: f_ext(x) and the label set are each projected linearly to ``proj_dim`` (256),
    concatenated, and fed to ``num_layers`` (8) fully connected layers of ``hidden_dim`` (512)
    with LeakyReLU, then one linear unit. No sigmoid: it is a WGAN critic (eq. 4).

    ``conditional=False`` is the unconditional ablation (Table 3 (d)): the features are ignored
    and only the label projection feeds the MLP.

    The body is plain ``Linear`` / ``LeakyReLU`` layers on purpose: the explicit input-gradient
    penalty (``fastmlgan.kernels.gradient_penalty``) walks exactly this structure.
    """

    def __init__(
        self,
        num_labels: int,
        feature_dim: int,
        proj_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 8,
        conditional: bool = True,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        in_dim = 2 * proj_dim if conditional else proj_dim
        count = (num_labels + feature_dim) * proj_dim + in_dim * hidden_dim + (num_layers - 1) * hidden_dim * hidden_dim
        options = f"--gan.proj_dim {proj_dim} --gan.hidden_dim {hidden_dim} --gan.num_layers {num_layers}"
        check_parameter_count(count, "D", options)
        self.num_labels = num_labels
        self.feature_dim = feature_dim
        self.conditional = conditional
        # The paper does not give the LeakyReLU slope; 0.2 is the usual GAN choice (DCGAN, WGAN-GP).
        self.negative_slope = negative_slope
        self.label_proj = nn.Linear(num_labels, proj_dim)
        self.feature_proj = nn.Linear(feature_dim, proj_dim) if conditional else None
        in_dim = 2 * proj_dim if conditional else proj_dim
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [nn.Linear(in_dim, hidden_dim), nn.LeakyReLU(negative_slope)]
            in_dim = hidden_dim
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(in_dim, 1)

    def forward(self, labels: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of shape (B,) for label sets (B, |S|) and image features (B, feature_dim)."""
        h = self.label_proj(labels)
        if self.feature_proj is not None:
            if features is None:
                raise ValueError("a conditional Discriminator needs image features")
            h = torch.cat([h, self.feature_proj(features)], dim=-1)
        return self.out(self.body(h)).squeeze(-1)
