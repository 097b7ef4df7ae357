"""Versions of the tools whose upgrade changes a stage's output.

Read from package metadata (no heavy imports), so the Snakefile can put them
into ``params:`` and Snakemake reruns exactly the stages a tool upgrade affects.
``ENGINEFORGE_TOOL_VERSIONS='{"onnxsim": "9.9"}'`` overrides entries: it
simulates an upgrade in tests and pins a version that metadata cannot see
(e.g. a trtexec binary).
"""

from __future__ import annotations

import json
import os
from importlib import metadata


def overrides() -> dict:
    """``ENGINEFORGE_TOOL_VERSIONS`` as a dict; anything else is one line (ConfigError)."""
    raw = os.environ.get("ENGINEFORGE_TOOL_VERSIONS")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        from engineforge.errors import ConfigError

        raise ConfigError(f"ENGINEFORGE_TOOL_VERSIONS={raw[:80]!r} is not a JSON object of "
                          "versions", key="ENGINEFORGE_TOOL_VERSIONS",
                          fix='set it like \'{"onnxsim": "0.4.36"}\', or unset it')
    return value


def version(dist: str) -> str:
    over = overrides()
    if dist in over:
        return str(over[dist])
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def versions(dists) -> dict:
    return {d: version(d) for d in dists}


def tool_versions(stage: str, backend: str | None = None) -> dict:
    """Versions of the tools a stage's output depends on (its ``TOOLS``), plus the
    backend's own (``Backend.tools``) for per-backend jobs."""
    import importlib

    from engineforge.backends import backend_class
    from engineforge.stages import STAGES

    dists = list(getattr(importlib.import_module(STAGES[stage]), "TOOLS", ()))
    if backend:
        dists = list(backend_class(backend).tools) + dists
    return versions(dists)
