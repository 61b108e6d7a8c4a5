"""Typed configuration, the single source of truth for every option: the dataclasses and their
validation (``schema``, ``validate``), the command line and config files (``parse``) and the
presets (``presets``). ``--section.key value`` overrides a field; ``--preset NAME`` starts from a
named preset. The resolved config is written to the run directory and stored in every checkpoint.
"""

from fastmlgan.config.parse import (
    BOOL_WORDS,
    build_config,
    help_text,
    load_config_file,
    parse_args,
    unknown_option_message,
    valid_keys,
)
from fastmlgan.config.presets import PRESETS
from fastmlgan.config.schema import (
    BACKBONES,
    NOT_FROM_FILE,
    SECTION_TYPES,
    SECTIONS,
    TOP_LEVEL,
    CheckpointConfig,
    CompileConfig,
    Config,
    DataConfig,
    DistConfig,
    GanConfig,
    LogConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PrecisionConfig,
    TrainConfig,
    config_from_dict,
    valid_backbone,
)

__all__ = [
    "BACKBONES", "BOOL_WORDS", "NOT_FROM_FILE", "PRESETS", "SECTIONS", "SECTION_TYPES", "TOP_LEVEL",
    "CheckpointConfig", "CompileConfig", "Config", "DataConfig", "DistConfig", "GanConfig", "LogConfig", "LossConfig",
    "ModelConfig", "OptimConfig", "PrecisionConfig", "TrainConfig",
    "build_config", "config_from_dict", "help_text", "load_config_file", "parse_args", "unknown_option_message",
    "valid_backbone", "valid_keys",
]
