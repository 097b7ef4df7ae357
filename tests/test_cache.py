"""The MLflow build cache (engineforge/cache.py) against a real local MLflow store (a sqlite
file under the test's directory), with entries uploaded the way the track stage uploads them
(``mlflow_store.upload``: tags, files, signature).

A restore installs an entry only when every check passes: a trusted signature for this group
and fingerprint over exactly the files present (``_check_entry``), then the sidecar's own
fingerprint and output hashes (``restore``). Any refusal is a miss with one warning line and
nothing installed. ``ENGINEFORGE_CACHE=0`` turns lookups off.

The signature-level refusals for an untrusted signer and an unsigned entry are covered in
test_cache_trust.py; this file covers every other reason a restore refuses."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest
from engineforge import cache, mlflow_store, signing
from engineforge.sidecar import make_sidecar, read_json, sha256_file, write_json
from mlflow.tracking import MlflowClient
from workflow_helpers import artifact_file, assert_nothing_installed

GROUP = "build"


@pytest.fixture
def store(local_mlflow, monkeypatch):
    """A fresh local store for this test, cache on, this session's key, no configured
    trust, no memory of unreachable servers."""
    uri = local_mlflow
    monkeypatch.delenv("ENGINEFORGE_CACHE", raising=False)
    monkeypatch.delenv(signing.ENV_KEY, raising=False)
    monkeypatch.setattr(cache, "_unreachable", {})
    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),  # mlflow_store's defaults,
                       ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),  # which it sets for good
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
        monkeypatch.setenv(var, os.environ.get(var, value))
    signing.configure(None)
    yield uri
    signing.configure(None)


def built(tmp_path: Path, payload: bytes = b"engine bytes", name: str = "builder"
          ) -> tuple[Path, Path, str]:
    """(engine, build.json, fingerprint) as a build job leaves them."""
    d = tmp_path / name / "m" / "build"
    d.mkdir(parents=True)
    engine = d / "engine.onnx"
    engine.write_bytes(payload)
    side = make_sidecar(stage="build", model="m", inputs={}, input_hashes={},
                        config_slice={"payload": payload.decode()}, tools={"onnxruntime": "1"},
                        outputs={"engine": engine}, device="cpu")
    sidecar = d / "build.json"
    write_json(sidecar, side)
    return engine, sidecar, side["fingerprint"]


def upload(files: list[Path], tags: dict[str, str], folder: str = GROUP, rid: str = "r1") -> str:
    """Track ``files`` under ``folder`` in one child run, as the track stage does (signed
    with this process's key); returns the child's run id."""
    child = {"name": "m/fp32/p/onnxruntime", "tags": tags, "params": {}, "metrics": {},
             "artifacts": [[str(f), folder] for f in files]}
    record = {"experiment": "t", "model": "m", "id": rid, "children": [child],
              "parent": {"name": "m", "tags": {}, "params": {}, "metrics": {}, "artifacts": []}}
    return mlflow_store.upload(record)["children"][child["name"]]


def cache_tag(fp: str, group: str = GROUP) -> dict[str, str]:
    return {f"{mlflow_store.CACHE_TAG}.{group}": fp}


def restore(tmp_path: Path, fp: str) -> tuple[bool, Path, Path]:
    """Restore the build group into a consumer's tree: (hit, engine, build.json)."""
    dest = tmp_path / "consumer" / "m" / "build"
    dest.mkdir(parents=True, exist_ok=True)
    engine, sidecar = dest / "engine.onnx", dest / "build.json"
    return cache.restore(GROUP, fp, {"engine": engine}, sidecar), engine, sidecar


def cache_lines(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "engineforge.cache" and r.levelno == level]


# -- enabled ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("yes", True), ("0", False),
                                      ("false", False), ("no", False)])
def test_enabled_follows_engineforge_cache(monkeypatch, value, on):
    # setup
    if value is None:
        monkeypatch.delenv("ENGINEFORGE_CACHE", raising=False)
    else:
        monkeypatch.setenv("ENGINEFORGE_CACHE", value)
    # execute / assert
    assert cache.enabled() is on


# -- a clean hit --------------------------------------------------------------------------------
def test_a_dotted_group_with_two_outputs_is_restored_where_this_run_wants_it(
        tmp_path, store, caplog):
    """``precision.fp16`` lives under ``precision/fp16/``; each role lands at this run's
    path, the sidecar names those paths and their own mtimes, and says where it came from."""
    # setup: a precision job's outputs, uploaded
    src = tmp_path / "builder" / "m" / "precision" / "fp16"
    src.mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"fp16 graph")
    (src / "scales.json").write_text('{"x": 0.5}')
    side = make_sidecar(stage="precision", model="m", inputs={}, input_hashes={},
                        config_slice={"p": "fp16"}, tools={},
                        outputs={"onnx": src / "model.onnx", "scales": src / "scales.json"})
    write_json(src / "precision.json", side)
    fp, group = side["fingerprint"], "precision.fp16"
    run_id = upload([src / "precision.json", src / "model.onnx", src / "scales.json"],
                    cache_tag(fp, group), folder="precision/fp16")
    dest = tmp_path / "consumer" / "m" / "precision" / "fp16"
    dest.mkdir(parents=True)  # Snakemake makes a job's output directories
    outputs = {"onnx": dest / "model.onnx", "scales": dest / "scales.json"}
    # execute
    with caplog.at_level(logging.INFO, logger="engineforge.cache"):
        hit = cache.restore(group, fp, outputs, dest / "precision.json")
    # assert
    assert hit is True
    assert outputs["onnx"].read_bytes() == b"fp16 graph"
    assert outputs["scales"].read_text() == '{"x": 0.5}'
    got = read_json(dest / "precision.json")
    for role, path in outputs.items():
        assert got["outputs"][role] == {**side["outputs"][role], "path": str(path),
                                        "mtime_ns": os.stat(path).st_mtime_ns}
    signer = signing.signing_key().key_id
    assert got["cache"] == {"hit": True, "run_id": run_id, "group": group, "signed_by": signer}
    assert got["fingerprint"] == fp
    assert sorted(p.name for p in dest.iterdir()) == ["model.onnx", "precision.json",
                                                     "scales.json"]
    assert cache_lines(caplog) == []
    assert cache_lines(caplog, logging.INFO) == [
        f"cache hit: precision.fp16 restored from MLflow run {run_id} (fingerprint {fp[:12]})"]


# -- refusals: one warning line, nothing installed ----------------------------------------------
@pytest.mark.parametrize("where", ["sidecar", "tag"])
def test_an_entry_for_another_fingerprint_is_refused(tmp_path, store, caplog, where):
    """sidecar: a correctly signed entry whose sidecar names another fingerprint than its tag
    (restore's own check); tag: a signed entry re-tagged with another fingerprint (the
    signature names the original one)."""
    # setup
    engine, sidecar, fp = built(tmp_path)
    other = "0" * 64
    if where == "sidecar":
        run_id = upload([sidecar, engine], cache_tag(other))
        why = "the sidecar's fingerprint differs from the tag"
    else:
        run_id = upload([sidecar, engine], cache_tag(fp))
        MlflowClient(store).set_tag(run_id, f"{mlflow_store.CACHE_TAG}.{GROUP}", other)
        why = f"signed for build {fp[:12]}, not build {other[:12]}"
    # execute
    with caplog.at_level(logging.INFO, logger="engineforge.cache"):
        hit, got_engine, got_sidecar = restore(tmp_path, other)
    # assert
    assert hit is False
    assert cache_lines(caplog) == [
        f"cache entry for build in MLflow run {run_id} not used, rebuilding: {why}"]
    assert_nothing_installed(got_engine, got_sidecar)


def test_a_signed_output_that_differs_from_its_sidecar_hash_is_refused(tmp_path, store, caplog):
    """The builder signed what it uploaded, but the engine is not the one its sidecar
    recorded (changed between the job and the upload): restore's sha256 check refuses it."""
    # setup
    engine, sidecar, fp = built(tmp_path)
    engine.write_bytes(b"engine bytes, changed after the job")
    run_id = upload([sidecar, engine], cache_tag(fp))
    # execute
    with caplog.at_level(logging.INFO, logger="engineforge.cache"):
        hit, got_engine, got_sidecar = restore(tmp_path, fp)
    # assert
    assert hit is False
    assert cache_lines(caplog) == [f"cache entry for build in MLflow run {run_id} not used, "
                                   "rebuilding: engine.onnx sha256 differs from its sidecar"]
    assert_nothing_installed(got_engine, got_sidecar)


def _replace_engine(art) -> None:
    art("engine.onnx").write_bytes(b"evil engine")


def _edit_sidecar_fingerprint(art) -> None:
    side = read_json(art("build.json"))
    side["fingerprint"] = "1" * 64
    art("build.json").write_text(json.dumps(side))


def _edit_signed_payload(art) -> None:
    doc = read_json(art("entry.sig.json"))
    doc["payload"]["files"]["engine.onnx"] = sha256_file(art("build.json"))
    art("entry.sig.json").write_text(json.dumps(doc))


def _add_file(art) -> None:
    art("extra.bin").write_bytes(b"x")


def _break_signature(art) -> None:
    art("entry.sig.json").write_text("{truncated")


TAMPERING = {
    "engine replaced": (_replace_engine, "engine.onnx sha256 differs from the signed entry"),
    "sidecar fingerprint edited": (_edit_sidecar_fingerprint,
                                   "build.json sha256 differs from the signed entry"),
    "signed payload edited": (_edit_signed_payload, "bad signature"),
    "engine deleted": (lambda art: art("engine.onnx").unlink(),
                       "engine.onnx is missing from the entry"),
    "file added": (_add_file, "extra.bin is not in the signed entry"),
    "signature not JSON": (_break_signature, "entry.sig.json is not valid JSON"),
    "signature deleted": (lambda art: art("entry.sig.json").unlink(), "unsigned"),
}


@pytest.mark.parametrize("tamper", list(TAMPERING))
def test_an_entry_tampered_with_in_the_store_is_refused(tmp_path, store, caplog, tamper):
    # setup: a clean signed entry, then changed in the artifact store
    engine, sidecar, fp = built(tmp_path)
    run_id = upload([sidecar, engine], cache_tag(fp))
    change, why = TAMPERING[tamper]
    change(lambda name: artifact_file(store, run_id, f"{GROUP}/{name}"))
    # execute
    with caplog.at_level(logging.INFO, logger="engineforge.cache"):
        hit, got_engine, got_sidecar = restore(tmp_path, fp)
    # assert
    assert hit is False
    assert cache_lines(caplog) == [
        f"cache entry for build in MLflow run {run_id} not used, rebuilding: {why}"]
    assert_nothing_installed(got_engine, got_sidecar)


# -- ENGINEFORGE_CACHE=0 ------------------------------------------------------------------------
@pytest.mark.parametrize("off", ["0", "false", "no"])
def test_cache_off_neither_looks_up_nor_restores_a_matching_entry(
        tmp_path, store, monkeypatch, caplog, off):
    """With the cache off the tracking store is never asked (the MLflow client factory is
    wrapped to count calls), though a matching entry exists: the same restore hits once the
    cache is on again."""
    # setup
    engine, sidecar, fp = built(tmp_path)
    upload([sidecar, engine], cache_tag(fp))
    calls = []
    real_client = mlflow_store.client
    monkeypatch.setattr(mlflow_store, "client", lambda: calls.append(1) or real_client())
    monkeypatch.setenv("ENGINEFORGE_CACHE", off)
    # execute
    with caplog.at_level(logging.DEBUG, logger="engineforge.cache"):
        found = cache.lookup(GROUP, fp)
        hit, got_engine, got_sidecar = restore(tmp_path, fp)
    # assert
    assert (found, hit, calls) == (None, False, [])
    assert_nothing_installed(got_engine, got_sidecar)
    assert [r for r in caplog.records if r.name == "engineforge.cache"] == []
    # positive control: the cache on, the same entry is found and restored
    monkeypatch.setenv("ENGINEFORGE_CACHE", "1")
    assert restore(tmp_path, fp)[0] is True and len(calls) >= 1
    assert got_engine.read_bytes() == engine.read_bytes()


# -- lookup -------------------------------------------------------------------------------------
def test_lookup_prefers_a_trusted_signer_over_a_newer_stranger(tmp_path, store, monkeypatch):
    """Two finished runs hold the same entry: the one signed by a trusted key is chosen even
    when a stranger's is newer; with only the stranger's, that one is returned (its restore
    then says why it is refused)."""
    # setup
    engine, sidecar, fp = built(tmp_path)
    trusted_run = upload([sidecar, engine], cache_tag(fp), rid="mine")  # the session's key
    session_key = os.environ[signing.ENV_KEY_FILE]
    stranger_key = tmp_path / "stranger.key"
    signing.generate(stranger_key)
    monkeypatch.setenv(signing.ENV_KEY_FILE, str(stranger_key))
    strange = upload([sidecar, engine], cache_tag(fp), rid="theirs")
    monkeypatch.setenv(signing.ENV_KEY_FILE, session_key)
    client = MlflowClient(store)
    # execute
    preferred = cache.lookup(GROUP, fp)
    client.delete_run(trusted_run)  # deleted runs are not found
    fallback = cache.lookup(GROUP, fp)
    # assert
    assert client.get_run(strange).info.start_time > client.get_run(trusted_run).info.start_time
    assert (preferred, fallback) == (trusted_run, strange)


def test_lookup_ignores_a_run_that_did_not_finish(tmp_path, store):
    """A half-uploaded run (FAILED) is never a cache source."""
    # setup
    engine, sidecar, fp = built(tmp_path)
    run_id = upload([sidecar, engine], cache_tag(fp))
    MlflowClient(store).set_terminated(run_id, "FAILED")
    # execute
    found = cache.lookup(GROUP, fp)
    # assert
    assert found is None


def test_an_unreachable_server_is_a_miss_asked_once(tmp_path, store, monkeypatch, caplog):
    """A tracking server that refuses connections (a port held by a socket that does not
    listen) fails the first lookup with one warning line and is not asked again in this
    process; the restore is a miss that installs nothing."""
    # setup
    down = socket.socket()
    down.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = down.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    calls = []
    real_client = mlflow_store.client
    monkeypatch.setattr(mlflow_store, "client", lambda: calls.append(1) or real_client())
    # execute
    try:
        with caplog.at_level(logging.INFO, logger="engineforge.cache"):
            hit, got_engine, got_sidecar = restore(tmp_path, "f" * 64)
            again = cache.lookup(GROUP, "e" * 64)
    finally:
        down.close()
    # assert
    assert (hit, again, len(calls)) == (False, None, 1)
    lines = cache_lines(caplog)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("cache lookup for build failed; no more lookups in this run: "
                               f"API request to http://127.0.0.1:{port}/")
    assert_nothing_installed(got_engine, got_sidecar)
