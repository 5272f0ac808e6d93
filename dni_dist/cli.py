"""``dni-dist``: the command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dni_dist.errors import ConfigError, RunFailed

EXIT_USAGE = 2

# CLI flag -> config key; each flag is shorthand for --set KEY=VALUE.
_FLAGS = {
    "method": "method",
    "segments": "segments",
    "runtime": "runtime",
    "transport": "transport",
    "dataset": "data.name",
    "data_dir": "data.path",
    "epochs": "epochs",
    "seed": "seed",
    "out": "out",
    "address": "dist.address",
    "schedule": "dist.schedule",
    "metrics_port": "metrics_port",
    "progress": "progress",
    "checkpoint_dir": "checkpoint.dir",
    "checkpoint_every": "checkpoint.every",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other bad input
        raise ConfigError(f"{message}; see `{self.prog} --help`")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dni-dist", description="Unlocked training with synthetic gradients.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model; writes OUT/summary.json and OUT/metrics.jsonl")
    train.add_argument("config", nargs="?", help="YAML config file (optional; flags and --set override it)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set sg.kind=mlp (repeatable)",
    )
    train.add_argument("--method", help="backprop | sg | sg-prop | fa | dfa | kickback")
    train.add_argument("--segments", help="number of segments K (K-1 cuts)")
    train.add_argument("--runtime", help="local (one process, lockstep) | ray (one actor per segment)")
    train.add_argument(
        "--transport", help="gloo (CPU) | nccl (one GPU per segment) | grpc | shm (one machine), for runtime=ray"
    )
    train.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    train.add_argument("--schedule", help="async (unlocked, default) | lockstep (the local engine's order)")
    train.add_argument("--dataset", help="digits | mnist | cifar10 | artificial | mnist1d | text | digits16")
    train.add_argument(
        "--data-dir", dest="data_dir", help="directory of mnist / cifar10 files; text: a text file or a directory"
    )
    train.add_argument("--epochs", help="training epochs")
    train.add_argument("--seed", help="random seed (data split, init, shuffling)")
    train.add_argument("--out", help="output directory (default runs/latest)")
    train.add_argument("--metrics-port", dest="metrics_port", help="serve Prometheus metrics on this port (0 = off)")
    train.add_argument("--progress", help="auto | bar | lines | off (auto: a bar on a terminal, else lines)")
    train.add_argument("--checkpoint-dir", dest="checkpoint_dir", help="write periodic checkpoints here")
    train.add_argument("--checkpoint-every", dest="checkpoint_every", help="steps between checkpoints (0 = per epoch)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    train.add_argument("--quiet", action="store_true", help="no per-epoch lines on stdout")
    train.add_argument(
        "--check", action="store_true", help="validate the config and plan the model on the data's shapes, then stop"
    )
    rep = sub.add_parser("reproduce", help="the paper's experiments as figures and JSON (local engine)")
    rep.add_argument(
        "name", help="artificial | loss-shape | curves | representations | family | stochastic-updates | all"
    )
    rep.add_argument("--quick", action="store_true", help="CI size: seconds to a minute each")
    rep.add_argument("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
    rep.add_argument("--data-dir", dest="data_dir", help="MNIST IDX directory for `curves` (default: digits)")
    rep.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, applied last, e.g. --set model.kind=resnet (repeatable)",
    )
    bench = sub.add_parser("bench", help="DNI vs backprop baselines, side by side in one run (Ray, gloo)")
    bench.add_argument("name", help="throughput | accuracy | links | scale | overhead")
    bench.add_argument(
        "--segments", action="append", default=[], metavar="K", help="actors K (repeatable or a comma list; default 2)"
    )
    bench.add_argument("--quick", action="store_true", help="CI size: a few seconds per method")
    bench.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    bench.add_argument("--dataset", help="accuracy: digits (default) | mnist1d | ... (as train's --dataset)")
    bench.add_argument("--target-accuracy", dest="target_accuracy", type=float, help="accuracy: the target")
    bench.add_argument("--max-epochs", dest="max_epochs", type=int, help="accuracy: epochs cap per method")
    bench.add_argument("--methods", help="comma list of methods (default: all)")
    bench.add_argument("--width", type=int, help="MLP width")
    bench.add_argument("--depth", type=int, help="MLP hidden layers")
    bench.add_argument("--batch-size", dest="batch_size", type=int, help="mini-batch size")
    bench.add_argument("--micro-batches", dest="micro_batches", type=int, help="gpipe/1f1b micro-batches (default 4)")
    bench.add_argument("--cpus-per-stage", dest="cpus_per_stage", type=float, help="CPUs per actor (default 1)")
    bench.add_argument("--windows", type=int, help="throughput: epochs timed per method, the first is warm-up")
    bench.add_argument(
        "--set",
        dest="settings",
        action="append",
        metavar="KEY=VALUE",
        help="config override for every method, e.g. --set sg.kind=lowrank (repeatable)",
    )
    return parser


_BENCH_OPTS = (
    "dataset",
    "target_accuracy",
    "max_epochs",
    "methods",
    "width",
    "depth",
    "batch_size",
    "micro_batches",
    "cpus_per_stage",
    "windows",
    "settings",
)


def _segments(values: list[str]) -> list[int]:
    out = []
    for text in ",".join(values).split(","):
        if not text.strip():
            continue
        try:
            out.append(int(text))
        except ValueError:
            raise ConfigError(f"--segments {text!r} must be an integer, e.g. --segments 2,4") from None
    return out  # empty: each benchmark's own default (2 for most, 4..64 for scale)


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dni_dist.bench import run_bench

    out = Path(args.out)
    opts = {k: getattr(args, k) for k in _BENCH_OPTS}
    run_bench(args.name, out, args.quick, _segments(args.segments), **opts)
    md = out / f"{args.name}.md"
    if md.exists():
        print(md.read_text(), end="")
    written = [f"{args.name}.{ext}" for ext in ("json", "md", "png") if (out / f"{args.name}.{ext}").exists()]
    print(f"wrote {', '.join(written)} in {out}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dni_dist.reproduce import reproduce

    out = Path(args.out)
    reproduce(
        args.name,
        out,
        args.quick,
        args.data_dir,
        progress=lambda n: print(f"reproducing {n} ...", flush=True),
        settings=tuple(args.settings),
    )
    written = "report.md and " if args.name in ("all", "report") else ""
    print(f"wrote {written}the JSON and PNG files in {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "bench":
            return _bench(args)
        from dni_dist.config import load_config  # imported late: --help stays instant

        overrides = [f"{key}={getattr(args, flag)}" for flag, key in _FLAGS.items() if getattr(args, flag) is not None]
        if args.resume:
            overrides.append("checkpoint.resume=true")
        config = load_config(args.config, overrides + args.overrides)
        if args.check:
            from dni_dist.operations.preflight import preflight

            print(f"config ok\n{preflight(config)}")
            return 0
        from dni_dist.runner import train

        summary = train(config, verbose=not args.quiet)
    except ConfigError as exc:
        message = str(exc).replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever the user typed
        print(f"dni-dist: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as exc:
        print(f"dni-dist: run failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dni-dist: interrupted", file=sys.stderr)
        return 130
    keys = ("method", "segments", "dataset", "test_accuracy", "perplexity", "samples_per_second", "wall_seconds")
    brief = {k: summary[k] for k in keys if k in summary}  # perplexity: language models only
    print(json.dumps(brief))
    print(f"wrote {config.out}/summary.json and {config.out}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
