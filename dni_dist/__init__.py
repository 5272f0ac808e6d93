"""dni_dist: training with synthetic gradients (decoupled neural interfaces), unlocked."""

from dni_dist.builder import build_stages, load_data
from dni_dist.config import TrainConfig, load_config
from dni_dist.engines.local import LocalEngine
from dni_dist.errors import ConfigError
from dni_dist.methods import METHODS, build_boundary
from dni_dist.stage import Stage
from dni_dist.synthetic import SGSpec, SyntheticGradient, build_sg

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ConfigError",
    "LocalEngine",
    "SGSpec",
    "Stage",
    "SyntheticGradient",
    "TrainConfig",
    "build_boundary",
    "build_sg",
    "build_stages",
    "load_config",
    "load_data",
]
