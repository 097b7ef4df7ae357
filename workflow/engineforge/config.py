"""Load, validate and resolve config.yaml into per-model settings.

Layers, later wins: built-in ``defaults.yaml`` < config ``defaults:`` < the model.
Validation errors become one :class:`ConfigError` line naming the key and what
is allowed; nothing here imports torch or ONNX.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml

from engineforge.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMA_PATH = PACKAGE_DIR.parent / "schemas" / "config.schema.yaml"
DEFAULTS_PATH = PACKAGE_DIR / "defaults.yaml"

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
QUANTIZED = ("int8", "fp8")
BACKENDS = ("onnxruntime", "tensorrt-rtx", "tensorrt", "trtexec")
SETTINGS_KEYS = ("opset", "precisions", "backends", "export", "simplify", "precision",
                 "tolerances", "bench", "tensorrt")


@functools.cache
def _schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


@functools.cache
def builtin_defaults() -> dict:
    return yaml.safe_load(DEFAULTS_PATH.read_text())


def deep_merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; lists and scalars in ``override`` replace."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _key_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate(raw: Any) -> None:
    """JSON-schema validation; the most specific error becomes one line."""
    import jsonschema

    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping, got {type(raw).__name__}.",
                          fix="start from the repository's config.yaml")
    validator = jsonschema.Draft202012Validator(_schema())
    errors = list(validator.iter_errors(raw))
    if not errors:
        return
    # A bad value inside `allOf: settings` also makes its key "unevaluated"; report the
    # bad value itself, and the deepest error (the most specific key).
    specific = [e for e in errors if e.validator != "unevaluatedProperties"] or errors
    deepest = max(len(e.absolute_path) for e in specific)
    best = jsonschema.exceptions.best_match(
        [e for e in specific if len(e.absolute_path) == deepest])
    key = _key_path(best)
    model = None
    parts = list(best.absolute_path)
    if len(parts) >= 2 and parts[0] == "models":
        model = str(parts[1])
    allowed = ""
    schema = best.schema if isinstance(best.schema, dict) else {}
    if "enum" in schema:
        allowed = f" Allowed: {', '.join(map(str, schema['enum']))}."
    raise ConfigError(f"invalid config at '{key}': {best.message}.{allowed}", model=model, key=key,
                      fix="correct that key (see the comments in config.yaml and "
                          "workflow/schemas/config.schema.yaml)")


def resolve(raw: dict, root: str | os.PathLike = ".") -> dict:
    """Validate ``raw`` and return it with every model's settings fully merged.

    The result keeps the config's shape (``models: {name: settings}``) so that
    Snakemake rules and tests read one structure.
    """
    validate(raw)
    root = Path(root)
    base = deep_merge(builtin_defaults(), raw.get("defaults") or {})
    models = {}
    for name, model in raw["models"].items():
        merged = deep_merge(base, model)
        merged.setdefault("task", "regression")
        _check_model(name, merged, root)
        models[name] = merged
    return {
        "experiment": raw.get("experiment", "engineforge"),
        "artifacts": raw.get("artifacts", "artifacts"),
        "models": models,
    }


def _check_model(name: str, m: dict, root: Path) -> None:
    """Cross-field checks JSON schema cannot express."""
    ckpt = m["checkpoint"]
    if ckpt.get("path") and not (root / ckpt["path"]).is_file():
        raise ConfigError(f"checkpoint file '{ckpt['path']}' does not exist.", model=name,
                          key=f"models.{name}.checkpoint.path",
                          fix="point it at an existing file (paths are relative to the "
                              "config's directory)")
    for section in ("calibration", "evaluation"):
        if section in m and not (root / m[section]["path"]).is_file():
            raise ConfigError(f"{section} data '{m[section]['path']}' does not exist.",
                              model=name, key=f"models.{name}.{section}.path",
                              fix="create the .npz or remove the section")
    needs_calib = [p for p in m["precisions"] if p in QUANTIZED]
    if needs_calib and "calibration" not in m:
        raise ConfigError(f"precisions {needs_calib} need calibration data.", model=name,
                          key=f"models.{name}.calibration",
                          fix="add calibration: {path: calib/<file>.npz} or drop int8/fp8")
    for pname, profile in m["profiles"].items():
        if set(profile) != set(m["inputs"]):
            raise ConfigError(
                f"profile '{pname}' gives shapes for {sorted(profile)} but the model's "
                f"inputs are {sorted(m['inputs'])}.", model=name,
                key=f"models.{name}.profiles.{pname}", fix="give min/opt/max for every input")
        for iname, shapes in profile.items():
            dims = m["inputs"][iname]["shape"]
            key = f"models.{name}.profiles.{pname}.{iname}"
            for which in ("min", "opt", "max"):
                shape = shapes[which]
                if len(shape) != len(dims):
                    raise ConfigError(f"{which} shape {shape} has rank {len(shape)}, input "
                                      f"'{iname}' has rank {len(dims)} ({dims}).", model=name,
                                      key=key, fix="use one number per dimension")
                for d, s in zip(dims, shape):
                    if isinstance(d, int) and d != s:
                        raise ConfigError(f"{which} shape {shape} changes static dimension "
                                          f"{d} of input '{iname}' ({dims}).", model=name,
                                          key=key, fix="only named (dynamic) dims may vary")
            for lo, mid, hi in zip(shapes["min"], shapes["opt"], shapes["max"]):
                if not lo <= mid <= hi:
                    raise ConfigError(f"needs min <= opt <= max per dimension, got "
                                      f"{shapes['min']} / {shapes['opt']} / {shapes['max']}.",
                                      model=name, key=key, fix="reorder the shapes")


def load(path: str | os.PathLike) -> dict:
    """Read and resolve a config file (paths resolve relative to its directory)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found.",
                          fix="pass --configfile PATH") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}".replace("\n", " "),
                          fix="fix the YAML syntax") from None
    return resolve(raw, path.parent)


# --- config slices: what each stage's output depends on -------------------------------

def reference_data(m: dict) -> dict | None:
    """The data set the export's reference inputs come from: evaluation, else calibration."""
    return m.get("evaluation") or m.get("calibration")


def stage_slice(m: dict, stage: str, precision: str | None = None,
                profile: str | None = None, backend: str | None = None) -> dict:
    """The part of a model's settings that a stage's output depends on.

    Used for fingerprints and as Snakemake ``params`` so that editing one
    precision's settings reruns only that precision's jobs.
    """
    # export and simplify see one shape only: the first profile's opt (reference data,
    # onnxsim's test shapes); dynamic dims stay symbolic, so other shapes do not matter.
    ref_shapes = {i: s["opt"] for i, s in next(iter(m["profiles"].values())).items()}
    if stage == "export":
        return {k: m[k] for k in ("checkpoint", "inputs", "opset", "export", "simplify")} | {
            "reference_shapes": ref_shapes, "task": m["task"],
            "reference_data": reference_data(m)}
    if stage == "simplify":
        return {"simplify": m["simplify"], "reference_shapes": ref_shapes}
    if stage == "precision":
        s = {"precision": precision, "settings": m["precision"].get(precision, {})}
        if precision in QUANTIZED:
            s["calibration"] = m["calibration"]
        return s
    if stage == "audit":
        return {"precision": precision, "task": m["task"],
                "tolerance": m["tolerances"].get(precision, {}),
                "evaluation": m.get("evaluation")}
    if stage == "build":
        shapes = m["profiles"] if profile == "all" else m["profiles"].get(profile)
        s = {"backend": backend, "precision": precision, "profile": profile, "shapes": shapes}
        if backend != "onnxruntime":
            s["tensorrt"] = m["tensorrt"]
        return s
    if stage == "bench":
        s = {"backend": backend, "precision": precision, "profile": profile,
             "shapes": m["profiles"].get(profile), "bench": m["bench"]}
        if backend != "onnxruntime":
            s["tensorrt"] = m["tensorrt"]
        return s
    if stage == "baseline":
        return {"profile": profile, "shapes": m["profiles"].get(profile), "bench": m["bench"]}
    raise ValueError(f"unknown stage {stage}")
