"""fastmlgan: adversarial learning of label dependency (Tsai & Lee) for multi-label classification.

The package in layers; a module imports only from its own layer or below (``tests/unit/test_architecture.py``):

1. ``errors``, ``safeio``, ``logs``, ``environment``, ``distributed``;
2. ``data.types``, ``data.sources`` (files on disk -> labelled lists; the ``SOURCES`` table);
3. ``config`` (the options; ``data.dataset`` takes its choices from ``SOURCES``);
4. the rest of ``data``: geometry, backends, the decoded-image cache, the factory, the stream, check;
5. ``models``, ``kernels``, ``losses``, ``metrics``, ``scoring``;
6. ``train`` (the Trainer, checkpoints, the run folder);
7. ``classifier``, ``export``;
8. ``reproduce``;
9. ``commands`` (every command-line entry point; ``python -m fastmlgan`` is ``commands.cli``).

Nothing is imported here but on demand (``load_classifier``), so that ``import fastmlgan.x``
pulls in only what ``x`` needs.
"""

__version__ = "0.1.0"


def load_classifier(path):
    """(G, class names) from an exported model folder, a run directory or a checkpoint file.

    G is a plain ``torch.nn.Module`` in eval mode on the CPU (fp32) returning logits (B, C);
    sigmoid of them are the per-label probabilities. Feed it images as
    ``fastmlgan.classifier.preprocess_image`` prepares them (the evaluation geometry).
    Nothing is downloaded. See ``fastmlgan.classifier.load_classifier``.
    """
    from fastmlgan.classifier import load_classifier as _load_classifier

    return _load_classifier(path)
