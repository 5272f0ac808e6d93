"""Turn a TrainConfig into data and stages. Both engines build through here, so a stage
built inside a Ray actor is bit-for-bit the stage the local engine builds."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from dni_dist.config import OptimConfig, TrainConfig
from dni_dist.core.cost import StepCosts, block_costs, step_costs
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
from dni_dist.models.reinit import block_seed, materialise_block


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
    """The segments of the model, the activation shape at each cut and the cuts (block indices).

    ``on_meta``: the segments are shapes only, on PyTorch's meta device (``plan_layout``);
    ``real_segments`` gives the stages their real ones. Otherwise they are real CPU modules: a model
    that cannot be planned on meta, or ``plan_model``'s."""

    segments: list[nn.Sequential]
    cut_shapes: list[tuple[int, ...]]
    cuts: list[int] = field(default_factory=list)
    on_meta: bool = False

    @property
    def device(self) -> str:
        """Where the plan's segments live, so that a pass over them (costs, memory) runs there."""
        return "meta" if self.on_meta else "cpu"


def plan_model(config: TrainConfig, input_shape: tuple[int, ...], task: Task) -> Plan:
    """The plan with every segment real, initialised as the stages are (``real_segments``)."""
    plan = plan_layout(config, input_shape, task)
    segments = real_segments(config, input_shape, task, plan, list(range(len(plan.segments))))
    return Plan(list(segments.values()), plan.cut_shapes, plan.cuts, on_meta=False)


def plan_layout(config: TrainConfig, input_shape: tuple[int, ...], task: Task) -> Plan:
    """Cuts and cut shapes, planned on the meta device: no parameter memory, whatever the
    model's size, so every actor can plan the whole model and build only its own segment.

    A factory's model with an op the meta device cannot run (data-dependent Python in a
    block's forward, ``.item()``, an op without a meta kernel) is planned on the CPU instead:
    built whole, as before. Deterministic, so every process takes the same branch."""
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
    try:
        with torch.device("meta"):
            return _plan(config, build_model(m, input_shape, task.n_outputs), input_shape, task, on_meta=True)
    except Exception:
        # The zoo runs on meta (tested): a failure there is a fault to see, not to hide. A
        # factory's block may not (an op without a meta kernel, .item()), or its own checks
        # fail on meta only (models/factory.py): the CPU runs it, or names the real fault.
        if not m.factory:
            raise
    torch.manual_seed(config.seed)
    with torch.device("cpu"):
        model = build_model(m, input_shape, task.n_outputs)
        try:
            return _plan(config, model, input_shape, task, on_meta=False)
        except ConfigError:
            raise
        except Exception as exc:  # the user's block fails on real zeros too (its backward, say)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"model.factory={m.factory!r}: a forward and backward pass of zeros through the model failed "
                f"on the CPU with {type(exc).__name__}: {first}"
            ) from None


def _plan(config: TrainConfig, model: nn.Sequential, input_shape: tuple[int, ...], task: Task, on_meta: bool) -> Plan:
    device = "meta" if on_meta else "cpu"
    n_blocks = len(model)
    if config.segments > n_blocks + (config.cuts is not None):
        m = config.model
        model_name = f"model.factory={m.factory!r}" if m.factory else f"model.kind={m.kind!r} with depth {m.depth}"
        raise ConfigError(
            f"segments={config.segments} is impossible: {model_name} has {n_blocks} "
            f"blocks; use segments <= {n_blocks} or a deeper model"
        )
    if on_meta and (config.cuts is not None or config.balance == "params" or config.segments == 1):
        # Costs are not counted here, but every block must run forward and backward on meta
        # (the memory estimate and --check do): find out now, while the CPU can still take over.
        block_costs(list(model), input_shape, 2, device)
    cuts = config.cuts if config.cuts is not None else balance_cuts(config, model, input_shape, task, device)
    segments = partition(model, config.segments, cuts)
    shapes = []
    with torch.no_grad():
        h = torch.zeros(2, *input_shape, device=device)
        for seg in segments[:-1]:
            seg.eval()
            h = seg(h)
            shapes.append(tuple(h.shape[1:]))
    sizes = [len(seg) for seg in segments]
    return Plan(segments, shapes, [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)], on_meta)


def real_segments(
    config: TrainConfig, input_shape: tuple[int, ...], task: Task, plan: Plan, wanted: list[int]
) -> dict[int, nn.Sequential]:
    """Segments ``wanted`` with real CPU storage and their initial weights, the same in
    whichever process builds them and whichever other segments it builds.

    A zoo model materialises only these segments' blocks, each from its own seed
    (models/reinit.py). A factory's model is built whole under ``config.seed`` (once): its
    function may set weights by hand, which re-initialising would undo (docs/user-code.md)."""
    starts = [0, *plan.cuts]
    if not plan.on_meta:
        segments = {k: plan.segments[k] for k in wanted}
    elif config.model.factory:
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(config.seed)
            model = build_model(config.model, input_shape, task.n_outputs)
        every = partition(model, config.segments, plan.cuts)
        segments = {k: every[k] for k in wanted}
    else:
        segments = {
            k: nn.Sequential(
                *(
                    materialise_block(copy.deepcopy(block), block_seed(config.seed, starts[k] + i))
                    for i, block in enumerate(plan.segments[k])
                )
            )
            for k in wanted
        }
    if config.method == "fa":
        for k, segment in segments.items():
            for i in range(len(segment)):
                segment[i] = _feedback_block(segment[i], block_seed(config.seed * 31 + 7, starts[k] + i))
    return segments


def _feedback_block(block: nn.Module, seed: int) -> nn.Module:
    """``block`` with every Linear/Conv2d swapped for its feedback-alignment twin, the fixed
    feedback drawn from ``seed`` alone (a block that is itself a layer is swapped too)."""
    holder = nn.Sequential(block)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        to_feedback_alignment(holder, seed=seed)
    return holder[0]


def balance_cuts(
    config: TrainConfig, model: nn.Sequential, input_shape: tuple[int, ...], task: Task, device: str = "meta"
) -> list[int]:
    """The cuts ``config.balance`` asks for: FLOPs per step including each stage's boundary
    (core/cost.py), or parameter counts. Deterministic, so every actor plans the same cuts."""
    blocks = list(model.children())
    if config.balance == "params" or config.segments == 1:
        return balanced_cuts([param_count(b) for b in blocks], config.segments)
    costs = count_costs(config, blocks, input_shape, task, device)
    try:
        return balanced_cuts(costs.top, config.segments, after=costs.after, below=costs.below)
    except ConfigError:
        # No split avoids every cut where the boundary cannot be built: plan by parameters,
        # so that building the stages names the cut and what is wrong with it.
        return balanced_cuts([param_count(b) for b in blocks], config.segments)


def count_costs(
    config: TrainConfig, blocks: list[nn.Module], input_shape: tuple[int, ...], task: Task, device: str = "meta"
) -> StepCosts:
    """FLOPs per step of each block and of the boundary at each possible cut, for this run;
    the blocks run on ``device`` (meta, or the CPU for a model planned there)."""
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
            device,
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
    """All stages (or just stage ``only``, for an actor); deterministic in ``config.seed``.
    The model is planned on the meta device and only the stages asked for get real storage,
    with the weights the local engine's stages get (``real_segments``)."""
    plan = plan_layout(config, input_shape, task)
    k_total = config.segments
    segments = real_segments(config, input_shape, task, plan, list(range(k_total)) if only is None else [only])
    stages = []
    for k in range(k_total):
        wanted = only is None or k == only
        torch.manual_seed(config.seed * 7919 + 101 * k)  # SG init depends on (seed, cut) only
        boundary = None
        sg_optimizer = None
        if k < k_total - 1:
            # Another stage's boundary is built only to check it, on meta (no storage).
            with torch.device("cpu" if wanted else "meta"):
                boundary = make_boundary(config, task, k, plan.cut_shapes[k])
            if config.dist.micro_batches > 1 and (not boundary.update_locked or boundary.runs_ahead):
                raise ConfigError(
                    f"dist.micro_batches={config.dist.micro_batches} is pipelined backprop for locked methods; "
                    f"method={config.method} updates without waiting, use dist.micro_batches=1"
                )
        if not wanted:
            continue
        if boundary is not None:
            sg_optimizer = make_optimizer(list(boundary.parameters()), config.optim, lr=config.sg.lr)
        segment = segments[k]
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
                staleness=StalenessPolicy(config.sg.refresh, config.sg.gate, config.sg.delay_lr, config.sg.reuse_lag),
                precision=config.precision,
                stash_versions=config.stash_versions,
            )
        )
    return stages
