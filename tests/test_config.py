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
    assert set(cfg["models"]) == {"digits_cnn", "resnet18", "tiny_sr", "thermal_hotspot",
                                  "outlier_cnn"}
    resnet = cfg["models"]["resnet18"]
    assert resnet["precision"]["int8"]["calib_size"] == 16            # model override
    assert resnet["precision"]["int8"]["calibration_method"] == "max"  # built-in default
    assert resnet["bench"]["iterations"] == 30                          # config defaults
    assert len(cfg["models"]["tiny_sr"]["profiles"]) == 2


SCHEMA_FIX = ("Fix: correct that key (see the comments in config.yaml, or `engineforge schema` "
              "for every key)")


@pytest.mark.parametrize("mutate, model, key, words", [
    (lambda r: r["models"]["resnet18"].update(precisions=["fp32", "fp4"]),
     "resnet18", "models.resnet18.precisions.1",
     "'fp4' is not one of ['fp32', 'fp16', 'bf16', 'int8', 'fp8']. "
     "Allowed: fp32, fp16, bf16, int8, fp8."),
    (lambda r: r["models"]["resnet18"].update(bogus=1), "resnet18", "models.resnet18",
     "('bogus' was unexpected)"),
    (lambda r: r["defaults"].update(opset=7), None, "defaults.opset",
     "7 is less than the minimum of 13"),
    (lambda r: r["models"]["resnet18"].pop("profiles"), "resnet18", "models.resnet18",
     "'profiles' is a required property"),
    (lambda r: r["models"]["tiny_sr"]["checkpoint"].update(kind="keras"),
     "tiny_sr", "models.tiny_sr.checkpoint", "'kind': 'keras'"),
])
def test_schema_errors_name_the_key(raw, mutate, model, key, words):
    # setup
    mutate(raw)
    # execute
    with pytest.raises(ConfigError) as info:
        config.resolve(raw, ROOT)
    # assert: [model=… stage=config key=…] invalid config at '<key>': <what>. Fix: <how>
    msg = str(info.value)
    where = f"model={model} stage=config" if model else "stage=config"
    assert msg.startswith(f"[{where} key={key}] invalid config at '{key}': "), msg
    assert words in msg and msg.endswith(SCHEMA_FIX)
    assert "\n" not in msg
    assert (info.value.model, info.value.key) == (model, key)


@pytest.mark.parametrize("mutate, key, words, fix", [
    (lambda m: m["checkpoint"].update(path="models/missing.safetensors"),
     "models.digits_cnn.checkpoint.path",
     "checkpoint file 'models/missing.safetensors' does not exist.",
     f"point it at an existing file ({config.RELATIVE_PATHS})"),
    (lambda m: m["checkpoint"].update(path="models"), "models.digits_cnn.checkpoint.path",
     "checkpoint file 'models' is a directory.",
     f"point it at an existing file ({config.RELATIVE_PATHS})"),
    (lambda m: m["inputs"]["image"].update(range=[1.0, -1.0]),
     "models.digits_cnn.inputs.image.range", "input 'image' has range [1.0, -1.0]: low is "
     "above high.", "give [low, high] with low <= high"),
    (lambda m: m.pop("calibration"), "models.digits_cnn.calibration",
     "precisions ['int8'] need calibration data.",
     "add calibration: {path: calib/<file>.npz} or drop int8/fp8"),
    (lambda m: m["profiles"]["bs1-64"]["image"].update(min=[1, 1, 8]),
     "models.digits_cnn.profiles.bs1-64.image",
     "min shape [1, 1, 8] has rank 3, input 'image' has rank 4", "use one number per dimension"),
    (lambda m: m["profiles"]["bs1-64"]["image"].update(opt=[16, 3, 8, 8]),
     "models.digits_cnn.profiles.bs1-64.image",
     "opt shape [16, 3, 8, 8] changes static dimension 1 of input 'image'",
     "only named (dynamic) dims may vary"),
    (lambda m: m["profiles"]["bs1-64"]["image"].update(min=[32, 1, 8, 8]),
     "models.digits_cnn.profiles.bs1-64.image", "needs min <= opt <= max per dimension, got "
     "[32, 1, 8, 8] / [16, 1, 8, 8] / [64, 1, 8, 8].", "reorder the shapes"),
    (lambda m: m["profiles"]["bs1-64"].update(extra={"min": [1], "opt": [1], "max": [1]}),
     "models.digits_cnn.profiles.bs1-64",
     "profile 'bs1-64' gives shapes for ['extra', 'image'] but the model's inputs are ['image']",
     "give min/opt/max for every input"),
])
def test_cross_field_errors(raw, mutate, key, words, fix):
    # setup
    mutate(raw["models"]["digits_cnn"])
    # execute
    with pytest.raises(ConfigError) as info:
        config.resolve(raw, ROOT)
    # assert
    msg = str(info.value)
    assert msg.startswith(f"[model=digits_cnn stage=config key={key}] "), msg
    assert words in msg and msg.endswith(f" Fix: {fix}")
    assert "\n" not in msg


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
    # execute
    with pytest.raises(ConfigError) as info:
        config.load(bad)
    # assert: the file, where it breaks, and the fix (no model or key: it is not parsed)
    msg = str(info.value)
    assert msg.startswith(f"[stage=config] config file '{bad}' is not valid YAML at line 2, "
                          "column 1: ")
    assert msg.endswith(" Fix: fix the YAML syntax there (indent with spaces, quote values "
                        "holding ':' or '#')")
    assert "\n" not in msg
