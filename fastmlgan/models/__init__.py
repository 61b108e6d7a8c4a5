"""Generator (the classifier), frozen feature extractor f_ext, and discriminator."""

from fastmlgan.models.discriminator import Discriminator
from fastmlgan.models.generator import (
    FeatureExtractor,
    Generator,
    build_feature_extractor,
    build_generator,
)

__all__ = ["Discriminator", "FeatureExtractor", "Generator", "build_feature_extractor", "build_generator"]
