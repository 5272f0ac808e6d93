"""dni_dist: training with synthetic gradients (decoupled neural interfaces), unlocked.

The layers, bottom to top; a module imports only from its own layer or the ones below
(``tests/test_layers.py`` checks this):

1. ``errors``: the exceptions every layer raises.
2. ``core/`` (SG modules, boundary methods, cuts, tasks, messages, the stage step),
   ``models/`` (the zoo), ``data/`` (datasets), ``wire/`` (the gRPC format).
3. ``transports/``: moving messages between processes (in-process, torch.distributed, gRPC).
4. ``config`` (a run as plain data) and ``builder`` (config -> stages and data).
5. ``engines/``: the local lockstep engine and the Ray engine with its stage loop.
6. ``operations/``: metrics, monitor, progress, checkpoints, restarts, pre-flight check.
7. ``runner`` (one training run, end to end), ``api`` (``fit``: the same from Python) and ``cli``.
8. ``bench/`` and ``reproduce/``: benchmarks and the paper's experiments, built on all of it.
"""

from dni_dist.api import Fitted, fit, load_model
from dni_dist.builder import build_stages, load_data
from dni_dist.config import TrainConfig, load_config
from dni_dist.core.methods import METHODS, build_boundary
from dni_dist.core.stage import Stage
from dni_dist.core.synthetic import SGSpec, SyntheticGradient, build_sg
from dni_dist.engines.local import LocalEngine
from dni_dist.errors import ConfigError

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ConfigError",
    "Fitted",
    "LocalEngine",
    "SGSpec",
    "Stage",
    "SyntheticGradient",
    "TrainConfig",
    "build_boundary",
    "build_sg",
    "build_stages",
    "fit",
    "load_config",
    "load_data",
    "load_model",
]
