"""Credentials in the tracking URI never reach a terminal, a log, a sidecar, track.json, a
pending record or MLflow: checked by grepping everything a real run and `engineforge sync`
write, with positive controls that the secret was really given to them (and that MLflow
still sends the credentials to the server)."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from conftest import tiny_raw_config, write_tiny_workspace
from engineforge import mlflow_store, redaction
from engineforge.layout import Layout
from engineforge.stages import track
from workflow_helpers import engineforge, mlflow_runs, snakemake, write_config

PASSWORD = "S3cretPw0rd"
TOKEN = "T0kenXYZ123"
SECRETS = (PASSWORD, TOKEN)


def leaks(texts: dict[str, bytes]) -> list[str]:
    """Where any secret occurs: ``name: secret``."""
    return [f"{name}: {s}" for name, data in texts.items() for s in SECRETS
            if s.encode() in data]


def written(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def cli(*args: str, cwd: Path, uri: str) -> subprocess.CompletedProcess:
    """`engineforge ARGS` with ``uri`` and no credentials from the environment."""
    return engineforge(*args, cwd=cwd, uri=uri, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
                       drop=("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(var, "")  # restored at teardown, also when tracking_uri() sets it
        monkeypatch.delenv(var)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return monkeypatch


# -- units ------------------------------------------------------------------------------------
def test_redact_removes_credentials_and_tokens_and_keeps_the_rest(clean_env):
    clean_env.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@db.example:5000")
    text = (f"GET http://alice:{PASSWORD}@db.example:5000/api?token={TOKEN}&run=7 failed; "
            f"retry /?access_token={TOKEN}/api/2.0 (password {PASSWORD} in a message)")
    # execute
    out = redaction.redact(text)
    # assert: every secret gone, the rest as it was
    assert not any(s in out for s in SECRETS), out
    assert out.startswith("GET http://***@db.example:5000/api?token=***&run=7 failed")
    assert redaction.redact("http://db.example:5000/api/2.0?run=7") == (
        "http://db.example:5000/api/2.0?run=7")


def test_credentials_move_to_mlflow_variables(clean_env):
    clean_env.setenv("MLFLOW_TRACKING_URI", "https://alice:p%40ss-word@db.example:5000/mlflow")
    # execute
    uri = mlflow_store.tracking_uri()
    # assert: MLflow gets the URI without them, and the credentials through its variables
    assert uri == "https://db.example:5000/mlflow" == os.environ["MLFLOW_TRACKING_URI"]
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss-word"


def test_log_records_are_redacted_whatever_writes_them(clean_env, caplog):
    clean_env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:9/?token={TOKEN}")
    redaction.install_log_redaction()
    # execute: a library logs the URI, with and without %-args, and an exception
    lib = logging.getLogger("urllib3.connectionpool")
    with caplog.at_level(logging.WARNING):
        lib.warning("Retrying after connection broken: /?token=%s/api/2.0", TOKEN)
        lib.warning(f"plain text {TOKEN}")
        try:
            raise ConnectionError(f"http://u:{PASSWORD}@h:1/?token={TOKEN}")
        except ConnectionError:
            lib.exception("failed")
    # assert (positive control: the records are there)
    assert len(caplog.records) == 3 and "Retrying" in caplog.text
    assert not any(s in caplog.text for s in SECRETS), caplog.text


def test_mlflow_still_authenticates_but_no_secret_is_written(tmp_path, clean_env, caplog):
    """A fake tracking server that refuses every request and records the Authorization
    header: the credentials reach it (positive control), no record or message holds them."""
    seen = []

    class Refuse(BaseHTTPRequestHandler):
        def _refuse(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(503)
            self.end_headers()
            self.wfile.write(f"down; you sent {self.path}".encode())

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    clean_env.setenv("MLFLOW_TRACKING_URI",
                     f"http://alice:{PASSWORD}@127.0.0.1:{port}/?token={TOKEN}")
    record = {"experiment": "t", "model": "m", "id": "r1",
              "parent": {"name": "m", "tags": {}, "params": {}, "metrics": {}, "artifacts": []},
              "children": []}
    try:
        # execute
        with caplog.at_level(logging.INFO):
            status = track.track(record, tmp_path / "track.json", tmp_path / "artifacts")
    finally:
        server.shutdown()
    # assert
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert seen and seen[0] == basic
    assert status["status"] == "pending" and "503" in status["error"]
    assert status["uri"] == f"http://127.0.0.1:{port}/?token=***"
    assert not leaks(written(tmp_path)), leaks(written(tmp_path))
    assert not any(s in caplog.text for s in SECRETS)


# -- the workflow and `engineforge sync`, everything they write --------------------------------
class RefusingServer:
    """A tracking server that answers every request 503 (an outage: the run goes on, records
    stay pending) and records the Authorization header each request carried. Port 0: the
    socket stays bound from here until shutdown."""

    def __init__(self):
        self.seen: list[str | None] = []
        seen = self.seen

        class Refuse(BaseHTTPRequestHandler):
            def _refuse(self):
                seen.append(self.headers.get("Authorization"))
                self.send_response(503)
                self.end_headers()
                self.wfile.write(b"down")

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Refuse)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def shutdown(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    ws = tmp_path_factory.mktemp("secrets")
    write_tiny_workspace(ws)
    write_config(ws, tiny_raw_config())
    server = RefusingServer()
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{server.port}/?token={TOKEN}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    try:
        proc = snakemake(ws, env=env, check=False)
        seen = list(server.seen)
        yield ws, server.port, env, proc, seen
    finally:
        server.shutdown()


@pytest.mark.e2e
def test_a_run_with_credentials_in_the_uri_writes_them_nowhere(secret_run):
    ws, port, env, proc, seen = secret_run
    # positive controls: the run reached the server of that URI with its credentials (every
    # request it made carried alice's password), and a planted secret would be found
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert seen and set(seen) == {basic}, seen
    assert proc.returncode == 0, proc.stderr[-3000:]
    track = json.loads((ws / "artifacts/tinycls/track.json").read_text())
    assert track["status"] == "pending"
    assert track["uri"] == f"http://127.0.0.1:{port}/?token=***"
    # the server's own answer (503 "down"), the server named by the redacted uri above
    assert "error code 503" in track["error"] and "'down'" in track["error"], track["error"]
    pending = list(Path(ws / Layout().pending_dir()).glob("*.json"))
    assert len(pending) == 2
    assert leaks({"planted": f"x {PASSWORD} y".encode()}) == [f"planted: {PASSWORD}"]
    # assert: no file under the workspace (artifacts, logs, sidecars, pending records,
    # .snakemake) and neither output stream holds a secret
    files = written(ws)
    assert any(name.startswith(".snakemake/log/") for name in files)
    assert any(name.endswith("logs/track.log") for name in files)
    found = leaks(files | {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()})
    assert not found, found


@pytest.mark.e2e
def test_sync_with_credentials_or_a_token_never_prints_them(secret_run):
    ws, port, env, _, _ = secret_run
    for uri in (env["MLFLOW_TRACKING_URI"], f"http://127.0.0.1:{port}/x?access_token={TOKEN}"):
        # execute: the server is still down (answers 503)
        proc = cli("sync", cwd=ws, uri=uri)
        # assert: one line naming the redacted URI, records kept, no secret anywhere
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("engineforge: [stage=track")
        assert f"127.0.0.1:{port}" in lines[0] and "***" in lines[0]
        assert not leaks({"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()})
    assert len(list(Path(ws / Layout().pending_dir()).glob("*.json"))) == 2
    # execute: the server is back; what reaches MLflow holds no secret either
    db = f"sqlite:///{ws}/mlflow.db"
    proc = cli("sync", cwd=ws, uri=db)
    assert proc.returncode == 0, proc.stderr
    runs = mlflow_runs(db, "engineforge-tests")
    assert len(runs) == 2 + 3  # two models; children: tinycls 1, tinyfcn 2
    logged = json.dumps([[r.data.params, r.data.tags] for r in runs]).encode()
    assert not leaks({"mlflow": logged})
