"""dist.pin_cpus: which cores each stage gets, and that pinning reaches every thread."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dni_dist.config import load_config
from dni_dist.engines.affinity import (
    CoreClaim,
    candidate_cores,
    cpu_slots,
    gpu_local_cores,
    parse_cpulist,
    pci_local_cores,
    should_pin,
    slot_width,
    too_few_cores,
)
from dni_dist.errors import ConfigError


def test_stages_on_one_node_take_consecutive_slots_in_stage_order() -> None:
    assert cpu_slots(["a", "a", "b", "b", "a"]) == [0, 1, 0, 1, 2]


@pytest.mark.parametrize(("cpus", "width"), [(0.5, 1), (1.0, 1), (1.5, 2), (4.0, 4)])
def test_a_slot_is_whole_cores(cpus: float, width: int) -> None:
    assert slot_width(cpus) == width


def test_a_stage_tries_its_slots_cores_first_then_the_next_ones_round_the_end() -> None:
    # A container's cpuset: cores 4-7 of the node; slot 1 of width 2 starts at core 6.
    assert candidate_cores([7, 4, 6, 5], 1, 2) == [6, 7, 4, 5]
    assert candidate_cores([4, 5, 6, 7], 2, 2) == [4, 5, 6, 7]


def test_a_gpu_stage_tries_the_cores_of_its_gpus_numa_node_first() -> None:
    # Two sockets of 4 cores; the GPU hangs off the second. Slot 1's order, near cores first.
    assert candidate_cores(range(8), 1, 1, near={4, 5, 6, 7}) == [4, 5, 6, 7, 1, 2, 3, 0]
    assert candidate_cores(range(8), 5, 1, near={4, 5, 6, 7}) == [5, 6, 7, 4, 0, 1, 2, 3]
    assert candidate_cores([0, 1], 0, 1, near={6, 7}) == [0, 1]  # none of them allowed: as before


def test_claims_take_free_near_cores_before_far_ones(tmp_path) -> None:
    near = {2, 3}
    claims = [CoreClaim(tmp_path) for _ in range(3)]
    assert claims[0].claim(range(4), 0, 1, near=near) == [2]
    assert claims[1].claim(range(4), 0, 1, near=near) == [3]
    assert claims[2].claim(range(4), 0, 2, near=near) == [0, 1]  # the near ones are held: the rest


def test_kernel_cpu_lists_parse() -> None:
    assert parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpulist("") == set()


def test_a_pci_devices_near_cores_come_from_sysfs_or_are_unknown(tmp_path) -> None:
    device = tmp_path / "0000:3b:00.0"
    device.mkdir()
    (device / "local_cpulist").write_text("16-31,48-63\n")
    assert pci_local_cores(0, 0x3B, 0, root=tmp_path) == set(range(16, 32)) | set(range(48, 64))
    assert pci_local_cores(0, 0x3C, 0, root=tmp_path) == set()  # no such device: no preference
    (device / "local_cpulist").write_text("garbage")
    assert pci_local_cores(0, 0x3B, 0, root=tmp_path) == set()


def test_a_gpus_near_cores_follow_its_pci_ids(tmp_path, monkeypatch) -> None:
    import torch

    class Props:  # what torch reports for a GPU at PCI 0000:3b:00.0
        pci_domain_id, pci_bus_id, pci_device_id = 0, 0x3B, 0

    device = tmp_path / "0000:3b:00.0"
    device.mkdir()
    (device / "local_cpulist").write_text("4-7")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    assert gpu_local_cores(0, root=tmp_path) == {4, 5, 6, 7}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: object())  # a torch without them
    assert gpu_local_cores(0, root=tmp_path) == set()


def test_claims_never_share_a_core_and_a_release_frees_it(tmp_path) -> None:
    first, second, third = CoreClaim(tmp_path), CoreClaim(tmp_path), CoreClaim(tmp_path)
    assert first.claim([0, 1], 0, 1) == [0]
    assert second.claim([0, 1], 0, 1) == [1]  # core 0 is held: the next free one
    assert third.claim([0, 1], 0, 1) is None and third.cores == []
    assert third.free([0, 1]) == 0
    first.release()
    assert third.claim([0, 1], 0, 1) == [0]
    wide = CoreClaim(tmp_path)
    assert wide.claim([0, 1, 2, 3, 4], 1, 2) == [2, 3]
    assert wide.claim([0, 1, 2], 0, 2) is None  # too few free: it holds none of them afterwards
    assert CoreClaim(tmp_path).claim([2, 3], 0, 2) == [2, 3]


def _holder(directory, then: str) -> subprocess.Popen[str]:
    """Another process that claims core 0 in ``directory``, says so, then runs ``then``."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from dni_dist.engines.affinity import CoreClaim; "
            f"c = CoreClaim(Path({str(directory)!r})); print(c.claim([0], 0, 1), flush=True); {then}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "[0]"
    return holder


def test_a_claim_dies_with_its_process(tmp_path) -> None:
    holder = _holder(tmp_path, "input()")
    try:
        assert CoreClaim(tmp_path).claim([0], 0, 1) is None
        holder.kill()  # no release, no clean exit
        holder.wait(timeout=10)
        assert CoreClaim(tmp_path).claim([0], 0, 1) == [0]
    finally:
        holder.kill()


def test_a_claim_waits_for_a_core_its_holder_is_about_to_free(tmp_path) -> None:
    holder = _holder(tmp_path, "time.sleep(1)")
    try:
        assert CoreClaim(tmp_path).claim([0], 0, 1) is None  # no patience: taken
        assert CoreClaim(tmp_path).claim([0], 0, 1, patience=30) == [0]  # the holder exits within it
    finally:
        holder.kill()


def test_an_unusable_claims_directory_means_no_claim_not_a_crash(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert CoreClaim(blocker / "claims").claim([0, 1], 0, 1) is None


def test_too_few_cores_is_one_line_naming_the_key_and_the_counts() -> None:
    error = too_few_cores(2, "node-a", 1, 2, 0)
    assert isinstance(error, ConfigError) and "\n" not in str(error)
    assert str(error).startswith("dist.pin_cpus=on: stage 2 needs 1 core(s) of its own on node node-a")
    assert "use 2 core(s), 0 of them free to claim" in str(error)


def test_auto_pins_only_on_a_ray_this_process_started() -> None:
    assert should_pin("auto", True) and not should_pin("auto", False)
    assert should_pin("on", False) and not should_pin("off", True)


def test_a_bad_mode_is_a_config_error_naming_the_value() -> None:
    with pytest.raises(ConfigError, match=r"dist.pin_cpus='always' is unknown"):
        load_config(overrides=["dist.pin_cpus=always"])


def test_pinning_reaches_every_thread_and_the_threads_started_later() -> None:
    core = min(os.sched_getaffinity(0))
    script = f"""
import os, threading
from dni_dist.engines.affinity import pin_process
before = threading.Thread(target=threading.Event().wait, daemon=True)
before.start()
print(pin_process([{core}]))
after = []
late = threading.Thread(target=lambda: after.append(sorted(os.sched_getaffinity(0))))
late.start(); late.join()
print(sorted(os.sched_getaffinity(before.native_id)), after[0])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == f"[{core}]"
    assert out[1] == f"[{core}] [{core}]"


def test_a_compute_thread_made_nicer_leaves_the_other_threads_as_they_were() -> None:
    script = """
import os, threading
from dni_dist.engines.affinity import compute_niceness, set_thread_niceness
base = os.getpriority(os.PRIO_PROCESS, 0)
seen = []
def compute():
    set_thread_niceness(compute_niceness(5))
    seen.append(os.getpriority(os.PRIO_PROCESS, 0))
worker = threading.Thread(target=compute)
worker.start(); worker.join()
print(base, seen[0], os.getpriority(os.PRIO_PROCESS, 0), compute_niceness(40))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    base, compute, main_after, capped = map(int, out)
    assert compute == min(19, base + 5) and main_after == base and capped == 19
