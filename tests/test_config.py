"""Config validation: one clear line naming the key for every kind of bad input."""

from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from engineforge import backends, config, settings
from engineforge.errors import ConfigError
from engineforge.job import Canonical
from engineforge.runner import stage_module

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


def slice_of(m: dict, stage: str, **wildcards) -> dict:
    """A stage's config slice for one job, as the rule hands it over (and fingerprints it)."""
    return Canonical(stage_module(stage).settings(m, {"model": "resnet18", **wildcards})).dump()


def test_stage_slices_isolate_precisions(raw):
    # setup
    cfg = config.resolve(raw, ROOT)
    changed = copy.deepcopy(raw)
    changed["models"]["resnet18"]["precision"]["int8"]["calib_size"] = 8
    cfg2 = config.resolve(changed, ROOT)
    a, b = cfg["models"]["resnet18"], cfg2["models"]["resnet18"]
    # execute / assert: only int8's precision slice differs
    for p in ("fp32", "fp16", "bf16"):
        assert slice_of(a, "precision", precision=p) == slice_of(b, "precision", precision=p)
    assert slice_of(a, "precision", precision="int8") != slice_of(b, "precision",
                                                                  precision="int8")
    assert slice_of(b, "precision", precision="int8")["method"]["calib_size"] == 8
    assert slice_of(a, "export") == slice_of(b, "export")


def settings_models() -> list[type]:
    return [cls for _, cls in inspect.getmembers(settings, inspect.isclass)
            if issubclass(cls, settings.Section) and cls.__module__ == settings.__name__]


def test_every_setting_has_a_description():
    # setup
    models = settings_models()
    defs = config.schema()["$defs"]
    # execute
    missing = [f"{cls.__name__}.{name}" for cls in models
               for name, field in cls.model_fields.items() if not field.description]
    undescribed = [f"{name}.{key}" for name, d in defs.items()
                   if name == "settings" or name in {cls.__name__ for cls in models}
                   for key, prop in d.get("properties", {}).items()
                   if not prop.get("description")]
    # assert
    assert settings.Settings in models and settings.QuantizeSettings in models
    assert missing == [] and undescribed == []  # in the code and in the printed schema


def test_builtin_defaults_validate_as_a_configs_defaults():
    # setup: a minimal model beside the built-in defaults, as a user would write them
    raw = {"defaults": settings.builtin_defaults(),
           "models": {"m": {"checkpoint": {"kind": "state_dict", "arch": "tinynets:TinyFCN"},
                            "inputs": {"x": {"shape": ["batch", 4]}},
                            "profiles": {"p": {"x": {"min": [1, 4], "opt": [2, 4],
                                                     "max": [4, 4]}}}}}}
    # execute
    config.validate(raw)  # raises ConfigError on any key the schema rejects
    resolved = config.resolve(raw | {"defaults": {**raw["defaults"], "precisions": ["fp32"]}})
    # assert
    assert set(raw["defaults"]) == set(config.schema()["$defs"]["settings"]["properties"])
    assert resolved["models"]["m"]["bench"] == raw["defaults"]["bench"]


def test_schema_backend_enum_is_the_registry():
    # setup
    props = config.schema()["$defs"]["settings"]["properties"]
    # execute
    enum = props["backends"]["items"]["enum"]
    # assert
    assert enum == backends.names()
    assert set(settings.builtin_defaults()["backends"]) <= set(enum)


@pytest.mark.parametrize("flag", [None, "--json"])
def test_schema_command_prints_every_settings_section(flag):
    # execute
    proc = subprocess.run([sys.executable, "-m", "engineforge.cli", "schema",
                           *([flag] if flag else [])], capture_output=True, text=True,
                          timeout=120)
    # assert
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout) if flag else yaml.safe_load(proc.stdout)
    assert doc == json.loads(json.dumps(config.schema()))
    props = doc["$defs"]["settings"]["properties"]
    assert set(props) == set(settings.Settings.model_fields)
    for section in ("export", "simplify", "precision", "tolerances", "bench", "tensorrt"):
        assert props[section]["description"] and "default" in props[section]
    tensorrt = doc["$defs"]["TensorRTSettings"]["properties"]
    assert tensorrt["workspace_mib"]["default"] == 2048
    assert tensorrt["workspace_mib"]["description"] == "Builder workspace limit (MiB)."


def test_load_reports_yaml_errors(tmp_path):
    # setup
    bad = tmp_path / "c.yaml"
    bad.write_text("models: [unclosed\n")
    # execute / assert
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
