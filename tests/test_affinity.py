"""dist.pin_cpus: which cores each stage gets, and that pinning reaches every thread."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dni_dist.config import load_config
from dni_dist.engines.affinity import cpu_slots, plan_pins, should_pin, slot_cores, slot_width, too_few_cores
from dni_dist.errors import ConfigError


def test_stages_on_one_node_take_consecutive_slots_in_stage_order() -> None:
    assert cpu_slots(["a", "a", "b", "b", "a"]) == [0, 1, 0, 1, 2]


@pytest.mark.parametrize(("cpus", "width"), [(0.5, 1), (1.0, 1), (1.5, 2), (4.0, 4)])
def test_a_slot_is_whole_cores(cpus: float, width: int) -> None:
    assert slot_width(cpus) == width


def test_slots_follow_the_cores_a_stage_may_use_not_core_numbers() -> None:
    # A container's cpuset: cores 4-7 of the node; slot 1 of width 2 is 6 and 7.
    assert slot_cores([7, 4, 6, 5], 1, 2) == [6, 7]
    assert slot_cores([4, 5, 6, 7], 2, 2) is None


def test_a_node_short_of_cores_pins_no_stage_at_all() -> None:
    allowed = [[0, 1, 2, 3]] * 3 + [[0, 1]] * 2
    nodes = ["a", "a", "a", "b", "b"]
    assert plan_pins(nodes, allowed, 1.0) == [[0], [1], [2], [0], [1]]
    assert plan_pins(nodes, allowed, 2.0) is None  # node a: 3 stages x 2 cores > 4


def test_too_few_cores_is_one_line_naming_the_key() -> None:
    error = too_few_cores(["a", "a", "a"], [[0, 1]] * 3, 1.0)
    assert isinstance(error, ConfigError) and "\n" not in str(error)
    assert "dist.pin_cpus=on" in str(error) and "3 stages of 1 core(s)" in str(error) and "2 core(s)" in str(error)


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
