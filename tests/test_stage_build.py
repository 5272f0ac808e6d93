"""Each stage is built alone: the model is planned on the meta device and a process gives
real storage only to the segment it runs, with the weights the local engine gives it.

The local engine builds every stage, a Ray actor one (engines/ray_engine.py); both go through
``build_stages``, so comparing ``build_stages()`` with ``build_stages(only=k)`` in one
process is the contract the lockstep tests (test_ray_engine.py) rely on.
"""

from __future__ import annotations

import resource

import pytest
import torch
from conftest import config
from helpers import write_module
from torch import nn

from dni_dist.builder import build_stages, load_data, plan_layout, plan_model
from dni_dist.core.feedback import FALinear
from dni_dist.errors import ConfigError
from dni_dist.models.reinit import unresettable
from dni_dist.operations.preflight import preflight

ZOO = {
    "mlp": ["model.batch_norm=true"],
    "cnn": ["model.kind=cnn", "data.name=digits16", "model.channels=4", "model.width=32"],
    "transformer": ["model.kind=transformer", "data.name=text", "model.width=32", "model.depth=2"],
    "resnet": ["model.kind=resnet", "model.depth=8", "data.name=digits16", "model.channels=4"],
}


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)


@pytest.mark.parametrize("method", ["sg", "fa"])
@pytest.mark.parametrize("kind", list(ZOO))
def test_a_stage_built_alone_has_the_weights_the_local_engine_gives_it(kind: str, method: str) -> None:
    cfg = config(*ZOO[kind], f"method={method}", "segments=3")
    data = load_data(cfg)
    together = build_stages(cfg, data.input_shape, data.task)
    for k in range(cfg.segments):
        alone = build_stages(cfg, data.input_shape, data.task, only=k)[0]
        assert _states_equal(alone.module, together[k].module), f"stage {k}"
        if alone.boundary is not None:
            assert _states_equal(alone.boundary, together[k].boundary), f"stage {k}'s boundary"
    # plan_model (used to reassemble a trained model, and by the baselines) agrees too.
    whole = plan_model(cfg, data.input_shape, data.task)
    assert all(_states_equal(s, stage.module) for s, stage in zip(whole.segments, together, strict=True))


@pytest.mark.parametrize("method", ["sg", "fa"])
@pytest.mark.parametrize("kind", list(ZOO))
def test_materialised_blocks_are_initialised_not_left_as_raw_memory(kind: str, method: str) -> None:
    cfg = config(*ZOO[kind], f"method={method}", "segments=2")
    data = load_data(cfg)
    plan = plan_layout(cfg, data.input_shape, data.task)
    assert plan.on_meta and all(unresettable(block) is None for s in plan.segments for block in s)
    modules = [m for stage in build_stages(cfg, data.input_shape, data.task) for m in stage.module.modules()]
    for m in modules:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            bound = m.weight[0].numel() ** -0.5  # PyTorch's default init: uniform within 1/sqrt(fan_in)
            assert 0 < m.weight.abs().max() <= bound
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
            assert m.num_batches_tracked == 0
        if isinstance(m, nn.Embedding):  # the transformer's own small init, not Embedding's N(0, 1)
            assert 0.015 < float(m.weight.detach().std()) < 0.025
        if isinstance(m, FALinear):
            assert 0.5 < float(m.feedback.std()) * m.in_features**0.5 < 1.5
    assert any(isinstance(m, FALinear) for m in modules) == (method == "fa")


def test_a_stage_alone_allocates_only_its_own_segment() -> None:
    # The middle block would need 64 GiB: only the meta plan ever holds it.
    cfg = config("model.width=131072", "model.depth=2", "segments=3", "cuts=[1,2]", "method=sg")
    data = load_data(cfg)
    plan = plan_layout(cfg, data.input_shape, data.task)
    assert all(p.is_meta for segment in plan.segments for p in segment.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    stage = build_stages(cfg, data.input_shape, data.task, only=2)[0]
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    params = list(stage.module.parameters())
    assert params and all(p.device.type == "cpu" for p in params)
    assert sum(p.numel() for p in params) == 131072 * 10 + 10  # the head alone
    assert grown_mib < 512


# Blocks the meta device cannot run: data-dependent Python, and a Function that leaves torch.
USER_OPS = """
import torch
from torch import nn

class SignGate(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.linear = nn.Linear(n, n)

    def forward(self, x):
        h = self.linear(x)
        return h if h.sum().item() >= 0 else -h

class _ViaNumpy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.from_numpy(x.detach().numpy().clip(0, None)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad

class NumpyRelu(nn.Module):
    def forward(self, x):
        return _ViaNumpy.apply(x)

def item_gate(input_shape, n_outputs):
    return [SignGate(input_shape[0]), nn.Linear(input_shape[0], 8), NumpyRelu(), nn.Linear(8, n_outputs)]

class _BadBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("no backward here")

class BadBackward(nn.Module):
    def forward(self, x):
        return _BadBackward.apply(x)

def bad_backward(input_shape, n_outputs):
    return [nn.Linear(input_shape[0], 8), BadBackward(), nn.Linear(8, n_outputs)]

def hand_set(input_shape, n_outputs):
    first = nn.Linear(input_shape[0], 8)
    nn.init.constant_(first.weight, 0.5)  # weights a re-initialisation would undo
    return [first, nn.ReLU(), nn.Linear(8, n_outputs)]
"""


@pytest.fixture
def user_ops(tmp_path, monkeypatch) -> str:
    return write_module(tmp_path, monkeypatch, "user_ops", USER_OPS)


DATA = "data.factory=examples.factories:blobs"


@pytest.mark.parametrize("balance", ["cost", "params"])
def test_a_model_the_meta_device_cannot_run_is_planned_on_the_cpu(user_ops: str, balance: str) -> None:
    cfg = config(f"model.factory={user_ops}:item_gate", DATA, "segments=2", f"balance={balance}")
    data = load_data(cfg)
    assert not plan_layout(cfg, data.input_shape, data.task).on_meta
    report = preflight(cfg, data)  # the plan, its FLOPs and the memory estimate, no traceback
    assert "in 2 segments" in report and "stage 1:" in report
    together = build_stages(cfg, data.input_shape, data.task)
    alone = build_stages(cfg, data.input_shape, data.task, only=1)[0]
    assert _states_equal(alone.module, together[1].module)


def test_a_block_that_fails_on_the_cpu_too_is_one_line(user_ops: str) -> None:
    cfg = config(f"model.factory={user_ops}:bad_backward", DATA, "segments=2")
    with pytest.raises(ConfigError) as caught:
        preflight(cfg)
    message = str(caught.value)
    assert "\n" not in message and f"model.factory='{user_ops}:bad_backward'" in message
    assert "ValueError: no backward here" in message


def test_a_factorys_own_weights_are_kept_in_every_stage_build(user_ops: str) -> None:
    cfg = config(f"model.factory={user_ops}:hand_set", DATA, "segments=2", "cuts=[1]", "method=fa")
    data = load_data(cfg)
    together = build_stages(cfg, data.input_shape, data.task)
    alone = build_stages(cfg, data.input_shape, data.task, only=0)[0]
    assert torch.all(alone.module[0].weight == 0.5)
    assert isinstance(alone.module[0], FALinear)
    for k in range(2):
        assert _states_equal(build_stages(cfg, data.input_shape, data.task, only=k)[0].module, together[k].module)
