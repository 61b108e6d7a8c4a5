"""σ(G(x)) on batches: the evaluation path shared by the Trainer, ``fastmlgan evaluate`` and
``fastmlgan predict`` (§4.1: whole image, one crop; G in eval mode), and the rule that picks the
mixed-precision dtype."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fastmlgan.data.geometry import normalize_batch


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision.amp`` on ``device`` (None: no autocast)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


def inputs_to_device(batch: dict[str, torch.Tensor], device: torch.device, memory_format, normalize=normalize_batch) -> torch.Tensor:
    """G's input on the device: images in the model's memory format, feature vectors as they are.
    uint8 images (the cache loader's ``output="uint8"``) are normalised here, on the device, by
    ``normalize`` (``geometry.normalize_batch``; the trainer passes its compiled copy)."""
    x = to_device(batch["image"], device)
    if x.dtype == torch.uint8:
        return normalize(x, memory_format)
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


def generator_scores(generator: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """σ(G(x)) in fp32: the trunk under autocast (when given), the head and the sigmoid in fp32.

    A bf16 head rounds the logits to 8 bits of mantissa, so many images of one class would get
    exactly the same score, and the ranking metrics (AP) would depend on how ties are broken."""
    if amp_dtype is None:
        return torch.sigmoid(generator(x).float())
    with torch.autocast(x.device.type, dtype=amp_dtype):
        features = generator.trunk(x)
    with torch.autocast(x.device.type, enabled=False):
        return torch.sigmoid(generator.head(features.float()))


@torch.no_grad()
def predict(
    generator: nn.Module,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[np.ndarray, np.ndarray]:
    """σ(G(x)) and the targets of every image ``loader`` yields, G in eval mode (this process only)."""
    generator.eval()
    scores, targets = [], []
    for batch in loader:
        x = inputs_to_device(batch, device, memory_format)
        s = generator_scores(generator, x, amp_dtype)
        # An undecodable image has a stand-in in its slot (the loaders' skip policy); leave it out
        # so that no image is counted twice.
        keep = ~batch["bad"].cpu().numpy() if "bad" in batch else slice(None)
        scores.append(s.cpu().numpy()[keep])
        targets.append(batch["labels"].cpu().numpy()[keep])
    num_labels = generator.num_labels
    s = np.concatenate(scores) if scores else np.zeros((0, num_labels), np.float32)
    t = np.concatenate(targets) if targets else np.zeros((0, num_labels), np.float32)
    return s, t
