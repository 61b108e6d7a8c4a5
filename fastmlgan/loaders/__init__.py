"""Bytes on disk -> labelled images -> batches.

Readers (``read_coco``, the embedded dataset) return ``LabeledImages``; loader backends
(``torch_loader``, ...) turn one into batches. Names are imported lazily so that the dataset CLI
(``python -m fastmlgan.loaders.embedded``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LabeledImages": "fastmlgan.loaders.base",
    "read_coco": "fastmlgan.loaders.coco",
    "EmbeddedPaths": "fastmlgan.loaders.embedded",
    "FiveCropDataset": "fastmlgan.loaders.torch_loader",
    "build_train_loader": "fastmlgan.loaders.torch_loader",
    "build_eval_loader": "fastmlgan.loaders.torch_loader",
    "set_epoch": "fastmlgan.loaders.torch_loader",
    "decode_rgb": "fastmlgan.loaders.torch_loader",
    "five_crop": "fastmlgan.loaders.torch_loader",
    "eval_resize": "fastmlgan.loaders.torch_loader",
    "normalize": "fastmlgan.loaders.torch_loader",
    "read_nuswide": "fastmlgan.loaders.nuswide",
    "read_list": "fastmlgan.loaders.listfile",
    "build_dali_train_loader": "fastmlgan.loaders.dali",
    "build_dali_eval_loader": "fastmlgan.loaders.dali",
    "build_torchvision_train_loader": "fastmlgan.loaders.torchvision_gpu",
    "build_torchvision_eval_loader": "fastmlgan.loaders.torchvision_gpu",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastmlgan.loaders' has no attribute {name!r}")
