"""Load, validate and resolve config.yaml into per-model settings.

Layers, later wins: built-in defaults (``settings.Settings``) < config ``defaults:`` < the
model.
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
from engineforge.settings import QUANTIZED

PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMA_PATH = PACKAGE_DIR.parent / "schemas" / "config.schema.yaml"


@functools.cache
def schema() -> dict:
    """config.schema.yaml with its ``settings`` definitions generated from the typed
    settings and the backend registry (see settings.py)."""
    from engineforge.backends import names
    from engineforge.settings import settings_schema

    doc = yaml.safe_load(SCHEMA_PATH.read_text())
    doc["$defs"].update(settings_schema(names()))
    return doc


def builtin_defaults() -> dict:
    from engineforge.settings import builtin_defaults as defaults

    return defaults()


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
    validator = jsonschema.Draft202012Validator(schema())
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
    failed = best.schema if isinstance(best.schema, dict) else {}
    if "enum" in failed:
        allowed = f" Allowed: {', '.join(map(str, failed['enum']))}."
    raise ConfigError(f"invalid config at '{key}': {best.message}.{allowed}", model=model, key=key,
                      fix="correct that key (see the comments in config.yaml, or "
                          "`engineforge schema` for every key)")


def resolve(raw: dict, root: str | os.PathLike = ".") -> dict:
    """Validate ``raw`` and return it with every model's settings fully merged.

    The result keeps the config's shape (``models: {name: settings}``) so that
    Snakemake rules and tests read one structure. ``trust`` (``signing.parse_trust``) is
    not a model setting: it is in no fingerprint.
    """
    from engineforge.signing import parse_trust

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
        "trust": parse_trust(raw.get("trust"), root),
    }


RELATIVE_PATHS = ("paths are relative to the directory the pipeline runs in: the current one, "
                  "or --directory")


def _check_model(name: str, m: dict, root: Path) -> None:
    """Cross-field checks JSON schema cannot express."""
    ckpt = m["checkpoint"]
    if ckpt.get("path") and not (root / ckpt["path"]).is_file():
        what = "is a directory" if (root / ckpt["path"]).is_dir() else "does not exist"
        raise ConfigError(f"checkpoint file '{ckpt['path']}' {what}.", model=name,
                          key=f"models.{name}.checkpoint.path",
                          fix=f"point it at an existing file ({RELATIVE_PATHS})")
    for iname, spec in m["inputs"].items():
        lo, hi = spec.get("range") or (0, 1)
        if lo > hi:  # equal: a constant input (integers are drawn from [low, high])
            raise ConfigError(f"input '{iname}' has range [{lo}, {hi}]: low is above high.",
                              model=name, key=f"models.{name}.inputs.{iname}.range",
                              fix="give [low, high] with low <= high")
    for section in ("calibration", "evaluation"):
        if section in m and not (root / m[section]["path"]).is_file():
            raise ConfigError(f"{section} data '{m[section]['path']}' does not exist.",
                              model=name, key=f"models.{name}.{section}.path",
                              fix=f"create the .npz or remove the section ({RELATIVE_PATHS})")
    needs_calib = [p for p in m["precisions"] if p in QUANTIZED]
    if needs_calib and "calibration" not in m:
        raise ConfigError(f"precisions {needs_calib} need calibration data.", model=name,
                          key=f"models.{name}.calibration",
                          fix="add calibration: {path: calib/<file>.npz} or drop int8/fp8")
    repair = m.get("repair")
    asked = repair.get("precisions") if isinstance(repair, dict) else None
    if asked and set(asked) - set(m["precisions"]):
        missing = sorted(set(asked) - set(m["precisions"]))
        raise ConfigError(f"repair.precisions {missing} are not among the model's precisions "
                          f"{m['precisions']}.", model=name, key=f"models.{name}.repair",
                          fix="add them to precisions or remove them from repair.precisions")
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


def read(path: str | os.PathLike) -> dict:
    """A config file as written (not resolved): one line for a missing file, a YAML syntax
    error (with its line and column) or a document that is not a mapping."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found.",
                          fix="pass --configfile PATH") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err}.",
                          fix="check the path and its permissions") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}.",
                          fix="fix the YAML syntax there (indent with spaces, quote values "
                              "holding ':' or '#')") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of keys (experiment, "
                          f"artifacts, defaults, models), got {type(raw).__name__}.",
                          fix="start from the repository's config.yaml")
    return raw


def load(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    """Read and resolve a config file; its paths resolve in ``root`` (the directory the
    workflow runs in), default the config's own directory."""
    path = Path(path)
    return resolve(read(path), path.parent if root is None else root)


def check_artifacts(path: str | os.PathLike) -> None:
    """The artifacts directory must be a directory this process can write (created here)."""
    path = Path(path)
    fix = "set `artifacts:` to a writable directory"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"artifacts path '{path}' is a file, not a directory.",
                          key="artifacts", fix=fix + " (or move the file away)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"artifacts directory '{path}' is not writable: "
                          f"{err.strerror or err}.", key="artifacts", fix=fix) from None
