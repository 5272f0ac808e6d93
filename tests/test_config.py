from __future__ import annotations

import pytest

from dni_dist.config import load_config
from dni_dist.errors import ConfigError


def test_defaults_are_the_documented_job() -> None:
    cfg = load_config()
    assert (cfg.method, cfg.segments, cfg.runtime, cfg.data.name, cfg.model.kind) == ("sg", 2, "local", "digits", "mlp")
    assert cfg.sg.conditioned and cfg.sg.target == "true"


def test_overrides_parse_yaml_scalars() -> None:
    cfg = load_config(overrides=["sg.lr=1e-4", "cuts=[1,2]", "segments=3", "sg.target=true", "model.batch_norm=yes"])
    assert cfg.sg.lr == pytest.approx(1e-4) and cfg.cuts == [1, 2] and cfg.sg.target == "true"
    assert cfg.model.batch_norm is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sg.target=future", "sg.target='future' is unknown"),
        ("update_prob=1.5", "update_prob=1.5 is out of range"),
        ("dist.niceness=-5", "dist.niceness=-5 is out of range"),
        ("segments=true", "segments=True must be an integer"),
        ("model=3", "model must be a mapping"),
        ("sg.colour=red", "unknown config key 'sg.colour'"),
        ("cuts=[2]", "cuts=[2] needs segments=2"),
        ("cuts=x", "must be a list of integers"),
    ],
)
def test_bad_values_name_field_and_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides=["segments=3", override] if override.startswith("cuts=[2]") else [override])


def test_yaml_must_be_a_mapping(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (["dist.device=gpu"], "dist.device='gpu'"),
        (["dist.device=1"], "dist.device='1'"),
        (["dist.gpus_per_stage=1.5"], "dist.gpus_per_stage=1.5"),
        (["dist.gpus_per_stage=-0.5"], "dist.gpus_per_stage=-0.5"),
        (["dist.gpus_per_stage=half"], "dist.gpus_per_stage='half'"),
        (["dist.scale_timeout=0"], "dist.scale_timeout=0"),
        (["dist.scale_timeout=nan"], "dist.scale_timeout="),
        (["dist.device=cpu", "dist.gpus_per_stage=0.5"], "dist.gpus_per_stage=0.5"),
        (["dist.device=cpu", "transport=nccl"], "dist.device=cpu"),
        (["transport=nccl", "dist.gpus_per_stage=0.5"], "dist.gpus_per_stage=0.5"),
    ],
)
def test_bad_placement_keys_are_one_line_and_exit_2(settings: list[str], named: str, capsys) -> None:
    from dni_dist import cli

    args = ["train", "--check", "--runtime", "ray", *(a for s in settings for a in ("--set", s))]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dni-dist: error: ") and named in err, err
