"""Turn a TrainConfig into data and stages. Both engines build through here, so a stage
built inside a Ray actor is bit-for-bit the stage the local engine builds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from dni_dist.config import OptimConfig, TrainConfig
from dni_dist.core.cost import StepCosts, step_costs
from dni_dist.core.feedback import to_feedback_alignment
from dni_dist.core.methods import Boundary, build_boundary
from dni_dist.core.partition import balanced_cuts, param_count, partition
from dni_dist.core.stage import Stage
from dni_dist.core.staleness import StalenessPolicy
from dni_dist.core.synthetic import build_sg
from dni_dist.core.tasks import Task
from dni_dist.data import Dataset, load_dataset
from dni_dist.data.factory import load_from_factory
from dni_dist.errors import ConfigError
from dni_dist.models import MODEL_KINDS, build_model


def make_optimizer(
    params: list[nn.Parameter], cfg: OptimConfig, lr: float | None = None
) -> torch.optim.Optimizer | None:
    if not params:
        return None
    rate = cfg.lr if lr is None else lr
    # Fused: one kernel per step, and a non-finite step is skipped on the device (found_inf,
    # core/numerics.py) instead of read back to the host.
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.Adam(params, lr=rate, weight_decay=cfg.weight_decay, fused=True)


def load_data(config: TrainConfig) -> Dataset:
    d = config.data
    if d.factory:
        dataset = load_from_factory(d.factory, d.kwargs)
    else:
        dataset = load_dataset(
            d.name,
            config.seed,
            d.path,
            d.download,
            d.task,
            d.dim,
            d.labels,
            d.samples,
            d.outputs,
            d.grid,
            context=d.context,
            max_bytes=d.max_bytes,
        )
    return with_loss(config, dataset)


def with_loss(config: TrainConfig, dataset: Dataset) -> Dataset:
    """``dataset`` with the loss ``data.loss`` and the method ask for."""
    loss = config.data.loss
    # Softmax errors sum to zero per example, so Kickback's signal e 1^T vanishes under log
    # loss (only round-off is left, which Adam amplifies into drift). Its paper used a
    # squared error; that is what the automatic choice picks for it.
    one_hot = dataset.task.kind in ("classification", "language_model")
    degenerate = config.method == "kickback" and one_hot and dataset.task.n_outputs > 1
    if degenerate and loss == "log":
        raise ConfigError(
            "method=kickback with data.loss=log gives a zero signal (softmax errors sum to zero); "
            "use data.loss=mse or leave data.loss unset"
        )
    if degenerate and not loss:
        loss = "mse"
    if loss:
        dataset.task = dataclasses.replace(dataset.task, loss_name=loss)
    return dataset


@dataclass
class Plan:
    """The segments of the model and the activation shape at each cut."""

    segments: list[nn.Sequential]
    cut_shapes: list[tuple[int, ...]]


def plan_model(config: TrainConfig, input_shape: tuple[int, ...], task: Task) -> Plan:
    torch.manual_seed(config.seed)
    m = config.model
    # Token models and token data go together: a transformer reads integer tokens and
    # predicts one per position; the other zoo models read real-valued inputs.
    if not m.factory and (m.kind == "transformer") != task.per_token and m.kind in MODEL_KINDS:
        raise ConfigError(
            f"model.kind={m.kind!r} does not fit a {task.kind} task; "
            + (
                "use a language-modelling set (data.name=text)"
                if m.kind == "transformer"
                else "use model.kind=transformer"
            )
        )
    model = build_model(m, input_shape, task.n_outputs)
    if config.method == "fa":
        to_feedback_alignment(model, seed=config.seed + 7)
    n_blocks = len(model)
    if config.segments > n_blocks + (config.cuts is not None):
        model_name = f"model.factory={m.factory!r}" if m.factory else f"model.kind={m.kind!r} with depth {m.depth}"
        raise ConfigError(
            f"segments={config.segments} is impossible: {model_name} has {n_blocks} "
            f"blocks; use segments <= {n_blocks} or a deeper model"
        )
    cuts = config.cuts if config.cuts is not None else balance_cuts(config, model, input_shape, task)
    segments = partition(model, config.segments, cuts)
    shapes = []
    with torch.no_grad():
        h = torch.zeros(2, *input_shape)
        for seg in segments[:-1]:
            seg.eval()
            h = seg(h)
            shapes.append(tuple(h.shape[1:]))
    return Plan(segments, shapes)


def balance_cuts(config: TrainConfig, model: nn.Sequential, input_shape: tuple[int, ...], task: Task) -> list[int]:
    """The cuts ``config.balance`` asks for: FLOPs per step including each stage's boundary
    (core/cost.py), or parameter counts. Deterministic, so every actor plans the same cuts."""
    blocks = list(model.children())
    if config.balance == "params" or config.segments == 1:
        return balanced_cuts([param_count(b) for b in blocks], config.segments)
    costs = count_costs(config, blocks, input_shape, task)
    try:
        return balanced_cuts(costs.top, config.segments, after=costs.after, below=costs.below)
    except ConfigError:
        # No split avoids every cut where the boundary cannot be built: plan by parameters,
        # so that building the stages names the cut and what is wrong with it.
        return balanced_cuts([param_count(b) for b in blocks], config.segments)


def count_costs(config: TrainConfig, blocks: list[nn.Module], input_shape: tuple[int, ...], task: Task) -> StepCosts:
    """FLOPs per step of each block and of the boundary at each possible cut, for this run."""
    # Counting builds an SG per candidate cut; its initialisation must not move the random
    # stream the stages are built from, or balance=cost would change the run beyond its cuts.
    with torch.random.fork_rng(devices=[]):
        return step_costs(
            blocks,
            input_shape,
            config.data.batch_size,
            task,
            lambda k, shape: make_boundary(config, task, k, shape),
            config.sg.refresh,
        )


def make_boundary(config: TrainConfig, task: Task, k: int, shape: tuple[int, ...]) -> Boundary:
    """The boundary at cut k + 1 (owned by stage k), for activations of ``shape``."""
    sg = None
    if config.method in ("sg", "sg-prop"):
        sg = build_sg(config.sg, shape, task.context_dim, where=f"cut {k + 1}", positions=task.positions)
    return build_boundary(
        config.method,
        sg,
        shape,
        task.n_outputs,
        config.seed * 31 + k,
        config.sg_prop_alpha,
        config.fdg_shrink,
        positions=task.positions,
    )


def build_stages(config: TrainConfig, input_shape: tuple[int, ...], task: Task, only: int | None = None) -> list[Stage]:
    """All stages (or just stage ``only``, for an actor); deterministic in ``config.seed``."""
    plan = plan_model(config, input_shape, task)
    k_total = config.segments
    stages = []
    for k, segment in enumerate(plan.segments):
        torch.manual_seed(config.seed * 7919 + 101 * k)  # SG init depends on (seed, cut) only
        boundary = None
        sg_optimizer = None
        if k < k_total - 1:
            boundary = make_boundary(config, task, k, plan.cut_shapes[k])
            sg_optimizer = make_optimizer(list(boundary.parameters()), config.optim, lr=config.sg.lr)
            if config.dist.micro_batches > 1 and (not boundary.update_locked or boundary.runs_ahead):
                raise ConfigError(
                    f"dist.micro_batches={config.dist.micro_batches} is pipelined backprop for locked methods; "
                    f"method={config.method} updates without waiting, use dist.micro_batches=1"
                )
        if only is not None and k != only:
            continue
        stages.append(
            Stage(
                index=k,
                num_stages=k_total,
                module=segment,
                boundary=boundary,
                task=task,
                optimizer=make_optimizer(list(segment.parameters()), config.optim),
                sg_optimizer=sg_optimizer,
                target_mode=config.sg.target,
                target_lambda=config.sg.target_lambda,
                update_prob=config.update_prob,
                window=config.sg.window,
                seed=config.seed,
                direct_error=config.method in ("dfa", "kickback"),
                nan_limit=config.nan_limit,
                sg_clip=config.sg.clip,
                micro_batches=config.dist.micro_batches,
                staleness=StalenessPolicy(config.sg.refresh, config.sg.gate, config.sg.delay_lr),
                precision=config.precision,
                stash_versions=config.stash_versions,
            )
        )
    return stages
