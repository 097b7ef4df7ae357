"""Config validation: one clear line naming the key for every kind of bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from engineforge import config
from engineforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_repository_config_resolves(raw):
    # execute
    cfg = config.resolve(raw, ROOT)
    # assert
    assert set(cfg["models"]) == {"digits_cnn", "resnet18", "tiny_sr"}
    resnet = cfg["models"]["resnet18"]
    assert resnet["precision"]["int8"]["calib_size"] == 16            # model override
    assert resnet["precision"]["int8"]["calibration_method"] == "max"  # built-in default
    assert resnet["bench"]["iterations"] == 30                          # config defaults
    assert len(cfg["models"]["tiny_sr"]["profiles"]) == 2


@pytest.mark.parametrize("mutate, key, words", [
    (lambda r: r["models"]["resnet18"].update(precisions=["fp32", "fp4"]),
     "models.resnet18.precisions.1", "Allowed: fp32, fp16, bf16, int8, fp8"),
    (lambda r: r["models"]["resnet18"].update(bogus=1), "models.resnet18", "bogus"),
    (lambda r: r["defaults"].update(opset=7), "defaults.opset", "minimum"),
    (lambda r: r["models"]["resnet18"].pop("profiles"), "models.resnet18", "profiles"),
    (lambda r: r["models"]["tiny_sr"]["checkpoint"].update(kind="keras"),
     "models.tiny_sr.checkpoint", ""),
])
def test_schema_errors_name_the_key(raw, mutate, key, words):
    # setup
    mutate(raw)
    # execute
    with pytest.raises(ConfigError) as info:
        config.resolve(raw, ROOT)
    # assert
    msg = str(info.value)
    assert f"key={key}" in msg and words in msg
    assert "\n" not in msg and "Fix:" in msg


@pytest.mark.parametrize("mutate, key, words", [
    (lambda m: m["checkpoint"].update(path="models/missing.safetensors"),
     "models.digits_cnn.checkpoint.path", "does not exist"),
    (lambda m: m.pop("calibration"), "models.digits_cnn.calibration", "need calibration"),
    (lambda m: m["profiles"]["bs1-64"]["image"].update(min=[1, 1, 8]),
     "models.digits_cnn.profiles.bs1-64.image", "rank"),
    (lambda m: m["profiles"]["bs1-64"]["image"].update(opt=[16, 3, 8, 8]),
     "models.digits_cnn.profiles.bs1-64.image", "static dimension"),
    (lambda m: m["profiles"]["bs1-64"]["image"].update(min=[32, 1, 8, 8]),
     "models.digits_cnn.profiles.bs1-64.image", "min <= opt <= max"),
    (lambda m: m["profiles"]["bs1-64"].update(extra={"min": [1], "opt": [1], "max": [1]}),
     "models.digits_cnn.profiles.bs1-64", "gives shapes for"),
])
def test_cross_field_errors(raw, mutate, key, words):
    # setup
    mutate(raw["models"]["digits_cnn"])
    # execute
    with pytest.raises(ConfigError) as info:
        config.resolve(raw, ROOT)
    # assert
    assert f"key={key}" in str(info.value) and words in str(info.value)
    assert "model=digits_cnn" in str(info.value)


def test_stage_slices_isolate_precisions(raw):
    # setup
    cfg = config.resolve(raw, ROOT)
    changed = copy.deepcopy(raw)
    changed["models"]["resnet18"]["precision"]["int8"]["calib_size"] = 8
    cfg2 = config.resolve(changed, ROOT)
    a, b = cfg["models"]["resnet18"], cfg2["models"]["resnet18"]
    # execute / assert: only int8's precision slice differs
    for p in ("fp32", "fp16", "bf16"):
        assert config.stage_slice(a, "precision", precision=p) == config.stage_slice(
            b, "precision", precision=p)
    assert config.stage_slice(a, "precision", precision="int8") != config.stage_slice(
        b, "precision", precision="int8")
    assert config.stage_slice(a, "export") == config.stage_slice(b, "export")


def test_load_reports_yaml_errors(tmp_path):
    # setup
    bad = tmp_path / "c.yaml"
    bad.write_text("models: [unclosed\n")
    # execute / assert
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
