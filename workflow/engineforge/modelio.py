"""Shared helpers for model inputs: dtypes, shapes, sample data.

Reference data for the audit comes from the model's evaluation or calibration
data when it fits the profile's opt shape, else from seeded random values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


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
