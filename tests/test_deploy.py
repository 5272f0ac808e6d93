"""The deployment files parse and agree with each other and with the package: the Ray
version the image pins is the one KubeRay is told, jobs run `dni-dist train`, GPU pods get
GPUs and a memory-backed /dev/shm, and the dashboard only charts metrics the code exports."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
FROM_PIN = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu")

# The metric names every helper agreed on (BRIEF.md "Metric names").
CONTRACT = {
    *(f"dni_stage_{n}" for n in ("steps_total", "samples_total", "updates_total", "step_seconds")),
    *(f"dni_stage_{n}" for n in ("staleness_steps", "queue_depth", "pending_steps", "sg_loss", "sg_cosine")),
    *(f"dni_stage_{n}" for n in ("dropped_targets_total", "nonfinite_steps_total", "busy_ratio")),
    *(f"dni_transport_{d}_{u}_total" for d in ("sent", "received") for u in ("bytes", "messages")),
    *(f"dni_job_{n}" for n in ("epoch", "train_loss", "test_accuracy", "test_loss", "samples_per_second")),
    *(f"dni_job_{n}" for n in ("steps_total", "restarts_total", "redone_steps_total", "checkpoints_total")),
}


def _yaml_docs() -> dict[str, list[Any]]:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert files, "no YAML under deploy/"
    return {str(f.relative_to(ROOT)): [d for d in yaml.safe_load_all(f.read_text()) if d is not None] for f in files}


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for docs in _yaml_docs().values() for d in docs if isinstance(d, dict) and d.get("kind") == kind]


def _docker_ray_version() -> str:
    froms = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.upper().startswith("FROM ")]
    assert len(froms) == 1, froms
    match = FROM_PIN.fullmatch(froms[0])
    assert match, f"FROM {froms[0]} must pin rayproject/ray:X.Y.Z-py3NN-gpu"
    return match.group(1)


def _cluster_specs() -> list[dict[str, Any]]:
    clusters = [d["spec"] for d in _kind("RayCluster")]
    jobs = [d["spec"]["rayClusterSpec"] for d in _kind("RayJob")]
    assert clusters and jobs, "deploy/kuberay needs a RayCluster and a RayJob"
    return clusters + jobs


def _pod_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_every_yaml_and_json_under_deploy_parses() -> None:
    assert all(docs for docs in _yaml_docs().values())
    for path in DEPLOY.rglob("*.json"):
        assert isinstance(json.loads(path.read_text()), dict), path


def test_dockerfile_pins_a_gpu_ray_image_and_installs_the_package() -> None:
    text = DOCKERFILE.read_text()
    assert "latest" not in text.split("FROM", 1)[1].splitlines()[0]
    version = _docker_ray_version()
    required = re.search(r'"ray\[default\]>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert required and tuple(map(int, version.split("."))) >= tuple(map(int, required.group(1).split(".")))
    copied = " ".join(line for line in text.splitlines() if line.startswith("COPY"))
    for needed in ("pyproject.toml", "README.md", "proto", "dni_dist"):
        assert needed in copied, f"Dockerfile does not COPY {needed}"
    assert "pip install --no-cache-dir ." in text
    assert re.search(r"^USER ray$", text, re.M), "run as the base image's non-root user"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "runs", ".venv*"} <= set(ignored)


def test_kuberay_clusters_match_the_image_and_give_gpus_and_shm() -> None:
    version = _docker_ray_version()
    for spec in _cluster_specs():
        assert spec["rayVersion"] == version
        head = spec["headGroupSpec"]["rayStartParams"]
        assert head["dashboard-host"] == "0.0.0.0" and "metrics-export-port" in head
        assert spec["workerGroupSpecs"], "no worker group"
        for group in spec["workerGroupSpecs"]:
            for container in group["template"]["spec"]["containers"]:
                assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        for pod in _pod_specs(spec):
            shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
            mounts = [m for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert mounts and all(m["name"] in shm for m in mounts), "/dev/shm must be an emptyDir in memory"


def test_rayjob_runs_dni_dist_train_and_exposes_its_metrics_port() -> None:
    (job,) = _kind("RayJob")
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["dni-dist", "train"]
    assert args[args.index("--runtime") + 1] == "ray"
    port = int(args[args.index("--metrics-port") + 1])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    assert port in {p["containerPort"] for c in head["spec"]["containers"] for p in c["ports"]}
    labels = head["metadata"]["labels"]
    services = [s for s in _kind("Service") if any(p["port"] == port for p in s["spec"]["ports"])]
    assert any(s["spec"]["selector"].items() <= labels.items() for s in services), "no Service selects the driver"


def test_cluster_launcher_uses_gpu_workers_and_a_reachable_dashboard() -> None:
    (cluster,) = _yaml_docs()["deploy/cluster.yaml"]
    assert cluster["docker"]["image"] and "latest" not in cluster["docker"]["image"]
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    head = " ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cluster["worker_start_ray_commands"])


def test_prometheus_scrapes_the_driver_port() -> None:
    (config,) = _yaml_docs()["deploy/prometheus/prometheus.yml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "dni-dist")
    targets = [t for s in job["static_configs"] for t in s["targets"]]
    (job_spec,) = _kind("RayJob")
    port = shlex.split(job_spec["spec"]["entrypoint"])
    assert any(t.endswith(f":{port[port.index('--metrics-port') + 1]}") for t in targets)


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dni_dist.json").read_text())


def _dashboard_metrics() -> set[str]:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"dni_[a-z_]+", e)}


def test_dashboard_panels_are_laid_out_and_query_prometheus() -> None:
    dash = _dashboard()
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "method", "transport"}


def test_dashboard_uses_only_contract_metric_names() -> None:
    assert _dashboard_metrics() <= CONTRACT
    assert len(_dashboard_metrics()) >= 20  # the dashboard covers the contract, not a corner of it


def test_dashboard_metrics_exist_in_the_package_source() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "dni_dist").rglob("*.py"))
    names = set(re.findall(r"dni_[a-z_]+", source))
    assert any(re.match(r"dni_(stage|job|transport)_", n) for n in names), "no dni_* metric names in the package"
    # prometheus_client adds `_total` to counters, so the source may name them without it.
    missing = [n for n in sorted(_dashboard_metrics()) if n not in names and n.removesuffix("_total") not in names]
    assert not missing, f"the dashboard queries metrics the package never exports: {missing}"
