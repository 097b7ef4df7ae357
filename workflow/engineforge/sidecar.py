"""Content hashes, fingerprints, and atomic writes of artifacts and JSON sidecars.

Every stage output has a sidecar ``<name>.json``: what went in (content hashes),
with which settings and tool versions, what came out, and the fingerprint that
ties them together. Outputs are written to a temporary name and renamed, so an
interrupted job never leaves a file a later run would trust. Temporary names carry the
writer's pid and host, so a later run can tell a dead writer's leftovers from a live one's
(``integrity.sweep`` removes the former).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SIDECAR_VERSION = 1


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(input_hashes: dict, config_slice: dict, tools: dict,
                device: str | None = None) -> str:
    """hash(input content hashes, config slice, tool versions, device class)."""
    payload = {"inputs": input_hashes, "config": config_slice, "tools": tools,
               "device": device, "v": SIDECAR_VERSION}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def writer() -> str:
    """``<pid>@<host>``: who writes a temporary file (see ``integrity.TEMP_FILE``)."""
    return f"{os.getpid()}@{socket.gethostname()}"


def scratch_prefix() -> str:
    """Name prefix of a scratch directory in the artifacts tree: the runner's staging
    directories' form (``.staging-<host>-<pid>-``), so stale ones are found the same way."""
    return f".staging-{socket.gethostname()}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.<name>.<pid>@<host>.<random>.tmp``);
    rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer()}.", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are shared read-only
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def cpu_device() -> str:
    return f"cpu:{platform.machine()}:{os.cpu_count()}cores"


def where_ran(started_at: float, finished_at: float) -> dict:
    """Where and when a job's work ran: the host, the Slurm job (when the job is one: the
    executor plugin runs each job inside ``sbatch``), start and end in epoch seconds."""
    env = os.environ
    return {"host": socket.gethostname(), "slurm_job_id": env.get("SLURM_JOB_ID"),
            "slurm_cluster": env.get("SLURM_CLUSTER_NAME"),
            "slurm_partition": env.get("SLURM_JOB_PARTITION"),
            "started_at": round(started_at, 3), "finished_at": round(finished_at, 3)}


def output_record(path: str | os.PathLike) -> dict:
    st = os.stat(path)
    return {"path": str(path), "sha256": sha256_file(path), "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def make_sidecar(*, stage: str, model: str, inputs: dict[str, str | os.PathLike],
                 config_slice: dict, tools: dict, outputs: dict[str, str | os.PathLike],
                 result: dict | None = None, device: str | None = None,
                 input_hashes: dict[str, str] | None = None) -> dict:
    """Build a sidecar dict; ``inputs``/``outputs`` map roles to file paths.

    Each output's size and ``mtime_ns`` are recorded with its hash: a rename keeps the
    mtime, so a published file whose stat still matches needs no re-hash to be trusted."""
    if input_hashes is None:
        input_hashes = {role: sha256_file(p) for role, p in inputs.items()}
    output_hashes = {role: output_record(p) for role, p in outputs.items()
                     if Path(p).is_file()}
    return {
        "sidecar_version": SIDECAR_VERSION,
        "stage": stage,
        "model": model,
        "fingerprint": fingerprint(input_hashes, config_slice, tools, device),
        "inputs": {role: {"path": str(p), "sha256": input_hashes[role]}
                   for role, p in inputs.items()},
        "config": config_slice,
        "tools": tools,
        "device": device,
        "outputs": output_hashes,
        "result": result or {},
    }
