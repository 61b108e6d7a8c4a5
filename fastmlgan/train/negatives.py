"""Negative sampling for eq. (4): mismatched label sets y'.

§3.3: "y' is a label set randomly sampled from the training data which does not correspond to
image x". Drawn on the host from the training label matrix, so the D step itself stays free of
data-dependent branching.
"""

from __future__ import annotations

import numpy as np
import torch

from fastmlgan.errors import DataError


class MismatchedLabelSampler:
    """Draws, for each image, the label set of a uniformly random other training image whose
    label set differs from the image's own (rejection sampling, then an exhaustive fallback)."""

    def __init__(self, labels: np.ndarray, seed: int, max_tries: int = 32) -> None:
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8))
        if self.labels.shape[0] < 2 or bool((self.labels == self.labels[0]).all()):
            raise DataError(
                "negative sampling needs at least two different label sets in the training data; "
                "disable it with --gan.negative_sampling false"
            )
        self.generator = torch.Generator().manual_seed(seed)
        self.max_tries = max_tries

    def sample(self, own: torch.Tensor) -> torch.Tensor:
        """``own``: (B, C) label sets of the batch's images (CPU). Returns (B, C) float32 y'."""
        own = own.to(torch.uint8).cpu()
        n = self.labels.shape[0]
        idx = torch.randint(n, (own.shape[0],), generator=self.generator)
        same = (self.labels[idx] == own).all(dim=1)
        for _ in range(self.max_tries):
            if not bool(same.any()):
                break
            redraw = torch.randint(n, (int(same.sum()),), generator=self.generator)
            idx[same] = redraw
            same = (self.labels[idx] == own).all(dim=1)
        for i in torch.nonzero(same).flatten().tolist():
            # Label sets shared by nearly every image: pick uniformly among the rows that differ.
            differ = torch.nonzero(~(self.labels == own[i]).all(dim=1)).flatten()
            idx[i] = differ[torch.randint(len(differ), (1,), generator=self.generator)]
        return self.labels[idx].float()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
