"""BatchNorm that can normalise a batch as several independent chunks.

Phase 2 runs G's no-grad forward on the generated images of all ``gan.d_steps`` D updates at once
(one batch of d·B images instead of d batches of B). G is in training mode there, so BatchNorm
would normalise with the statistics of all d·B images and update its running statistics once.
To keep the maths of d separate forwards, the batched forward sets ``chunks = d``: each chunk of B
images is normalised with its own statistics, and the running statistics receive d successive
momentum updates, in chunk order, exactly as d separate forwards would leave them. With
``chunks == 1`` (the default) or in eval mode, the module is ``nn.BatchNorm2d``/``1d`` itself.

The modules of a built generator are switched to these classes in place (``__class__``), so
parameters, buffers and state-dict keys are those of torchvision's BatchNorm: checkpoints and
exports are unchanged. timm's ``BatchNormAct2d`` (BatchNorm, then its ``drop`` and ``act``
modules: EfficientNet, MobileNetV3, RegNet, ...) gets a chunkable subclass made the same way. A
BatchNorm of another class is left as it is, with a warning: phase 2 would normalise all d·B
generated images as one batch there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _chunked_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, chunks: int) -> torch.Tensor:
    n = x.shape[0]
    if n % chunks:
        raise ValueError(f"a batch of {n} cannot be split into {chunks} equal BatchNorm chunks")
    per = n // chunks
    xs = x.reshape(chunks, per, *x.shape[1:])
    # Statistics per chunk and channel, over the chunk's samples and spatial positions; in fp32
    # like the native kernel.
    dims = [1, *range(3, xs.dim())]
    xf = xs.float()
    mean = xf.mean(dim=dims, keepdim=True)
    var = xf.var(dim=dims, unbiased=False, keepdim=True)
    shape = [1, 1, -1, *([1] * (xs.dim() - 3))]
    out = (xf - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        out = out * bn.weight.float().view(shape) + bn.bias.float().view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        count = per * (x[0, 0].numel())
        unbiased = var.flatten(1) * (count / max(count - 1, 1))  # (chunks, C)
        mean_c = mean.flatten(1)
        with torch.no_grad():
            if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm
                for k in range(chunks):
                    bn.num_batches_tracked.add_(1)
                    factor = 1.0 / float(bn.num_batches_tracked)
                    bn.running_mean.mul_(1 - factor).add_(mean_c[k].to(bn.running_mean.dtype), alpha=factor)
                    bn.running_var.mul_(1 - factor).add_(unbiased[k].to(bn.running_var.dtype), alpha=factor)
            else:
                m = bn.momentum
                for k in range(chunks):
                    bn.running_mean.mul_(1 - m).add_(mean_c[k].to(bn.running_mean.dtype), alpha=m)
                    bn.running_var.mul_(1 - m).add_(unbiased[k].to(bn.running_var.dtype), alpha=m)
                bn.num_batches_tracked.add_(chunks)
    return out.to(x.dtype).reshape(x.shape)


class ChunkedBatchNorm2d(nn.BatchNorm2d):
    chunks: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunks == 1 or not self.training:
            return super().forward(x)
        return _chunked_batch_norm(self, x, self.chunks)


class ChunkedBatchNorm1d(nn.BatchNorm1d):
    chunks: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunks == 1 or not self.training:
            return super().forward(x)
        return _chunked_batch_norm(self, x, self.chunks)


_CHUNKED: dict[type, type] = {nn.BatchNorm2d: ChunkedBatchNorm2d, nn.BatchNorm1d: ChunkedBatchNorm1d}


def _is_norm_act(cls: type) -> bool:
    """timm's BatchNormAct2d (or a subclass): BatchNorm, then ``self.drop`` and ``self.act``.
    Recognised by name: chunked_norm does not import timm."""
    return any(c.__name__ == "BatchNormAct2d" and c.__module__.startswith("timm.") for c in cls.__mro__)


def _chunkable_norm_act(cls: type) -> type:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunks == 1 or not self.training:
            return cls.forward(self, x)
        return self.act(self.drop(_chunked_batch_norm(self, x, self.chunks)))

    return type(f"Chunked{cls.__name__}", (cls,), {"chunks": 1, "forward": forward, "__module__": __name__})


def _chunkable(module: nn.Module) -> bool:
    return type(module) in _CHUNKED.values()


def make_chunkable(module: nn.Module) -> nn.Module:
    """Switch every plain BatchNorm1d/2d (and timm's BatchNormAct2d) under ``module`` to its
    chunkable class, in place."""
    left = set()
    for m in module.modules():
        cls = type(m)
        if cls not in _CHUNKED and _is_norm_act(cls) and not _chunkable(m):
            _CHUNKED[cls] = _chunkable_norm_act(cls)
        if cls in _CHUNKED:
            m.__class__ = _CHUNKED[cls]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not _chunkable(m):
            left.add(cls.__name__)
    if left:
        logger.warning(
            "%s: BatchNorm not chunked; phase 2's batched no-grad forward of G normalises all generated "
            "images of an iteration as one batch there", ", ".join(sorted(left))
        )
    return module


@contextlib.contextmanager
def batch_norm_chunks(module: nn.Module, chunks: int) -> Iterator[None]:
    """Within the block, every chunkable BatchNorm under ``module`` normalises ``chunks`` equal
    chunks of its batch independently (see the module docstring)."""
    norms = [m for m in module.modules() if _chunkable(m)]
    for m in norms:
        m.chunks = chunks
    try:
        yield
    finally:
        for m in norms:
            m.chunks = 1
