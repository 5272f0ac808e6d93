"""Fused Adam's step with little Python around its kernel.

``torch.optim.Adam(fused=True).step()`` spends as long in Python (step hooks, the grad-mode
wrapper, per-parameter state checks, regrouping the tensors by device and dtype) as in its
one kernel on a small segment: 103 us against 51 us per step for a 256 x 256 layer on one CPU
core (benchmarks/RESULTS.md, "Issue 14, fourth round"). A stage steps two or three optimisers
per step, so on small segments that Python is a tenth of the stage's compute.

``step`` makes the same calls ``Adam.step`` makes for fused groups (count the step, run
``torch._fused_adam_`` or ``_fused_adamw_``, take the count back where ``found_inf`` says the
step was skipped) and nothing else. It only does so when nothing would differ: an Adam or
AdamW whose state exists (the first step goes through ``Adam.step``, which creates it), no
step hooks, fused groups without amsgrad, float hyper-parameters, every tensor of a group on
one device and dtype, dense gradients. Otherwise it returns False and the caller steps as
usual. tests/test_fused_adam.py holds it to bitwise equality with ``Adam.step``.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

# Optimiser classes whose step() is exactly Adam's: a subclass may change it.
_ADAMS = (torch.optim.Adam, torch.optim.AdamW)

_Lists = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> bool:
    """One Adam step on the parameters' ``.grad``, skipped on the device where ``found_inf``
    (a float tensor, 1 = skip) is set; then the gradients are set to None. Returns False,
    changing nothing, when the optimiser is not one this path can step exactly."""
    if type(optimizer) not in _ADAMS or _has_hooks(optimizer):
        return False
    groups = []
    for group in optimizer.param_groups:
        lists = _group_lists(optimizer, group)
        if lists is None:
            return False
        groups.append((group, lists))
    with torch.no_grad():  # in-place on leaf parameters, as Adam.step does under no_grad
        for group, (params, grads, exp_avgs, exp_avg_sqs, steps) in groups:
            if not params:
                continue
            flag = found_inf.to(params[0].device, torch.float32)
            beta1, beta2 = group["betas"]
            # In older torch AdamW was a class of its own and Adam's groups had no such key.
            decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
            kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
            torch._foreach_add_(steps, 1)
            kernel(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                grad_scale=None,
                found_inf=flag,
            )
            torch._foreach_sub_(steps, [flag] * len(steps))
            for p in params:
                p.grad = None
    return True


def _has_hooks(optimizer: torch.optim.Optimizer) -> bool:
    return bool(
        optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or _global_optimizer_pre_hooks
        or _global_optimizer_post_hooks
    )


def _group_lists(optimizer: torch.optim.Optimizer, group: dict) -> _Lists | None:
    """The group's tensors with gradients, as the kernel takes them, or None where this
    path would not match ``Adam.step``."""
    if not group["fused"] or group["amsgrad"] or group["differentiable"]:
        return None
    if not all(isinstance(v, float | int) for v in (group["lr"], *group["betas"], group["weight_decay"], group["eps"])):
        return None  # a tensor hyper-parameter: Adam.step reads or moves it; leave that to it
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        state = optimizer.state.get(p)
        if not state or "exp_avg" not in state:  # Adam.step creates the state
            return None
        if g.is_sparse or g.dtype != p.dtype or g.device != p.device or torch.is_complex(p):
            return None
        if params and (p.device != params[0].device or p.dtype != params[0].dtype):
            return None  # Adam.step would group these by device and dtype
        params.append(p)
        grads.append(g)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
    return params, grads, exp_avgs, exp_avg_sqs, steps
