"""Scale model: predict samples/s of DNI and the backprop baselines for K stages.

    python -m dni_dist.bench.scale [--quick] [--out DIR] [--segments 4 8 16 32 64]

1. Measure (``scale_measure``): per-stage costs of a model cut into 1 and 2 stages, timed
   through the project's ``Stage`` with one torch thread, and the gloo link between two
   processes. ``quick`` times fewer repeats and takes the link as a stated assumption.
2. Validate: simulate (``scale_sim``) what the Ray engine should do for K=1 and K=2 and
   measure it (``runner.train``, runtime=ray, transport=gloo, one CPU per stage);
   report predicted vs measured. A second prediction rescales each stage's costs to the
   compute seconds per step the engine recorded in that run: it checks the schedule model
   (overlap, in-flight cap, link) apart from the drift of the cost measurement on a
   shared machine (it cannot catch cost errors, only scheduling ones). ``quick`` skips
   the Ray runs.
3. Predict K stages on a GPU cluster from a stated model and hardware (``ClusterModel``,
   ``cluster_profile``): every number that goes in is written to scale.json.

The simulator's assumptions are in ``scale_sim``'s docstring. Writes OUT/scale.json,
OUT/scale.md and OUT/scale.png (speed-up over one device vs K, log2 axis).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dni_dist.bench.scale_measure import measure_costs, measure_link
from dni_dist.bench.scale_sim import (
    Link,
    Profile,
    StageCosts,
    ddp_samples_per_second,
    dni_in_flight,
    simulate,
    steady_samples_per_second,
)
from dni_dist.core.pending import GPU_PENDING_FRACTION, auto_in_flight

# The measured model: an MLP of 4 hidden layers of 1024 units on 64 inputs (the size of
# digits' 8x8 images; artificial data so an epoch has many batches), batch 256.
VALIDATION_MODEL = [
    "data.name=artificial",
    "data.dim=64",
    "data.outputs=2",
    "data.samples=12800",
    "data.batch_size=256",
    "model.depth=4",
    "model.width=1024",
]
VALIDATION_EPOCHS = 3
# Used only with quick=True, where no link is timed: an assumption, marked as one in the JSON.
ASSUMED_LOOPBACK = Link(latency_s=1e-3, bandwidth_Bps=1e9)


@dataclass(frozen=True)
class ClusterModel:
    """A concrete model for the cluster prediction: ``blocks`` transformer-block-sized MLP
    segments (12 d^2 parameters each: the four attention projections and a 4x MLP; the
    attention-score FLOPs are left out), bf16, cut evenly into K stages."""

    blocks: int = 64
    d_model: int = 2048
    tokens_per_batch: int = 8 * 2048  # 8 sequences of 2048 tokens
    sequences_per_batch: int = 8
    bytes_per_value: int = 2  # bf16 activations, gradients and weights
    achieved_flops: float = 400e12  # H100/H200 bf16 dense peak ~989 TFLOP/s; ~40% achieved
    hbm_Bps: float = 3.0e12  # achieved HBM bandwidth (H100 3.35 TB/s peak, H200 4.8)
    optimizer_bytes_per_param: int = 16  # Adam step: fp32 master, m, v, grad read/written
    sg_params: str = "linear d x d per token (the DNI paper's linear SG)"
    # Values per token a block's graph saves for its backward, in units of d: the inputs of
    # the attention's input and output projections (2) and of the MLP's up projection (1),
    # the MLP's 4d hidden before and after its nonlinearity (8). Attention scores left out.
    saved_per_block: int = 11
    device_memory_bytes: int = 141 * 10**9  # H200 (an H100 has 80 GB)

    def pending_memory(self) -> int:
        """dist.pending_memory's default on this GPU (core/pending.py)."""
        return int(self.device_memory_bytes * GPU_PENDING_FRACTION)

    def costs(self, stages: int, target_mode: str = "true") -> list[StageCosts]:
        """Per-stage costs of DNI with ``target_mode`` SG targets (and of backprop)."""
        d, t = self.d_model, self.tokens_per_batch
        params = 12 * d * d * self.blocks / stages
        matmul = 2 * params * t / self.achieved_flops  # one pass: forward, dW or dX each
        optim = params * self.optimizer_bytes_per_param / self.hbm_Bps
        stash = params * self.bytes_per_value / self.hbm_Bps  # weight stashing copies the weights
        sg_pass = 2 * d * d * t / self.achieved_flops
        sg_optim = d * d * self.optimizer_bytes_per_param / self.hbm_Bps
        act = t * d * self.bytes_per_value
        graph = self.saved_per_block * act * self.blocks // stages
        out = []
        for k in range(stages):
            true_part = k > 0 and target_mode != "bootstrap"  # passes the true gradient down (dX), stashes
            sends_bootstrap = k > 0 and target_mode != "true"  # its input gradient (dX) right after the update
            # A waiting step keeps x and h; a stashing stage also its graph and the weight copies,
            # a lambda stage the bootstrap target until the true one comes.
            held = 2 * act + (graph + int(params * self.bytes_per_value) if true_part else 0)
            held += act if sends_bootstrap and true_part else 0
            out.append(
                StageCosts(
                    forward_s=matmul,
                    backward_s=2 * matmul + optim,  # dW + dX + Adam
                    # SG forward, dW through the segment (and dX for a bootstrap target), Adam
                    sg_s=sg_pass + matmul + optim + (matmul if sends_bootstrap else 0.0),
                    # SG forward + its dW, Adam (and the true gradient on down)
                    sg_train_s=2 * sg_pass + sg_optim + (matmul if true_part else 0.0),
                    activation_bytes=act,
                    grad_bytes=act,
                    param_bytes=int(params * self.bytes_per_value),
                    dni_forward_s=matmul + (stash if true_part else 0.0),
                    pending_bytes=held,
                )
            )
        return out


# The stage counts the cluster prediction covers when none are given.
CLUSTER_SEGMENTS: tuple[int, ...] = (4, 8, 16, 32, 64)


def cluster_profile() -> Profile:
    """8 GPUs per node on NVLink, nodes on InfiniBand NDR; latencies include software."""
    return Profile(
        name="H100/H200-class cluster: NVLink in a node (8 GPUs), InfiniBand NDR 400 Gb/s across",
        speed=1.0,  # ClusterModel gives the GPU's own times
        intra=Link(latency_s=5e-6, bandwidth_Bps=450e9),  # NVLink 4: ~450 GB/s per direction per GPU
        inter=Link(latency_s=10e-6, bandwidth_Bps=50e9),  # 400 Gb/s NIC; ~2-5 us wire + NCCL/host overhead
        devices_per_node=8,
    )


# ------------------------------------------------------------------ validation
def _train_ray(overrides: list[str], epochs: int) -> dict[str, Any]:
    from dni_dist.config import load_config
    from dni_dist.runner import train

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            overrides=[
                *overrides,
                "runtime=ray",
                "transport=gloo",
                "dist.cpus_per_stage=1",  # one torch thread per actor, as measured
                f"epochs={epochs}",
                "log_every=1000000",
                f"out={out}",
            ]
        )
        return train(cfg)


def rescale_to_run(costs: list[StageCosts], stages: list[dict[str, Any]], unlocked: bool) -> list[StageCosts]:
    """Costs scaled per stage so one step's tasks add up to the compute seconds per step the
    engine recorded in a run (``summary["stages"]``): the in-process split between tasks,
    the run's level. It separates the schedule model's error from cost-measurement drift
    (a busy machine, other processes on the same cores)."""
    out = []
    for i, (c, stage) in enumerate(zip(costs, stages, strict=True)):
        top = i == len(costs) - 1
        modelled = c.dni_forward + c.sg_s + c.sg_train_s if unlocked and not top else c.forward_s + c.backward_s
        f = stage["compute_seconds"] / stage["steps"] / modelled
        out.append(
            dataclasses.replace(
                c,
                forward_s=c.forward_s * f,
                backward_s=c.backward_s * f,
                sg_s=c.sg_s * f,
                sg_train_s=c.sg_train_s * f,
                dni_forward_s=c.dni_forward * f,
            )
        )
    return out


def _steps_per_epoch(model: list[str]) -> int:
    from dni_dist.builder import load_data
    from dni_dist.config import load_config

    cfg = load_config(overrides=model)
    return len(load_data(cfg).x_train) // cfg.data.batch_size


def validate(
    model: list[str], quick: bool, repeats: int = 10, epochs: int = VALIDATION_EPOCHS
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predicted (and, unless quick, measured) samples/s for K=1 and K=2 on this machine."""
    from dni_dist.config import load_config

    batch = load_config(overrides=model).data.batch_size
    steps = _steps_per_epoch(model)
    link: Link | None = None
    link_raw: dict[str, Any] = {}
    case_costs: list[list[StageCosts]] = []
    rows = []
    for k, sim_method, method in (1, "backprop", "backprop"), (2, "backprop", "backprop"), (2, "dni", "sg"):
        # Costs are timed again right before each run: the load on a shared machine drifts.
        costs = measure_costs([*model, f"segments={k}"], repeats=repeats)
        case_costs.append(costs)
        if link is None and k > 1:
            link, link_raw = (ASSUMED_LOOPBACK, {"assumed": True}) if quick else measure_link(costs[0].activation_bytes)
        profile = Profile(name="this machine (gloo on loopback)", intra=link or Link(), inter=link or Link())
        predicted = simulate(sim_method, costs, batch, steps, profile).samples_per_second  # the default limit
        row: dict[str, Any] = {"segments": k, "method": method, "predicted": predicted, "measured": None, "error": None}
        if not quick:
            summary = _train_ray([*model, f"segments={k}", f"method={method}"], epochs)
            measured = row["measured"] = float(summary["samples_per_second"])
            row["error"] = (predicted - measured) / measured
            in_run = rescale_to_run(costs, summary["stages"], unlocked=sim_method == "dni")
            row["predicted_in_run_costs"] = simulate(sim_method, in_run, batch, steps, profile).samples_per_second
            row["error_in_run_costs"] = (row["predicted_in_run_costs"] - measured) / measured
            row["in_run_compute_per_step_s"] = [st["compute_seconds"] / st["steps"] for st in summary["stages"]]
        rows.append(row)
    inputs = {
        "model": model,
        "batch": batch,
        "steps_per_epoch": steps,
        "epochs_measured": None if quick else epochs,
        "torch_threads": 1,
        "max_in_flight": auto_in_flight(2, "true"),  # the default (0 = auto) at K=2, true targets
        "costs_per_case": [[dataclasses.asdict(c) for c in v] for v in case_costs],
        # JSON has no infinity: an unresolved bandwidth is written as null
        "link": _link_json(link),
        "link_measurement": link_raw,
    }
    return rows, inputs


def _link_json(link: Link | None) -> dict[str, float | None] | None:
    if link is None:
        return None
    return {
        "latency_s": link.latency_s,
        "bandwidth_Bps": link.bandwidth_Bps if math.isfinite(link.bandwidth_Bps) else None,
    }


# ------------------------------------------------------------------ prediction
def predict_cluster(segments: list[int], model: ClusterModel, profile: Profile) -> dict[str, Any]:
    """samples/s and speed-up over one device for each method and K."""
    batch = model.sequences_per_batch
    methods: dict[str, dict[str, Any]] = {}
    budget = model.pending_memory()
    for k in segments:
        costs = model.costs(k)
        whole = sum(c.forward_s + c.backward_s for c in costs)  # the same work on one device
        one = batch / whole

        steps = 4 * k + 32  # enough to reach the steady state; the fill cancels out

        def default(mode: str, k: int = k, steps: int = steps) -> float:
            """DNI as configured by default (dist.max_in_flight=0, dist.pending_memory=0)."""
            c = model.costs(k, mode)
            return steady_samples_per_second(
                "dni", c, batch, steps, profile=profile, target_mode=mode, pending_memory=budget
            )

        runs = {
            "backprop": steady_samples_per_second("backprop", costs, batch, steps, profile=profile),
            "dni": default("true"),
            "dni_bootstrap": default("bootstrap"),
            "dni_lambda": default("lambda"),
            "dni_inflight2": steady_samples_per_second("dni", costs, batch, steps, profile=profile, max_in_flight=2),
            "dni_inflight2K": steady_samples_per_second(
                "dni", costs, batch, steps, profile=profile, max_in_flight=2 * k
            ),
            "gpipe_M4K": steady_samples_per_second("gpipe", costs, batch, 8 * k, profile=profile, micro_batches=4 * k),
            "1f1b": steady_samples_per_second("1f1b", costs, batch, steps, profile=profile, in_flight=k),
            "ddp": ddp_samples_per_second(costs, k, batch, profile, overlap=True),
        }
        for name, rate in runs.items():
            methods.setdefault(name, {})[str(k)] = {"samples_per_second": rate, "speedup": rate / one}
        methods.setdefault("one_device", {})[str(k)] = {"samples_per_second": one, "speedup": 1.0}
    return methods


def default_in_flight(segments: list[int], model: ClusterModel) -> dict[str, Any]:
    """Per K and target mode: stage 0's default in-flight limit (and what set it), what a
    waiting step holds at stages 0 and 1, and how many waiting steps the budget lets stage 1
    keep (it holds its next input beyond that)."""
    out: dict[str, Any] = {}
    budget = model.pending_memory()
    for k in segments:
        for mode in ("true", "bootstrap", "lambda"):
            costs = model.costs(k, mode)
            limit, bound = dni_in_flight(costs, mode, pending_memory=budget)
            above = costs[1].pending_bytes if k > 2 else 0
            out.setdefault(str(k), {})[mode] = {
                "in_flight_limit": limit,
                "in_flight_bound": bound,
                "pending_memory": budget,
                "pending_step_bytes": [costs[0].pending_bytes, above],
                "stage1_pending_step_limit": budget // above if above else None,
            }
    return out


METHOD_LABELS = {
    "dni": "DNI default (sg, true targets, max_in_flight auto)",
    "dni_bootstrap": "DNI default, sg.target=bootstrap",
    "dni_lambda": "DNI default, sg.target=lambda",
    "backprop": "naive model-parallel backprop",
    "dni_inflight2": "DNI (sg, max_in_flight=2, memory not bounded)",
    "dni_inflight2K": "DNI (sg, max_in_flight=2K, memory not bounded)",
    "gpipe_M4K": "GPipe (M=4K micro-batches, flush)",
    "1f1b": "1F1B steady state (K in flight)",
    "ddp": "DDP (ring allreduce, overlapped)",
}


# ---------------------------------------------------------------------- output
def _markdown(result: dict[str, Any]) -> str:
    lines = ["# Scale model", "", "## Validation on this machine (samples/s)", ""]
    lines += [
        "| K | method | predicted | measured | error | predicted, in-run costs | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["validation"]:
        cells = [f"{r['predicted']:.0f}"]
        for key, fmt in (
            ("measured", "{:.0f}"),
            ("error", "{:+.1%}"),
            ("predicted_in_run_costs", "{:.0f}"),
            ("error_in_run_costs", "{:+.1%}"),
        ):
            value = r.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append(f"| {r['segments']} | {r['method']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "predicted: from costs timed in-process before the runs; in-run costs: the same split of",
        "each stage's step into tasks, scaled to the compute seconds per step the engine recorded.",
    ]
    ks = result["segments"]
    lines += ["", f"## Predicted speed-up over one device: {result['profile']['name']}", ""]
    lines += ["| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, label in METHOD_LABELS.items():
        cells = " | ".join(f"{result['predictions'][name][str(k)]['speedup']:.2f}x" for k in ks)
        lines.append(f"| {label} | {cells} |")
    if "8" in result["predictions"]["dni"]:
        checks = result["checks"]
        lines += ["", f"DNI default at K=8 >= 7.2x one device: {checks['dni_default_k8_at_least_7.2x']}; "]
        lines[-1] += f"ahead of 1F1B: {checks['dni_default_k8_ahead_of_1f1b']}; "
        lines[-1] += f"with max_in_flight=2K >= 7.2x: {checks['dni_k8_at_least_7.2x']}"
    lines += ["", "Default in-flight limit at stage 0 (K for true and lambda targets, 2 for bootstrap), and"]
    lines += ["stage 1 with true targets: bytes per waiting step, waiting steps its budget allows:", ""]
    lines += ["| K | true | bootstrap | lambda | stage 1 (true) |", "|---|---|---|---|---|"]
    for k in ks:
        row = result["dni_default_in_flight"][str(k)]
        cells = " | ".join(f"{row[m]['in_flight_limit']} ({row[m]['in_flight_bound']})" for m in row)
        one = row["true"]
        stage1 = "-" if one["stage1_pending_step_limit"] is None else f"{one['pending_step_bytes'][1] / 1e9:.1f} GB, "
        stage1 += "" if one["stage1_pending_step_limit"] is None else str(one["stage1_pending_step_limit"])
        lines.append(f"| {k} | {cells} | {stage1} |")
    lines += ["", "Inputs (cluster model, profile, measured costs) are in scale.json; assumptions in "]
    lines += ["`dni_dist/bench/scale_sim.py`.", ""]
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = result["segments"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(ks, ks, color="grey", linestyle=":", label="ideal (K x)")
    for name, label in METHOD_LABELS.items():
        ax.plot(ks, [result["predictions"][name][str(k)]["speedup"] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    powers = [2**i for i in range(max(ks).bit_length())]
    ax.set_yticks(powers, [str(p) for p in powers])
    ax.set_xlabel("stages / devices K")
    ax.set_ylabel("speed-up over one device")
    ax.set_title("Predicted scaling (GPU-cluster profile)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out: Path, quick: bool, segments: list[int]) -> dict[str, Any]:
    """Measure, validate (Ray runs unless quick), predict; write scale.json/.md/.png."""
    segments = segments or list(CLUSTER_SEGMENTS)
    if any(k < 1 for k in segments):
        from dni_dist.errors import ConfigError

        raise ConfigError(f"segments={segments} must be one or more stage counts >= 1")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    segments = sorted(set(segments))
    validation, measured_inputs = validate(VALIDATION_MODEL, quick, repeats=3 if quick else 10)
    model, profile = ClusterModel(), cluster_profile()
    predictions = predict_cluster(segments, model, profile)
    result: dict[str, Any] = {
        "quick": quick,
        "segments": segments,
        "validation": validation,
        "validation_inputs": measured_inputs,
        "cluster_model": dataclasses.asdict(model),
        "profile": dataclasses.asdict(profile),
        "methods": METHOD_LABELS,
        "predictions": predictions,
        "dni_default_in_flight": default_in_flight(segments, model),
        "checks": {},
    }
    if 8 in segments:
        at8 = {name: rates["8"]["speedup"] for name, rates in predictions.items()}
        result["checks"]["dni_k8_at_least_7.2x"] = at8["dni_inflight2K"] >= 7.2
        result["checks"]["dni_default_k8_at_least_7.2x"] = at8["dni"] >= 7.2
        result["checks"]["dni_default_k8_ahead_of_1f1b"] = at8["dni"] > at8["1f1b"]
    for key, check in (("error", "validation_within_15pct"), ("error_in_run_costs", "validation_in_run_within_15pct")):
        errors = [abs(r[key]) for r in validation if r.get(key) is not None]
        if errors:
            result["checks"][check] = max(errors) <= 0.15
    result["seconds"] = time.perf_counter() - started
    (out / "scale.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    (out / "scale.md").write_text(_markdown(result))
    _plot(result, out / "scale.png")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/scale")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--segments", type=int, nargs="+", default=list(CLUSTER_SEGMENTS))
    args = parser.parse_args()
    result = run(Path(args.out), args.quick, args.segments)
    print(_markdown(result))


if __name__ == "__main__":
    main()
