"""Give a block planned on the meta device real storage and its initial values.

A Ray actor builds only its own segment: the model is planned on PyTorch's ``meta`` device
(shapes, no storage) and each block of the segment is materialised alone. For its weights
not to depend on which process builds it (the local engine builds every block, an actor a
few), every block draws from its own seed and is initialised by its modules'
``reset_parameters()``, children before parents, so that a module which initialises its
children by hand (the transformer's embeddings) has the last word.

A block can be initialised this way only if every module that holds parameters or buffers
of its own can reset them; ``resettable`` says which module cannot.
"""

from __future__ import annotations

import torch
from torch import nn


def block_seed(seed: int, block: int) -> int:
    """The seed of block ``block``'s initial weights: one stream per block, whoever builds it."""
    return (seed * 1_000_003 + 7_919 * (block + 1)) % (1 << 63)


def unresettable(block: nn.Module) -> nn.Module | None:
    """The first module of ``block`` holding parameters or buffers that no reset_parameters()
    covers (its own or an ancestor's), or None when the whole block can be re-initialised."""

    def first_bad(module: nn.Module, covered: bool) -> nn.Module | None:
        covered = covered or hasattr(module, "reset_parameters")
        owns = any(p is not None for p in module._parameters.values()) or any(
            b is not None for b in module._buffers.values()
        )
        if owns and not covered:
            return module
        for child in module.children():
            bad = first_bad(child, covered)
            if bad is not None:
                return bad
        return None

    return first_bad(block, covered=False)


def _reset(module: nn.Module) -> None:
    """Children first, then the module itself (a parent's own init overrides its children's)."""
    for child in module.children():
        _reset(child)
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def materialise_block(block: nn.Module, seed: int) -> nn.Module:
    """``block`` (on meta, changed in place) with real storage on the CPU, initialised from
    ``seed`` alone; the caller's random stream is left as it was. Always the CPU: a GPU's
    generator would draw other numbers, and an actor moves its stage to its device later.
    A block with state no ``reset_parameters()`` covers is refused: ``to_empty`` would leave
    that state as whatever the memory held."""
    bad = unresettable(block)
    if bad is not None:
        owner = f"{type(bad).__name__} in {type(block).__name__}"
        raise RuntimeError(f"{owner} has no reset_parameters(): the block cannot be built alone")
    block.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        _reset(block)
    return block
