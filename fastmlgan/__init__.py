"""fastmlgan: adversarial learning of label dependency (Tsai & Lee) for multi-label classification."""

__version__ = "0.1.0"
