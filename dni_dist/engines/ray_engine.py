"""The distributed engine: one Ray actor per segment, each running the stage loop on its
own device, talking over a transport (torch.distributed P2P: NCCL on GPUs, gloo on CPU;
gRPC; or shared memory between stages on one machine, what ``transport=auto`` takes for CPU
stages placed on one node: ``choose_transport``).

The driver only sets things up and calls each actor once per epoch (``run_epoch``); the
data plane never goes through Ray calls (an actor call costs about 1 ms here, a gloo
message about 0.1 ms). With no Ray address it starts an embedded local Ray; with
``dist.address`` or ``RAY_ADDRESS`` (set by ``ray job submit``) it joins that cluster.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from dni_dist.builder import build_stages, load_data, plan_layout
from dni_dist.config import TrainConfig
from dni_dist.core.imports import import_root, resolve
from dni_dist.core.precision import enable_tf32, wire_dtype
from dni_dist.core.probe import Snapshot, StageProbe
from dni_dist.core.tasks import Task
from dni_dist.data import Dataset
from dni_dist.data.device import TrainingSet
from dni_dist.engines.affinity import (
    CLAIMS_DIR,
    CoreClaim,
    compute_niceness,
    cpu_slots,
    gpu_local_cores,
    pin_process,
    set_thread_niceness,
    should_pin,
    slot_width,
    too_few_cores,
)
from dni_dist.engines.placement import check_grpc_reach, check_one_machine, stage_bundles, stage_cpus, stage_gpus
from dni_dist.engines.scaling import wait_for_placement
from dni_dist.engines.shards import ShardRecord, read_shard, read_token, to_cpu, write_shard, write_token
from dni_dist.engines.stage_loop import StageLoop, adopt_thread_count
from dni_dist.engines.wiring import all_streams, streams_of
from dni_dist.errors import ConfigError, SnapshotLost, StageLost, reason
from dni_dist.transports.base import Stream, Transport, TransportError
from dni_dist.transports.shm import SharedMemoryTransport, default_directory, shm_room
from dni_dist.transports.slow_link import SlowLinkTransport
from dni_dist.transports.torch_dist import TorchDistTransport, free_port, init_links, shutdown_groups


class StageWorker:
    """One segment in its own process (wrapped with ``ray.remote`` by the driver)."""

    def __init__(
        self,
        config: TrainConfig,
        index: int,
        input_shape: tuple[int, ...],
        task: Task,
        use_gpu: bool,
        data: Dataset | None = None,
        import_paths: tuple[str, ...] = (),
    ):
        torch.set_num_threads(max(1, int(config.dist.cpus_per_stage or 1)))
        self.config = config
        self.index = index
        self.device = torch.device("cuda:0") if use_gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        self.transport: Transport | None = None
        self.pinned: list[int] | None = None  # the cores of dist.pin_cpus, if pinned
        self.near_cores: set[int] = set()  # the cores of this stage's GPU's NUMA node, if known
        self.allowed: list[int] = []  # the cores it may use unpinned
        self.claim = CoreClaim(Path(config.dist.core_claims_dir) if config.dist.core_claims_dir else CLAIMS_DIR)
        self.compute_nice: int | None = None  # and then the compute thread's niceness
        self.compute_nice_seen: int | None = None  # as read back by the last run_epoch's thread
        # The user's module: on this worker's path, else where the driver found it. A worker
        # that finds neither says so through import_problem (an exception here would reach
        # the driver as a dead actor, not as the one line the user needs).
        self.import_problem_text: str | None = None
        if config.model.factory:
            try:
                resolve("model.factory", config.model.factory, import_paths)
            except ConfigError as exc:
                self.import_problem_text = f"stage {index} on {ray.util.get_node_ip_address()}: {exc}"
                return
        self.stage = build_stages(config, input_shape, task, only=index)[0]
        self.stage.module.to(self.device)
        if self.stage.boundary is not None:
            self.stage.boundary.to(self.device)
        enable_tf32(self.device)
        # Stage 0 loads the named data set itself; data that only the driver has comes along.
        self.data: Dataset | None = None if index else data or load_data(config)
        # Stage 0's training set on its device once, if it fits (data/device.py).
        self.train_set = TrainingSet(self.data.x_train, self.data.y_train, self.device) if self.data else None
        self.loop: StageLoop | None = None
        self.busy = [0.0, 0.0]  # compute seconds, wall seconds
        self.probe = StageProbe(self.stage, config.data.batch_size)

    def import_problem(self) -> str | None:
        return self.import_problem_text

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's node address and a free port there (as Ray Train does)."""
        return ray.util.get_node_ip_address(), free_port()

    def listen(self, streams: list[Stream], run_id: str) -> str:
        """gRPC: start this stage's server; returns the address peers should dial. Shared
        memory: make this stage's inbound rings (every stage does before any attaches)."""
        from dni_dist.transports.grpc_security import GrpcSecurity
        from dni_dist.transports.grpc_transport import GrpcTransport

        cfg = self.config
        if cfg.transport == "shm":
            inbound, outbound = streams_of(self.index, streams)
            self.transport = SharedMemoryTransport(
                self.index,
                inbound,
                outbound,
                default_directory(run_id),
                self.device,
                cfg.dist.capacity,
                cfg.dist.timeout,
                cfg.dist.max_message_bytes,
            )
            self.transport.create_inbound()
            return ""
        bind = cfg.dist.grpc_bind
        d = cfg.dist  # the token comes from this worker's environment (runtime_env env_vars)
        security = GrpcSecurity.from_settings(d.grpc_tls_cert, d.grpc_tls_key, d.grpc_tls_ca, d.grpc_token_env)
        advertise = ray.util.get_node_ip_address() if bind in ("0.0.0.0", "::", "[::]") else bind
        inbound, outbound = streams_of(self.index, streams)
        self.transport = GrpcTransport(
            self.index,
            inbound,
            outbound,
            run_id,
            bind,
            advertise,
            cfg.dist.capacity,
            self.device,
            cfg.dist.chunk_bytes,
            cfg.dist.timeout,
            security,
            cfg.dist.max_message_bytes,
            cfg.dist.grpc_token_env,
        )
        return self.transport.address

    def connect(self, streams: list[Stream], address: str = "", port: int = 0, peers: dict[int, str] | None = None):
        """Join the data plane: torch.distributed at rank 0's address, or the gRPC peers."""
        cfg = self.config
        if cfg.transport == "grpc":
            assert self.transport is not None and peers is not None, "listen() comes first"
            self.transport.connect(peers)
        elif cfg.transport == "shm":
            assert isinstance(self.transport, SharedMemoryTransport), "listen() comes first"
            self.transport.attach_outbound()
        else:
            backend = cfg.transport
            groups = init_links(
                backend, address, port, self.index, cfg.segments, cfg.dist.timeout, self.device, streams
            )
            inbound, outbound = streams_of(self.index, streams)
            wire = self.device if backend == "nccl" else torch.device("cpu")
            self.transport = TorchDistTransport(
                self.index,
                inbound,
                outbound,
                groups,
                wire,
                self.device,
                cfg.dist.capacity,
                cfg.dist.max_message_bytes,
            )
        if cfg.dist.link_latency or cfg.dist.link_bandwidth:  # an emulated slow link, for benchmarks
            self.transport = SlowLinkTransport(self.transport, cfg.dist.link_latency, cfg.dist.link_bandwidth)
        self.transport.start()
        slowed = cfg.dist.slow_stage == self.index
        self.loop = StageLoop(
            self.stage,
            self.transport,
            cfg.dist.schedule,
            cfg.dist.timeout,
            cfg.dist.slow_seconds if slowed else 0.0,
            cfg.dist.max_in_flight,
            slow_jitter=cfg.dist.slow_jitter if slowed else 0.0,
            pending_memory=cfg.dist.pending_memory,
        )

    def run_epoch(
        self, epoch: int, first_step: int, steps: int, offset: int = 0, snapshot: bool = False
    ) -> dict[str, Any]:
        """Steps ``offset .. offset + steps - 1`` of ``epoch`` (numbered from ``first_step``);
        ``snapshot``: with the stage's metrics at the end (see ``RayRun.snapshot_with_epochs``)."""
        assert self.loop is not None
        inputs = None
        if self.train_set is not None:
            # Only this chunk's batches: skipped ones would be gathered (and copied) for nothing.
            size, seed = self.config.data.batch_size, self.config.seed
            inputs = self.train_set.batches(size, seed, epoch, offset, offset + steps)
        # Pinned: a woken link thread goes first (affinity.py). Whichever of the actor's two
        # executor threads runs this keeps the niceness (it cannot be lowered again without a
        # privilege); both only ever serve this stage's calls.
        if self.compute_nice is not None:
            set_thread_niceness(self.compute_nice)
            self.compute_nice_seen = os.getpriority(os.PRIO_PROCESS, 0)  # this thread's (Linux)
        report = self.loop.run_epoch(first_step, steps, inputs)
        self.busy[0] += report.compute_seconds
        self.busy[1] += report.wall_seconds
        return {
            "losses": self.stage.take_losses(),
            "wall_seconds": report.wall_seconds,
            "busy_fraction": report.compute_seconds / report.wall_seconds if report.wall_seconds else 0.0,
            "max_queued": report.max_queued,
            "max_pending": report.max_pending,
            "rss_bytes": _rss_bytes(),
            **({"snapshot": self.snapshot()} if snapshot else {}),
        }

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The segment's output for ``x``, in chunks of the batch size: evaluation needs no
        more device memory than a training step."""
        adopt_thread_count()  # as the stage loop does: this executor thread may be new to torch
        chunks = x.split(self.config.data.batch_size)
        return torch.cat([self.stage.predict(c.to(self.device)).cpu() for c in chunks])

    def snapshot(self) -> Snapshot:
        """Metrics now; runs on the actor's second thread while ``run_epoch`` holds the first."""
        return self.probe.snapshot(self.transport)

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        boundary = self.stage.boundary
        return {
            "module": {k: v.cpu() for k, v in self.stage.module.state_dict().items()},
            "boundary": {} if boundary is None else {k: v.cpu() for k, v in boundary.state_dict().items()},
        }

    def stage_state(self) -> dict[str, Any]:
        """The stage's full state (for checkpoints), on the CPU."""
        return to_cpu(self.stage.state_dict())

    def restore(self, state: dict[str, Any]) -> None:
        self.stage.load_state_dict(state)  # load_state_dict copies onto the stage's device

    def write_shard(self, directory: str, state: dict[str, Any] | None = None) -> ShardRecord:
        """Write this stage's checkpoint shard into ``directory``: ``state`` (a snapshot; the
        driver passes its object ref and Ray resolves it here) or, if None, the state now."""
        return write_shard(self.stage.state_dict() if state is None else state, directory, self.index)

    def load_shard(self, path: str) -> None:
        self.stage.load_state_dict(read_shard(path, self.device))

    def read_token(self, path: str, patience: float) -> tuple[str, str | None]:
        """(this node's address, the token file's text as this node sees it, None if absent).
        A missing file is looked for again for ``patience`` seconds: a network file system
        may show a new file to other clients a moment later."""
        deadline = time.monotonic() + patience
        text = read_token(path)
        while text is None and time.monotonic() < deadline:
            time.sleep(0.2)
            text = read_token(path)
        return ray.util.get_node_ip_address(), text

    def pid(self) -> int:
        return os.getpid()

    def pin_cpus(self, slot: int, width: int, patience: float) -> tuple[list[int] | None, int, int]:
        """Claim ``width`` free cores (those near this stage's GPU first, then slot ``slot``'s
        first; waiting up to ``patience`` seconds for them) and keep every thread of this
        stage on them (``dist.pin_cpus``), before the links start their threads, which
        inherit it; ``run_epoch``'s thread will yield to them. Returns (the cores, or None
        when too few are free; the cores this process may use; how many of them are free)."""
        allowed = sorted(os.sched_getaffinity(0))
        self.near_cores = gpu_local_cores(self.device.index or 0) if self.device.type == "cuda" else set()
        cores = self.claim.claim(allowed, slot, width, patience, near=self.near_cores)
        if cores is None:
            return None, len(allowed), self.claim.free(allowed)
        self.allowed = allowed
        self.pinned = pin_process(cores)
        self.compute_nice = compute_niceness(self.config.dist.compute_nice_offset)
        return self.pinned, len(allowed), 0

    def unpin(self) -> None:
        """Back to every core this process may use (another stage found too few free)."""
        if self.pinned is not None:
            pin_process(self.allowed)
        self.claim.release()
        self.pinned = self.compute_nice = None

    def drop_links(self) -> None:
        """Fault drill: stop this stage's gRPC server as if its host went away."""
        from dni_dist.transports.grpc_transport import GrpcTransport

        if isinstance(self.transport, GrpcTransport):
            self.transport.server.stop(grace=0)

    def summary(self) -> dict[str, Any]:
        stats = self.stage.stats.summary()
        stats["busy_fraction"] = self.busy[0] / self.busy[1] if self.busy[1] else 0.0
        stats["parameters"] = sum(p.numel() for p in self.stage.module.parameters())
        stats["device"] = str(self.device)
        stats["cpu_affinity"] = self.pinned  # None: not pinned (dist.pin_cpus)
        # On its GPU's NUMA node: True/False; None where unknown (a CPU stage, no sysfs, unpinned).
        stats["cpu_near_gpu"] = set(self.pinned) <= self.near_cores if self.pinned and self.near_cores else None
        stats["compute_niceness"] = self.compute_nice_seen
        stats["niceness"] = os.getpriority(os.PRIO_PROCESS, 0)  # what dist.niceness got (Ray applies it)
        if self.loop is not None:
            stats.update(self.loop.pending_summary())
        if self.transport is not None:
            stats["transport"] = self.transport.stats.summary()
        return stats

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.config.transport in ("gloo", "nccl"):
            shutdown_groups()
        self.claim.release()  # the kernel would drop the locks with the process anyway


RESTART_PIN_PATIENCE = 10.0  # seconds a restarted stage waits for the cores of the one it replaces


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def choose_transport(requested: str, bundle_nodes: list[str], cpu_stages: bool, room: Callable[[], bool]) -> str:
    """``transport=auto``: shared memory where it surely works and helps, gloo elsewhere:
    CPU stages (GPU stages would copy to the host on the compute thread; gloo's link threads
    do it apart), all placed on one node (an embedded Ray, or a cluster's node that held
    them all), and ``room()`` on that node (FIFOs, free space for the rings; asked last, as
    it may ask the node). Any other transport is taken as asked. A restart decides again
    for its new placement."""
    if requested != "auto":
        return requested
    return "shm" if cpu_stages and len(set(bundle_nodes)) == 1 and room() else "gloo"


def shm_room_on(node_id: str, streams: list[Stream], capacity: int, timeout: float) -> bool:
    """``shm_room`` on the node ``node_id``: here when the driver is on it, else by a task
    pinned to it (no CPU claimed). A node that cannot answer gets gloo (False)."""
    if node_id == ray.get_runtime_context().get_node_id():
        return shm_room(streams, capacity)
    return ask_node_for_shm_room(node_id, streams, capacity, timeout)


def ask_node_for_shm_room(node_id: str, streams: list[Stream], capacity: int, timeout: float) -> bool:
    try:  # an id the placement table left blank is a ValueError: no node to ask
        probe = ray.remote(num_cpus=0)(shm_room).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        )
        return bool(ray.get(probe.remote(streams, capacity), timeout=timeout))
    except (ray.exceptions.RayError, TimeoutError, ValueError):
        return False


def _bundle_nodes(pg: Any, count: int) -> list[str]:
    """Each bundle's node id, from Ray's placement group table (once the group is ready)."""
    table = ray.util.placement_group_table(pg).get("bundles_to_node_id", {})
    return [str(table.get(i, table.get(str(i), ""))) for i in range(count)]


_started_here: str | None = None  # the session name (unique per Ray) of the last one this process started


def start_local_ray(num_cpus: int, log_to_driver: bool = False) -> None:
    """Start a Ray of this process's own, remembered so that ``dist.pin_cpus=auto`` knows
    that no other job submits work to it (one could still connect on purpose)."""
    global _started_here
    # "local": a new Ray even when `ray start` left one running on this machine (ray.init()
    # without an address would join that one, and then refuse num_cpus).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    _started_here = ray.get_runtime_context().get_session_name()


def owns_ray() -> bool:
    """Is the Ray this process is connected to one that it started (``start_local_ray``)?"""
    return ray.is_initialized() and _started_here == ray.get_runtime_context().get_session_name()


def connect_ray(config: TrainConfig) -> bool:
    """Join the configured cluster, or start an embedded one. True if we started it."""
    if ray.is_initialized():
        return False
    address = config.dist.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    start_local_ray(config.dist.num_cpus or os.cpu_count() or 1, log_to_driver=True)
    return True


class RayRun:
    """The driver side: places the actors, wires them up, runs epochs, tears down."""

    def __init__(self, config: TrainConfig, dataset: Dataset, in_memory: bool = False) -> None:
        """``in_memory``: ``dataset`` cannot be loaded from the config (tensors given to
        ``dni_dist.fit``); it is shipped to stage 0, as a data factory's output is."""
        self.config = config
        self.requested_transport = config.transport  # "auto" is decided per placement (_start)
        self.dataset = dataset
        self.started_ray = connect_ray(config)
        # The text corpus too: read from files on the driver's machine (or its own Python's
        # standard library), it could differ on stage 0's node and disagree with the driver's
        # steps per epoch and test set.
        shipped = in_memory or bool(config.data.factory) or config.data.name == "text"
        self.data_ref = ray.put(dataset) if shipped else None
        root = import_root(config.model.factory) if config.model.factory else None
        self.import_paths = (root, os.getcwd()) if root else (os.getcwd(),)
        self.actors: list[Any] = []
        self.pg = None
        self._in_epoch = False  # an interrupted epoch leaves actors busy: kill, don't ask
        self.step = 0
        self.epoch_reports: list[list[dict[str, Any]]] = []
        # Set by a caller that polls ``snapshots`` around every epoch (the runner's monitor):
        # each stage's snapshot then comes back with its epoch's result, and answers polls
        # until the next epoch, saving two round trips to every stage per epoch (about 1.5 ms
        # each on digits; an epoch there is about 40 ms).
        self.snapshot_with_epochs = False
        self._epoch_end_snapshots: list[Snapshot] | None = None
        self.run_id = uuid.uuid4().hex
        self.generation = 0  # bumped by every restart; part of the actors' names
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        cfg = self.config
        k = cfg.segments
        d = cfg.dist
        resources = ray.cluster_resources()  # what the cluster has now; an autoscaler may add more
        gpus_per_stage = stage_gpus(d.device, d.gpus_per_stage, resources.get("GPU", 0), k, cfg.transport)
        use_gpu = gpus_per_stage > 0
        cpus = stage_cpus(d.cpus_per_stage, resources.get("CPU", 0), k, use_gpu)
        bundle = {"CPU": cpus, **({"GPU": gpus_per_stage} if use_gpu else {})}
        strategy = "STRICT_SPREAD" if d.placement == "spread" else "PACK"
        self.pg = placement_group([bundle] * k, strategy=strategy)
        wait_for_placement(self.pg, [bundle] * k, strategy, d.timeout, d.scale_timeout, self.started_ray)
        bundle_nodes = _bundle_nodes(self.pg, k)
        plan = plan_layout(cfg, self.dataset.input_shape, self.dataset.task)  # cut shapes only: on meta
        direct = cfg.method in ("dfa", "kickback")
        streams = all_streams(
            k, plan.cut_shapes, cfg.data.batch_size, self.dataset.task, direct, wire_dtype(cfg.precision)
        )
        transport = choose_transport(
            self.requested_transport,
            bundle_nodes,
            not use_gpu,
            lambda: shm_room_on(bundle_nodes[0], streams, d.capacity, d.timeout),
        )
        cfg = self.config = replace(cfg, transport=transport)
        check_grpc_reach(cfg.transport, cfg.dist.grpc_bind, bundle_nodes)
        check_one_machine(cfg.transport, bundle_nodes)
        bundles = stage_bundles(bundle_nodes)  # neighbours on one node where the placement allows
        worker = ray.remote(StageWorker)
        task = self.dataset.task
        for i in range(k):
            self.actors.append(
                worker.options(
                    # A second thread serves small calls (snapshots, test hooks) during run_epoch.
                    max_concurrency=2,
                    # Named so operators (and tests) can find a stage: dni-RUN-gGEN-stageI.
                    name=f"dni-{self.run_id[:8]}-g{self.generation}-stage{i}",
                    num_cpus=cpus,
                    num_gpus=gpus_per_stage,
                    # Ray's core worker renices itself to this at start (default 15); merged
                    # with the job's runtime_env, so --working-dir and the user's env stay.
                    runtime_env={"env_vars": {"RAY_worker_niceness": str(cfg.dist.niceness)}},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.pg, placement_group_bundle_index=bundles[i]
                    ),
                ).remote(
                    cfg,
                    i,
                    self.dataset.input_shape,
                    task,
                    use_gpu,
                    self.data_ref if i == 0 else None,
                    self.import_paths,
                )
            )
        problems = ray.get([a.import_problem.remote() for a in self.actors], timeout=cfg.dist.timeout)
        problem = next((p for p in problems if p), None)
        if problem:
            raise ConfigError(f"{problem}; ship the module with the job (ray job submit --working-dir, or py_modules)")
        if should_pin(d.pin_cpus, owns_ray()):
            self._pin([bundle_nodes[b] for b in bundles], cpus)
        if cfg.transport in ("grpc", "shm"):  # every stage listens before any connects
            run_id = f"{self.run_id}-g{self.generation}"  # a stage refuses streams from any other run
            addresses = ray.get([a.listen.remote(streams, run_id) for a in self.actors], timeout=cfg.dist.timeout)
            peers = dict(enumerate(addresses))
            ray.get([a.connect.remote(streams, peers=peers) for a in self.actors], timeout=cfg.dist.timeout)
        else:
            address, port = ray.get(self.actors[0].rendezvous.remote())
            ray.get([a.connect.remote(streams, address, port) for a in self.actors], timeout=cfg.dist.timeout)
        self.steps_per_epoch = len(self.dataset.x_train) // cfg.data.batch_size

    def _pin(self, stage_nodes: list[str], cpus: float) -> None:
        """Each stage on free cores of its own, claimed in stage order; all or none. After a
        restart, the replaced actors may still be exiting (``ray.kill`` does not wait), so a
        stage waits a little for their cores."""
        timeout = self.config.dist.timeout
        width = slot_width(cpus)
        patience = min(RESTART_PIN_PATIENCE, timeout) if self.generation else 0.0
        for i, (actor, slot) in enumerate(zip(self.actors, cpu_slots(stage_nodes), strict=True)):
            cores, allowed, free = ray.get(actor.pin_cpus.remote(slot, width, patience), timeout=timeout + patience)
            if cores is None:
                ray.get([a.unpin.remote() for a in self.actors[:i]], timeout=timeout)
                if self.config.dist.pin_cpus == "on":
                    raise too_few_cores(i, stage_nodes[i], width, allowed, free)
                print(
                    f"dni-dist: dist.pin_cpus=auto: stage {i} found {free} of {allowed} cores free to claim "
                    "(another run holds them?); the stages run unpinned",
                    file=sys.stderr,
                    flush=True,
                )
                return

    def train_epoch(self, epoch: int) -> list[float]:
        return self.train_steps(epoch, 0, self.steps_per_epoch)

    def train_steps(self, epoch: int, offset: int, count: int) -> list[float]:
        """Steps ``offset .. offset + count - 1`` of ``epoch``; raises StageLost when a stage
        actor dies or its links fail (the caller may ``restart`` and ``restore``)."""
        self._in_epoch = True
        self._epoch_end_snapshots = None
        with_snapshot = self.snapshot_with_epochs
        calls = {
            a.run_epoch.remote(epoch, self.step, count, offset, with_snapshot): i for i, a in enumerate(self.actors)
        }
        reports: dict[int, dict[str, Any]] = {}
        waiting = list(calls)
        while waiting:  # the first failure ends the wait: the others would only block on it
            done, waiting = ray.wait(waiting, num_returns=1)
            stage = calls[done[0]]
            try:
                reports[stage] = ray.get(done[0])
            except ray.exceptions.RayActorError as exc:
                raise StageLost(f"stage {stage}'s actor died ({exc.__class__.__name__})") from None
            except TransportError as exc:
                raise StageLost(f"stage {stage} lost a link: {reason(exc)}") from None
        self._in_epoch = False
        self.step += count
        ordered = [reports[i] for i in range(len(self.actors))]
        if with_snapshot:
            self._epoch_end_snapshots = [r.pop("snapshot") for r in ordered]
        self.epoch_reports.append(ordered)
        return ordered[-1]["losses"]

    def stage_states(self) -> list[dict[str, Any]]:
        return ray.get([a.stage_state.remote() for a in self.actors], timeout=self.config.dist.timeout)

    # Snapshots and checkpoint shards. The driver holds object refs and paths, never the
    # tensors: a stage's state goes from its actor to the node's object store (a snapshot),
    # or to its shard file, and back from there to a (new) actor.

    def state_handles(self) -> list[ray.ObjectRef]:
        """A snapshot of every stage: refs to each actor's ``stage_state``, which the driver
        owns and the object store of the actor's node holds (an actor's death does not free
        them; its node's does). The driver waits for them without fetching them: the next
        chunk must not start before every stage has handed over its state."""
        refs = [a.stage_state.remote() for a in self.actors]
        timeout = self.config.dist.timeout
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=False)
        if len(ready) < len(refs):
            raise StageLost(f"a stage did not hand over its state within dist.timeout={timeout}")
        return refs

    def restore(self, states: list[Any], step: int) -> None:
        """Every stage from ``states``: refs from ``state_handles`` (Ray resolves a ref passed
        as a top-level argument in the actor, from the object store) or plain states."""
        calls = [a.restore.remote(s) for a, s in zip(self.actors, states, strict=True)]
        try:
            ray.get(calls, timeout=self.config.dist.timeout)
        except ray.exceptions.ObjectLostError as exc:
            raise SnapshotLost(f"the snapshot of step {step} is lost ({exc.__class__.__name__})") from None
        self.step = step
        self._epoch_end_snapshots = None  # the stages' counters are the restored ones now

    def write_shards(
        self, directory: Path, handles: list[Any] | None = None, by_stages: bool = True
    ) -> list[ShardRecord]:
        """Each stage's checkpoint shard in ``directory``: from ``handles`` (a snapshot), else
        from the stages' state now. ``by_stages``: each actor writes its own (the directory
        is one every stage sees); a stage that cannot (its actor is dead or stuck) has its
        snapshot written by the driver instead, one stage at a time, as do all stages when
        not ``by_stages`` (a directory only the driver's machine may see)."""
        k = len(self.actors)
        records: list[ShardRecord | None] = [None] * k
        if by_stages:
            calls = [
                a.write_shard.remote(str(directory), None if handles is None else handles[i])
                for i, a in enumerate(self.actors)
            ]
            for i, call in enumerate(calls):
                try:
                    records[i] = ray.get(call, timeout=self.config.dist.timeout)
                except ray.exceptions.ObjectLostError as exc:
                    raise SnapshotLost(f"stage {i}'s snapshot is lost ({exc.__class__.__name__})") from None
                except ray.exceptions.RayError as exc:
                    if handles is None:  # the state now lives only in that actor
                        raise StageLost(f"stage {i} could not write its checkpoint shard: {reason(exc)}") from None
        for i in range(k):
            if records[i] is None:
                assert handles is not None, "the driver writes only from a snapshot"
                try:
                    state = ray.get(handles[i], timeout=self.config.dist.timeout)
                except ray.exceptions.ObjectLostError as exc:
                    raise SnapshotLost(f"stage {i}'s snapshot is lost ({exc.__class__.__name__})") from None
                records[i] = write_shard(state, directory, i)
                del state  # one stage's state in the driver at a time
        return [r for r in records if r is not None]

    def load_shards(self, paths: list[Path], step: int) -> None:
        """Each stage loads its own shard (by path, onto its device): --resume."""
        calls = [a.load_shard.remote(str(p)) for a, p in zip(self.actors, paths, strict=True)]
        ray.get(calls, timeout=self.config.dist.timeout)
        self.step = step
        self._epoch_end_snapshots = None

    def check_shared(self, directory: Path, patience: float = 2.0) -> None:
        """Every stage must see ``directory`` (checkpoint.dir) as the driver does: the driver
        writes a token file there and every actor reads it back."""
        path, token = write_token(directory)
        try:
            seen = ray.get(
                [a.read_token.remote(str(path), patience) for a in self.actors], timeout=self.config.dist.timeout
            )
        finally:
            path.unlink(missing_ok=True)
        for i, (node, text) in enumerate(seen):
            if text != token:
                raise ConfigError(
                    f"checkpoint.dir={str(directory)!r} is not the driver's directory on node {node} (stage {i}); "
                    "use shared storage every node mounts at the same path, such as NFS or a mounted bucket"
                )

    def restart(self) -> None:
        """Replace every stage actor (the process groups of the survivors are broken too)."""
        self._stop_actors()
        self._epoch_end_snapshots = None
        self.generation += 1
        self._start()

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        ref: Any = x
        for actor in self.actors:
            ref = actor.predict.remote(ref)  # refs chain actor to actor, not via the driver
        return ray.get(ref)

    def snapshots(self) -> list[Snapshot]:
        """Every stage's metrics now (the driver's poller calls this during an epoch). Between
        epochs the stages do not train, so the snapshots that came with the last epoch's
        results (``snapshot_with_epochs``) are still the stages' metrics now."""
        if not self._in_epoch and self._epoch_end_snapshots is not None:
            return list(self._epoch_end_snapshots)
        return ray.get([a.snapshot.remote() for a in self.actors], timeout=10)

    def states(self) -> list[dict[str, dict[str, torch.Tensor]]]:
        return ray.get([a.state.remote() for a in self.actors])

    def stage_summaries(self) -> list[dict[str, Any]]:
        summaries = ray.get([a.summary.remote() for a in self.actors])
        for i, s in enumerate(summaries):
            s["max_queued"] = max((r[i]["max_queued"] for r in self.epoch_reports), default=0)
            s["max_pending"] = max((r[i]["max_pending"] for r in self.epoch_reports), default=0)
        return [{"stage": i, **s} for i, s in enumerate(summaries)]

    def close(self) -> None:
        """Stop every actor and free every port, whatever state the run is in."""
        self._stop_actors()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def _stop_actors(self) -> None:
        if self.actors and not self._in_epoch:
            with contextlib.suppress(Exception):  # a dead or hung actor is killed below anyway
                ray.get([a.close.remote() for a in self.actors], timeout=30)
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self._in_epoch = False
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
