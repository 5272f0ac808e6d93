from __future__ import annotations

import pytest
import torch

from dni_dist.core.synthetic import SG_KINDS, WRAPPERS, SGSpec, build_sg
from dni_dist.errors import ConfigError


def _shape_for(kind: str) -> tuple[int, ...]:
    return (4, 6, 6) if kind == "conv" else (12,)


@pytest.mark.parametrize("kind", SG_KINDS)
@pytest.mark.parametrize("wrapper", ["none", "sigmoid"])
@pytest.mark.parametrize("conditioned", [True, False])
def test_every_sg_starts_at_zero_and_keeps_the_shape(kind: str, wrapper: str, conditioned: bool) -> None:
    shape = _shape_for(kind)
    sg = build_sg(SGSpec(kind=kind, wrapper=wrapper, conditioned=conditioned, hidden=8, rank=3), shape, 5)
    h = torch.randn(7, *shape)
    y = torch.eye(5)[torch.randint(0, 5, (7,))]
    out = sg(h, y)
    assert out.shape == h.shape
    torch.testing.assert_close(out, torch.zeros_like(out))


def test_softmax_wrapped_linear_sg_represents_the_log_loss_gradient_exactly() -> None:
    # NOTES, "SG for log loss": with h the logits, softmax(h I) + y(-I) + 0 = dl/ds exactly.
    n = 6
    sg = build_sg(SGSpec(kind="linear", wrapper="softmax"), (n,), n)
    with torch.no_grad():
        sg.core.A.weight.copy_(torch.eye(n))
        sg.label.weight.copy_(-torch.eye(n))
        sg.bias.zero_()
    logits = torch.randn(9, n, requires_grad=True)
    y = torch.randint(0, n, (9,))
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    (true_grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(sg(logits.detach(), torch.eye(n)[y]), true_grad)


def test_linear_sg_is_h_a_plus_y_b_plus_c() -> None:
    sg = build_sg(SGSpec(kind="linear"), (3,), 2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sg.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    h, y = torch.randn(4, 3), torch.eye(2)[[0, 1, 1, 0]]
    expected = h @ sg.core.A.weight.T + y @ sg.label.weight.T + sg.bias
    torch.testing.assert_close(sg(h, y), expected)


def test_low_rank_sg_has_rank_r_and_fewer_parameters() -> None:
    full = build_sg(SGSpec(kind="linear", conditioned=False), (64,), 10)
    low = build_sg(SGSpec(kind="lowrank", rank=4, conditioned=False), (64,), 10)
    assert sum(p.numel() for p in low.parameters()) < sum(p.numel() for p in full.parameters()) / 4
    with torch.no_grad():
        low.core.V.weight.normal_()
    a = low.core.V.weight @ low.core.U.weight
    assert torch.linalg.matrix_rank(a) == 4


def test_scale_multiplies_the_output() -> None:
    plain = build_sg(SGSpec(kind="linear", scale=1.0), (3,), 2)
    scaled = build_sg(SGSpec(kind="linear", scale=0.5), (3,), 2)
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.bias.fill_(1.0)
        scaled.bias.fill_(1.0)
    h, y = torch.randn(2, 3), torch.eye(2)
    torch.testing.assert_close(scaled(h, y), 0.5 * plain(h, y))


def test_unconditioned_sg_ignores_labels() -> None:
    sg = build_sg(SGSpec(kind="mlp", conditioned=False, hidden=8), (5,), 3)
    with torch.no_grad():
        for p in sg.parameters():
            p.normal_()
    sg.eval()
    h = torch.randn(4, 5)
    torch.testing.assert_close(sg(h, torch.eye(3)[[0, 0, 1, 2]]), sg(h, torch.eye(3)[[2, 1, 0, 0]]))


def test_bad_specs_name_the_value() -> None:
    with pytest.raises(ConfigError, match=r"sg\.kind=.conv. needs a feature map"):
        build_sg(SGSpec(kind="conv"), (10,), 3)
    with pytest.raises(ConfigError, match=r"sg\.rank=99"):
        build_sg(SGSpec(kind="lowrank", rank=99), (10,), 3)
    with pytest.raises(ConfigError, match=r"sg\.kind=.cubic."):
        build_sg(SGSpec(kind="cubic"), (10,), 3)
    assert set(WRAPPERS) == {"none", "sigmoid", "softmax"}


def test_shape_mismatch_at_run_time_is_reported() -> None:
    sg = build_sg(SGSpec(), (10,), 3)
    with pytest.raises(ValueError, match=r"got \(2, 11\)"):
        sg(torch.zeros(2, 11), torch.zeros(2, 3))
