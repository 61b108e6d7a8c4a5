"""Loader backends: one module per backend (``torch_dataloader``, ``torchvision_gpu``, ``dali``,
``vectors`` for feature data; the decoded-image cache's is ``imagecache.loader``), each with its
two builders from config, listed in ``factory.BACKENDS``; ``plan`` holds the batch order they
share."""

CHOICES = ("auto", "dali", "torchvision-gpu", "torch", "cache")
"""What ``--data.backend`` accepts (``config`` validates against it, ``factory.resolve_backend``
resolves ``auto``); each but ``auto`` is an entry of ``factory.BACKENDS``."""
