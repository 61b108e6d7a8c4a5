"""An exponential moving average of G's weights (``--train.ema_decay``), updated after every G
optimiser step of both phases.

The decay and its warm-up follow timm's ``ModelEmaV3`` (huggingface/pytorch-image-models,
``timm/utils/model_ema.py``, ``get_decay`` and ``apply_update_``) with ``warmup_gamma = 1``,
``update_after_step = 0`` and ``min_decay = 0``: the (n+1)-th update uses

    decay_n = 0                                          for n = 0 (the first update copies G)
    decay_n = min(ema_decay, 1 − (1 + n)^−power)         with warm-up (the default)
    decay_n = ema_decay                                  without

and moves every floating-point entry of G's state dict (parameters and BatchNorm statistics)
towards G's: ema ← ema + (1 − decay_n)(w − ema), ``torch._foreach_lerp_``; integer entries (the
BatchNorm batch counters) are copied, as timm does.

D never sees these weights: f_ext, D's inputs and the G step use G's raw weights. Under DDP the
parameters are identical on every rank (the same averaged gradients, the same Adam step), so each
rank's average of them is too; the BatchNorm statistics are not (each rank's forward updates its
own, from its own batch), so ``sync`` gives every rank rank 0's before an evaluation or a
checkpoint, as the Trainer does for G's own statistics.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from fastmlgan.distributed import broadcast_module

logger = logging.getLogger(__name__)


def ema_decay_at(updates: int, decay: float, warmup: bool = True, power: float = 2 / 3) -> float:
    """The decay of the update that follows ``updates`` earlier ones (timm's ``get_decay(step)``
    with ``step = updates + 1``)."""
    if updates <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1.0 - (1.0 + updates) ** -power, decay), 0.0)


class WeightEma:
    """The averaged copy of G (``module``, eval mode, no gradients) and how many updates it has had."""

    def __init__(self, generator: nn.Module, decay: float, warmup: bool = True, power: float = 2 / 3) -> None:
        self.decay, self.warmup, self.power = decay, warmup, power
        self.module = copy.deepcopy(generator).eval()  # G as built: before DDP or compilation wraps it
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @classmethod
    def create(cls, train_cfg, generator: nn.Module) -> WeightEma | None:
        """The EMA of ``--train.ema_decay`` (None when it is 0)."""
        if not train_cfg.ema_decay:
            return None
        return cls(generator, train_cfg.ema_decay, train_cfg.ema_warmup, train_cfg.ema_warmup_power)

    def current_decay(self) -> float:
        """The decay the next ``update`` uses."""
        return ema_decay_at(self.updates, self.decay, self.warmup, self.power)

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        """One step towards ``generator``'s weights (after its optimiser step)."""
        weight = 1.0 - self.current_decay()
        floats, targets = [], []
        for mine, theirs in zip(self.module.state_dict().values(), generator.state_dict().values()):
            if mine.is_floating_point():
                floats.append(mine)
                targets.append(theirs.detach())
            else:
                mine.copy_(theirs)
        if floats:
            torch._foreach_lerp_(floats, targets, weight)
        self.updates += 1

    def sync(self) -> None:
        """Rank 0's BatchNorm statistics on every rank (the parameters agree already)."""
        broadcast_module(self.module, buffers_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any] | None, generator: nn.Module) -> None:
        """The average a checkpoint holds; a checkpoint without one (EMA switched on at a resume)
        starts it from ``generator``'s weights."""
        if state is None:
            logger.info("--train.ema_decay: the checkpoint holds no weight average; it starts from G's weights now")
            self.module.load_state_dict(generator.state_dict())
            self.updates = 0
            return
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
