from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dni_dist.cli import main

SUMMARY_KEYS = {
    "method",
    "segments",
    "runtime",
    "transport",
    "dataset",
    "epochs",
    "test_accuracy",
    "train_loss",
    "samples_per_second",
    "wall_seconds",
    "stages",
}


def test_train_writes_summary_and_metrics(tmp_path, capsys) -> None:
    code = main(
        [
            "train",
            "--method",
            "sg",
            "--segments",
            "3",
            "--dataset",
            "digits",
            "--epochs",
            "2",
            "--seed",
            "1",
            "--out",
            str(tmp_path),
            "--set",
            "sg.kind=mlp",
            "--set",
            "sg.hidden=32",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["segments"] == 3 and summary["epochs"] == 2 and summary["config"]["sg"]["kind"] == "mlp"
    assert len(summary["stages"]) == 3
    assert all(s["steps"] == summary["steps"] for s in summary["stages"])
    assert summary["stages"][0]["sg_updates"] > 0 and summary["stages"][2]["sg_updates"] == 0
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert "test_accuracy" in epochs[-1]
    assert "epoch=2" in capsys.readouterr().out


def test_yaml_config_then_flags_override(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: backprop\nepochs: 5\nmodel:\n  depth: 2\n  width: 32\n")
    assert main(["train", str(cfg), "--epochs", "1", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (summary["method"], summary["epochs"], summary["config"]["model"]["width"]) == ("backprop", 1, 32)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--method", "magic"], "method='magic'"),
        (["--dataset", "imagenet"], "data.name='imagenet'"),
        (["--segments", "7"], "segments=7"),
        (["--dataset", "mnist", "--data-dir", "/no/such/dir"], "/no/such/dir"),
        (["--set", "sg.kind=conv"], "sg.kind='conv'"),
        (["--set", "sg.lr=fast"], "sg.lr='fast'"),
        (["--set", "model.width=-3"], "model.width=-3"),
        (["--set", "nonsense"], "nonsense"),
        (["--epochs", "0"], "epochs=0"),
        (["--runtime", "cloud"], "runtime='cloud'"),
        (["--set", "sg.delay=-1"], "sg.delay=-1"),
        (["--set", "sg.delay=64"], "sg.delay=64"),
        (["--runtime", "ray", "--set", "sg.delay=4"], "sg.delay=4"),
        (["--method", "fdg", "--set", "fdg_shrink=0"], "fdg_shrink=0"),
        (["--method", "fdg", "--set", "fdg_shrink=1.5"], "fdg_shrink=1.5"),
        (["--set", "sg.gate=cosine"], "sg.gate='cosine'"),
        (["--set", "sg.delay_lr=-1"], "sg.delay_lr=-1"),
        (["--set", "sg.refresh=maybe"], "sg.refresh='maybe'"),
        (["--set", "sg.reuse_lag=-1"], "sg.reuse_lag=-1"),
        (["--set", "sg.reuse_lag=one"], "sg.reuse_lag='one'"),
        (["--set", "dist.max_in_flight=-1"], "dist.max_in_flight=-1"),
        (["--set", "dist.max_in_flight=auto"], "dist.max_in_flight='auto'"),
        (["--set", "dist.pending_memory=-5"], "dist.pending_memory=-5"),
        (["--set", "dist.pending_memory=1.5"], "dist.pending_memory=1.5"),
        (["--set", "dist.pending_memory=2000000000000000"], "dist.pending_memory=2000000000000000"),
    ],
)
def test_bad_input_is_one_line_naming_the_value_with_exit_2(args: list[str], named: str, capsys, tmp_path) -> None:
    assert main(["train", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dni-dist: error:") and named in err
    assert "\n" not in err and "Traceback" not in err


def test_bad_yaml_file(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [sg\n")
    assert main(["train", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_module_entry_point_exits_2_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dni_dist", "train", "--method", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "method='nope'" in proc.stderr
