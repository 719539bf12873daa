import subprocess
import sys

import pytest

from dlmtrain.config import batch_split, load_config
from dlmtrain.errors import ConfigError


def test_demo_composes_groups_and_overrides():
    cfg = load_config("configs/demo.yaml", ["model=small", "optim.lr=1e-3", "trainer.max_steps=7"])
    assert cfg.model.name == "small" and cfg.model.hidden_size == 768 and cfg.model.n_layers == 12
    assert cfg.optim.lr == 1e-3 and cfg.trainer.max_steps == 7
    assert cfg.objective.name == "mdlm" and cfg.trainer.accelerator == "cpu"


def test_file_body_beats_group_and_override_beats_body():
    cfg = load_config("configs/demo.yaml")
    assert cfg.optim.lr == 2e-3  # demo.yaml body over optim/adamw.yaml (3e-4)
    assert cfg.optim.betas == [0.9, 0.98]
    assert load_config("configs/demo.yaml", ["optim.lr=5e-4"]).optim.lr == 5e-4


def test_config_path_relative_to_configs_dir():
    assert load_config("demo.yaml").run.name == "demo"


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("optim.lrr=1", "optim.lr"),
        ("trainer.max_step=3", "trainer.max_steps"),
        ("modle.hidden_size=3", "unknown config key"),
        ("optim.lr=fast", "optim.lr"),
        ("model=huge", "no model config named 'huge'"),
        ("objective.schedule=quadratic", "objective.schedule='quadratic' is not one of"),
        ("model.n_heads=5", "divisible"),
        ("nonsense", "key=value"),
    ],
)
def test_bad_overrides_raise_config_errors(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize(
    "g,m,w,expect", [(32, 0, 1, (32, 1)), (32, 0, 4, (8, 1)), (32, 4, 2, (4, 4)), (512, 8, 16, (8, 4))]
)
def test_batch_split(g, m, w, expect):
    assert batch_split(g, m, w) == expect


@pytest.mark.parametrize("g,m,w", [(30, 0, 4), (32, 3, 2), (32, 8, 8)])
def test_batch_split_errors(g, m, w):
    with pytest.raises(ConfigError, match="not divisible"):
        batch_split(g, m, w)


def test_cli_reports_bad_key_in_one_line_with_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dlmtrain.cli", "train", "configs/demo.yaml", "optim.lrr=1", f"run.dir={tmp_path}"],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "optim.lrr" in r.stderr and "optim.lr" in r.stderr


def test_objective_sections_are_typed_per_objective():
    cfg = load_config("configs/demo.yaml", ["objective.name=sedd", "objective.graph=uniform"])
    assert cfg.objective.name == "sedd" and cfg.objective.graph == "uniform" and "schedule" not in cfg.objective
    with pytest.raises(ConfigError, match="it is an option of objective sedd / d3pm, not of mdlm"):
        load_config("configs/demo.yaml", ["objective.graph=uniform"])
    with pytest.raises(ConfigError, match="objective.name='foo'"):
        load_config("configs/demo.yaml", ["objective.name=foo"])
    with pytest.raises(ConfigError, match="objective.graph='ring' is not one of"):
        load_config("configs/demo.yaml", ["objective.name=sedd", "objective.graph=ring"])
