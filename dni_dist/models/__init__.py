"""The model zoo: the networks dni_dist cuts into segments.

Each builder returns an ``nn.Sequential`` whose children are the blocks that cuts may
fall between. A package because the zoo grows (transformer, ResNet, user factories).
Models import only ``dni_dist.errors`` and ``core``: they know nothing of stages or engines.
"""

from dni_dist.models.zoo import ACTIVATIONS, MODEL_KINDS, ModelSpec, build_model

__all__ = ["ACTIVATIONS", "MODEL_KINDS", "ModelSpec", "build_model"]
