"""Fused ops of the method: Gumbel-sigmoid sampling and the WGAN gradient penalty."""

from fastmlgan.kernels.gradient_penalty import gradient_penalty, gradient_penalty_autograd
from fastmlgan.kernels.gumbel_sigmoid import gumbel_sigmoid

__all__ = ["gradient_penalty", "gradient_penalty_autograd", "gumbel_sigmoid"]
