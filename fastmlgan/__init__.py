"""fastmlgan: adversarial learning of label dependency (Tsai & Lee) for multi-label classification."""

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
