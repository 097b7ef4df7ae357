"""Shared helpers for model inputs: dtypes, shapes, sample data, batches.

Reference data for the audit comes from the model's evaluation or calibration
data when it fits the profile's opt shape, else from seeded random values.
:func:`load_data` is the one reader of user data (calibration / evaluation ``.npz``):
it refuses bad data before any work, with one line naming the config key.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from engineforge.errors import EngineforgeError

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64,
             "int32": np.int32}


def input_dtype(inputs: dict, name: str):
    """numpy dtype of input ``name``; ``inputs`` is a model's ``inputs:`` section."""
    return NP_DTYPES[inputs[name].get("dtype", "float32")]


def dynamic_dims(inputs: dict) -> dict[str, dict[int, str]]:
    """{input: {axis: dim_name}} for every named (dynamic) dimension."""
    return {name: {i: d for i, d in enumerate(spec["shape"]) if isinstance(d, str)}
            for name, spec in inputs.items()}


def shapes_at(profile: dict, which: str) -> dict[str, list[int]]:
    """{input: shape} at min/opt/max of one profile."""
    return {iname: list(s[which]) for iname, s in profile.items()}


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` this workflow wrote (user data: :func:`load_data`)."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def labels_key(m: dict) -> str | None:
    """Name of the labels array of a model's evaluation data (None: no accuracy pass)."""
    if "evaluation" in m and m["task"] == "classification":
        return m["evaluation"].get("labels", "labels")
    return None


def _non_finite(arr: np.ndarray) -> str | None:
    """'N NaN and M Inf of K values', or None when every value is finite."""
    if arr.dtype.kind not in "fc":
        return None
    nan = int(np.isnan(arr).sum())
    inf = int(np.isinf(arr).sum())
    return f"{nan} NaN and {inf} Inf of {arr.size} values" if nan or inf else None


def load_data(path: str | Path, inputs: dict, *, model: str, section: str,
              labels: str | None = None, profile: dict | None = None,
              error_cls: type = EngineforgeError) -> dict[str, np.ndarray]:
    """A model's ``section`` data (calibration / evaluation ``.npz``), checked before use.

    Returns one array per model input (samples first, cast to the input's dtype) and, with
    ``labels``, that labels array. Refused with one ``error_cls`` line (key
    ``models.<model>.<section>.path``, or ``...evaluation.labels``): a file that is not a
    readable ``.npz``, a missing or empty array, NaN/Inf values, a rank or static dim that
    does not fit the input, different sample counts, labels that are not one non-negative
    integer per sample; with ``profile`` (data the engines run), a named dim outside the
    profile's min..max. (Labels beyond the model's classes: the audit, once outputs exist.)
    """
    key = f"models.{model}.{section}.path"

    def refuse(problem: str, fix: str, where: str = key):
        raise error_cls(f"{section} data '{path}' {problem}", model=model, key=where,
                        fix=fix) from None

    names = list(inputs) + ([labels] if labels else [])
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        refuse(f"cannot be read as .npz ({type(err).__name__}: "
               f"{(str(err).splitlines() or [''])[0][:200]})",
               "save it with numpy.savez(path, <input name>=array, ...)")
    if not isinstance(npz, np.lib.npyio.NpzFile):
        refuse("is a single .npy array, not an .npz archive",
               f"save one array per input with numpy.savez(path, {list(inputs)[0]}=array)")
    with npz:
        files = sorted(npz.files)
        if not files:
            refuse("holds no arrays", f"save one array per model input, named {list(inputs)}")
        for name in inputs:
            if name not in files:
                refuse(f"has no array '{name}' (it has {files})",
                       f"save one array per model input, named {list(inputs)}")
        if labels and labels not in files:
            refuse(f"has no labels array '{labels}' (it has {files})",
                   f"save the class indices as '{labels}', or name the array in "
                   f"models.{model}.evaluation.labels", f"models.{model}.evaluation.labels")
        arrays = {}
        for name in names:
            try:
                arrays[name] = npz[name]
            except Exception as err:  # noqa: BLE001 - zlib, CRC, truncation, pickled objects
                refuse(f"array '{name}' cannot be read ({type(err).__name__}: "
                       f"{(str(err).splitlines() or [''])[0][:200]})",
                       "re-save the file with numpy.savez (numeric arrays only)")
    counts = {}
    for name, spec in inputs.items():
        arr, dims = arrays[name], spec["shape"]
        if arr.dtype.kind not in "biuf":
            refuse(f"array '{name}' has dtype {arr.dtype}, not numbers",
                   f"save '{name}' as a numeric array ({spec.get('dtype', 'float32')})")
        if arr.ndim != len(dims):
            refuse(f"array '{name}' has shape {list(arr.shape)}: rank {arr.ndim}, but input "
                   f"'{name}' has rank {len(dims)} ({dims}, samples along the first axis)",
                   f"stack the samples along the first axis: shape [N, "
                   f"{', '.join(map(str, dims[1:]))}]")
        wrong = [i for i, d in enumerate(dims) if i and isinstance(d, int) and arr.shape[i] != d]
        if wrong:
            refuse(f"array '{name}' has shape {list(arr.shape)} but input '{name}' is {dims}: "
                   f"dim {wrong[0]} must be {dims[wrong[0]]}",
                   f"save samples of the model's input shape {dims}")
        for i in range(1, len(dims)) if profile else ():
            lo, hi = profile[name]["min"][i], profile[name]["max"][i]
            if not lo <= arr.shape[i] <= hi:
                refuse(f"array '{name}' has shape {list(arr.shape)}: dim {i} "
                       f"({dims[i]}) is outside the first profile's {lo}..{hi}",
                       f"resize the samples, or widen models.{model}.profiles (the first "
                       "profile's engines run them)")
        if not arr.size:
            refuse(f"array '{name}' holds no values (shape {list(arr.shape)})",
                   "add samples")
        if bad := _non_finite(arr):
            refuse(f"array '{name}' holds {bad}",
                   "remove or repair those samples (numpy.isfinite) and save it again")
        counts[name] = len(arr)
        arrays[name] = np.ascontiguousarray(arr.astype(input_dtype(inputs, name)))
    if len(set(counts.values())) > 1:
        refuse(f"holds different sample counts per input ({counts})",
               "save the same number of samples for every input")
    if labels:
        lab, n = arrays[labels], next(iter(counts.values()))
        where = f"models.{model}.evaluation.labels"
        if lab.ndim != 1 or lab.dtype.kind not in "iu":
            refuse(f"labels '{labels}' must be 1-D integers (class indices); found "
                   f"{lab.dtype} of shape {list(lab.shape)}",
                   f"save them as numpy.asarray(labels, dtype=numpy.int64) of shape [{n}]",
                   where)
        if len(lab) != n:
            refuse(f"has {len(lab)} labels '{labels}' for {n} samples",
                   "save one label per sample, in the order of the samples", where)
        if (lab < 0).any():
            refuse(f"labels '{labels}' hold negative class indices (min {lab.min()})",
                   "labels are class indices 0..classes-1", where)
    return arrays


def check_labels(labels: np.ndarray, classes: int, *, path, model: str, name: str,
                 output: str, error_cls: type = EngineforgeError) -> None:
    """Labels must index the model's ``classes`` outputs (known once outputs exist)."""
    if len(labels) and int(labels.max()) >= classes:
        raise error_cls(f"evaluation data '{path}': labels '{name}' go up to "
                        f"{int(labels.max())}, but output '{output}' has {classes} classes",
                        model=model, key=f"models.{model}.evaluation.labels",
                        fix=f"labels must be class indices 0..{classes - 1} of the model's "
                            "first output (or point evaluation at this model's data)")


def batch_size(inputs: dict, profile: dict, samples: int) -> int:
    """Samples per batch of the audit and its reference: a static batch dim's size, else
    ``samples`` within the profile's batch range (dim 0 between min and max)."""
    static = [s["shape"][0] for s in inputs.values() if isinstance(s["shape"][0], int)]
    if static:
        return static[0]
    lo = max(p["min"][0] for p in profile.values())
    hi = min(p["max"][0] for p in profile.values())
    return max(lo, min(samples, hi))


def whole_batches(samples: int, batch: int) -> int:
    """``samples`` rounded up to whole batches (every batch of the audit is full)."""
    return -(-samples // batch) * batch


def run_batched(infer, feed: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``infer`` on every sample of ``feed`` in batches of ``batch``, outputs concatenated.

    A short last batch is filled up with the first samples (a static batch, or a profile's
    min, must be met) and its outputs are cut back to the real samples."""
    n = len(next(iter(feed.values())))
    parts: dict[str, list] = {}
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch) % n
        out = infer({k: v[idx] for k, v in feed.items()})
        keep = min(batch, n - start)
        for name, value in out.items():
            value = np.array(value)  # a copy: runners may reuse their output buffers
            parts.setdefault(name, []).append(value[:keep] if keep < batch else value)
    return {name: np.concatenate(vs) for name, vs in parts.items()}


def sample_inputs(inputs: dict, shapes: dict[str, list[int]], seed: int = 0,
                  data: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Inputs of the given shapes: rows of ``data`` where their shape fits, else random."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, shape in shapes.items():
        dtype = input_dtype(inputs, name)
        arr = None if data is None else data.get(name)
        if arr is not None and list(arr.shape[1:]) == list(shape[1:]) and len(arr):
            idx = np.arange(shape[0]) % len(arr)
            feed[name] = arr[idx].astype(dtype)
            continue
        lo, hi = inputs[name].get("range", [0.0, 1.0])
        if np.issubdtype(dtype, np.integer):
            feed[name] = rng.integers(int(lo), int(hi) + 1, size=shape).astype(dtype)
        else:
            feed[name] = rng.uniform(lo, hi, size=shape).astype(dtype)
    return feed
