"""Tracking against a real `mlflow server` on loopback: parallel jobs, the shared build
cache across two clones, and a tracking outage that `engineforge sync` recovers from."""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_raw_config, write_tiny_workspace
from engineforge import config
from engineforge.layout import Layout, files_of
from workflow_helpers import snakemake, write_config

pytestmark = pytest.mark.e2e
MLFLOW = Path(sys.executable).with_name("mlflow")


class Server:
    """`mlflow server` on a loopback port the OS picks as the server binds it (``--port
    0``), read back from the server's log: no port is picked, released and bound again (in
    between, another process could take it). A stopped server's port stays held (bound, not
    listening: connections are refused) until it starts again, so the outage is real."""

    RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+) ")

    def __init__(self, root: Path):
        self.root = root
        self.log = root / "server.log"
        self.port: int | None = None
        self.held: socket.socket | None = None
        self.proc = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300):
        """Start on a port of the OS's choosing; wait (as long as a loaded machine needs)
        until it answers on it."""
        seen = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", "0",
             "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", str(self.root / "server-artifacts"), "--workers", "2"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        port, deadline = None, time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if port is None:
                with open(self.log, "rb") as f:
                    f.seek(seen)
                    found = self.RUNNING.search(f.read().decode(errors="replace"))
                port = int(found.group(1)) if found else None
            else:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                except OSError:
                    pass
                else:
                    if self.held:
                        self.held.close()
                        self.held = None
                    self.port = port
                    return self
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"mlflow server did not answer (exit code {self.proc.poll()}, "
                           f"port {port}):\n{self.log.read_text()[-2000:]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # hold the port: a tracking client still pointed at it finds it closed
        held = socket.socket()
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 60
        while True:
            try:
                held.bind(("127.0.0.1", self.port))
                break
            except OSError:  # its workers may still be closing the listening socket
                if time.monotonic() > deadline:
                    held.close()
                    raise
                time.sleep(0.2)
        self.held = held

    def close(self):
        if self.proc.poll() is None:
            self.stop()
        if self.held:
            self.held.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow")).start()
    yield srv
    srv.close()


def _clone(tmp_path_factory, name):
    ws = tmp_path_factory.mktemp(name)
    write_tiny_workspace(ws)
    write_config(ws, tiny_raw_config(precisions=("fp32", "int8"),
                                     backends=("onnxruntime", "tensorrt-rtx")))
    return ws


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri, experiment="engineforge-tests"):
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _layout(ws) -> Layout:
    return Layout(str(ws / config.load(ws / "config.yaml")["artifacts"]))


def _outputs(ws) -> dict[str, dict]:
    """Every model's outputs by role (``Layout.model_outputs``); both backends build here."""
    models = config.load(ws / "config.yaml")["models"]
    return {name: _layout(ws).model_outputs(name, m["precisions"],
                                            {b: list(m["profiles"]) for b in m["backends"]},
                                            list(m["profiles"]))
            for name, m in models.items()}


def _stage_sidecars(ws):
    """Sidecars of the stages the MLflow cache serves: export, simplify, precision, build."""
    return [Path(f) for t in _outputs(ws).values()
            for f in files_of({k: t[k] for k in ("export", "simplify", "precision", "build")})]


def test_parallel_jobs_and_shared_cache_across_clones(server, tmp_path_factory):
    env = {"MLFLOW_TRACKING_URI": server.uri}
    # execute: clone 1 builds everything with 4 parallel jobs
    first = _clone(tmp_path_factory, "clone1")
    snakemake(first, env=env, cores=4)
    runs = _runs(server.uri)
    # assert: no lost runs (2 parents; tinycls 2x1x2 + tinyfcn 2x2x2 children)
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 2
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 12
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not any(json.loads(p.read_text()).get("cache") for p in _stage_sidecars(first))

    # execute: clone 2 (a fresh checkout elsewhere) against the same server
    second = _clone(tmp_path_factory, "clone2")
    proc = snakemake(second, env=env, cores=2)
    # assert: every export/simplify/precision/build output came from the cache, same bytes
    sidecars = _stage_sidecars(second)
    assert len(sidecars) == 2 + 2 + 4 + 2 + 12  # ... precisions, ORT int8 (ort_quantize), builds
    for path in sidecars:
        assert path.is_file(), path
        side = json.loads(path.read_text())
        assert side.get("cache", {}).get("hit") is True, path
        twin = json.loads((first / path.relative_to(second)).read_text())
        assert side["fingerprint"] == twin["fingerprint"]
        for role, out in side["outputs"].items():
            assert out["sha256"] == twin["outputs"][role]["sha256"]
    logs = [Path(p) for m in _outputs(second) for p in glob.glob(
        _layout(second).log("build-*", m))]
    assert len(logs) == 12 and "cache hit" in "".join(p.read_text() for p in logs)
    assert proc.returncode == 0


def test_outage_keeps_records_and_sync_uploads_them(server, tmp_path_factory):
    ws = _clone(tmp_path_factory, "outage")
    env = {"MLFLOW_TRACKING_URI": server.uri, "ENGINEFORGE_CACHE": "0"}
    before = len(_runs(server.uri))
    # setup: the server goes down (its port held: nothing else answers there)
    server.stop()
    down = server.uri
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    # execute: the build still finishes; tracking records stay on disk
    snakemake(ws, env=env)
    layout = _layout(ws)
    tracks = [json.loads(Path(layout.track(m)).read_text()) for m in _outputs(ws)]
    pending = list(Path(layout.pending_dir()).glob("*.json"))
    # assert
    assert [t["status"] for t in tracks] == ["pending", "pending"]
    assert len(pending) == 2
    assert Path(layout.summary("md")).exists()
    kept = {p.name: p.read_bytes() for p in pending}

    def sync() -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).with_name("engineforge")), "sync",
                               "--artifacts", layout.root],
                              env={**os.environ, "MLFLOW_TRACKING_URI": server.uri},
                              capture_output=True, text=True, cwd=ws, timeout=300)

    # execute: the server comes back (on a port of the OS's choosing); sync uploads what
    # was kept
    server.start()
    assert server.uri != down
    proc = sync()
    after_first = len(_runs(server.uri))
    # assert: nothing lost (positive control for the counts below), nothing pending
    assert proc.returncode == 0, proc.stderr
    assert after_first == before + 2 + 12
    assert not list(Path(layout.pending_dir()).glob("*.json"))
    # execute: a second sync, and a sync of the same records again (as a sync killed after
    # its upload, before it removed the records, leaves them)
    again = sync()
    after_again = len(_runs(server.uri))
    for name, data in kept.items():
        (Path(layout.pending_dir()) / name).write_bytes(data)
    replay = sync()
    # assert: neither logs anything twice
    assert again.returncode == 0 and again.stdout.startswith("nothing pending under")
    assert replay.returncode == 0, replay.stderr
    parents = dict(re.findall(r"^uploaded (\S+): parent run (\S+) ", proc.stdout, re.M))
    assert set(parents) == set(kept)
    assert sorted(replay.stdout.splitlines()) == sorted(
        f"uploaded {name}: parent run {run} (already logged)" for name, run in parents.items())
    assert after_again == len(_runs(server.uri)) == after_first
    assert not list(Path(layout.pending_dir()).glob("*.json"))
