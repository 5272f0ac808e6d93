"""The backprop baselines a user would otherwise pick, in plain torch inside Ray actors:

- ``backprop-1core``: the whole model in one actor with ONE actor's CPUs (cpus_per_stage):
  "one device" in the GPU sense;
- ``backprop-1dev``: the whole model in one actor with K x cpus_per_stage CPUs and as many
  torch threads (the CPUs the K actors get together);
- ``gpipe`` / ``1f1b``: ``torch.distributed.pipelining`` over K actors on gloo, each
  holding its slice of the same ``nn.Sequential``, M micro-batches per step;
- ``ddp``: DistributedDataParallel over K actors on gloo, each taking batch/K of the same
  global batch.

Every variant steps Adam once per mini-batch, on the batches ``data.batches`` yields.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import nn

from dni_dist.builder import load_data, make_optimizer, plan_model
from dni_dist.config import TrainConfig
from dni_dist.data import batches
from dni_dist.transports.torch_dist import free_port


class TorchWorker:
    """One process of a baseline (wrapped with ``ray.remote`` by TorchRun)."""

    def __init__(self, config: TrainConfig, mode: str, rank: int, world: int, threads: int, micro_batches: int):
        torch.set_num_threads(threads)
        self.config = config
        self.mode = mode
        self.rank = rank
        self.world = world
        self.micro_batches = micro_batches
        self.data = load_data(config)
        # Same seed -> the same initial model as every other method; a pipeline stage takes
        # its slice with the cuts the Ray engine uses, the others the whole model.
        plan = plan_model(config, self.data.input_shape, self.data.task)
        self.module: nn.Module = plan.segments[rank] if mode == "pipeline" else nn.Sequential(*plan.segments)
        self.optimizer = make_optimizer(list(self.module.parameters()), config.optim)
        self.trainer: Any = self.module
        self.schedule: Any = None

    def rendezvous(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def connect(self, address: str, port: int, schedule: str) -> None:
        if self.world == 1:
            return
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{address}:{port}",
            rank=self.rank,
            world_size=self.world,
            timeout=datetime.timedelta(seconds=self.config.dist.timeout),
        )
        if self.mode == "ddp":
            self.trainer = nn.parallel.DistributedDataParallel(self.module)
        elif self.mode == "pipeline":
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            stage = PipelineStage(self.module, self.rank, self.world, torch.device("cpu"))
            kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
            # scale_grads: the gradient is the mean over micro-batches, i.e. the batch mean.
            self.schedule = kind(stage, self.micro_batches, loss_fn=self.data.task.loss, scale_grads=True)

    def run_epoch(self, epoch: int) -> float:
        """Train one epoch; returns the mean loss this process saw (0 where it sees none)."""
        task, cfg = self.data.task, self.config
        total, n = 0.0, 0
        for x, y in batches(self.data.x_train, self.data.y_train, cfg.data.batch_size, cfg.seed, epoch):
            self.optimizer.zero_grad(set_to_none=True)
            if self.mode == "pipeline":
                loss = self._pipeline_step(x, y)
            else:
                if self.mode == "ddp":  # this rank's share of the same global batch
                    share = len(x) // self.world
                    x, y = (
                        x[self.rank * share : (self.rank + 1) * share],
                        y[self.rank * share : (self.rank + 1) * share],
                    )
                out = self.trainer(x)
                loss_t = task.loss(out, y)
                loss_t.backward()  # DDP averages the gradients over ranks: the global batch mean
                loss = float(loss_t)
            self.optimizer.step()
            total, n = total + loss, n + 1
        return total / max(n, 1)

    def _pipeline_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.rank == 0:
            self.schedule.step(x)
            return 0.0
        if self.rank == self.world - 1:
            losses: list[torch.Tensor] = []
            self.schedule.step(target=y, losses=losses)
            return float(sum(float(v) for v in losses) / max(len(losses), 1))
        self.schedule.step()
        return 0.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        try:
            return self.module(x)
        finally:
            self.module.train()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class TorchRun:
    """Driver side of one baseline: starts its actors, trains epochs, predicts, tears down."""

    def __init__(self, method: str, config: TrainConfig, segments: int, micro_batches: int) -> None:
        self.config = config
        self.method = method
        cps = config.dist.cpus_per_stage or 1.0
        modes = {"backprop-1core": "single", "backprop-1dev": "single", "gpipe": "pipeline", "1f1b": "pipeline"}
        mode = modes.get(method, "ddp")
        if method == "backprop-1core":  # one device: one actor's share of the CPUs
            world, cpus, threads = 1, cps, max(1, int(cps))
        elif mode == "single":
            world, cpus, threads = 1, segments * cps, max(1, round(segments * cps))
        else:
            world, cpus, threads = segments, cps, max(1, int(cps))
        worker = ray.remote(TorchWorker)
        self.actors = [
            worker.options(num_cpus=cpus).remote(config, mode, rank, world, threads, micro_batches)
            for rank in range(world)
        ]
        self.mode = mode
        try:
            address, port = ray.get(self.actors[0].rendezvous.remote(), timeout=config.dist.timeout)
            ray.get([a.connect.remote(address, port, method) for a in self.actors], timeout=config.dist.timeout)
        except BaseException:
            self.close()
            raise

    def train_epoch(self, epoch: int) -> list[float]:
        losses = ray.get([a.run_epoch.remote(epoch) for a in self.actors], timeout=self.config.dist.timeout)
        return [losses[-1]]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "pipeline":  # every replica holds the whole model
            return ray.get(self.actors[0].forward.remote(x))
        ref: Any = x
        for actor in self.actors:
            ref = actor.forward.remote(ref)
        return ray.get(ref)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a hung or dead actor is killed just below anyway
            ray.get([a.close.remote() for a in self.actors], timeout=30)
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
