"""The build cache installs only entries a trusted key signed (engineforge/cache.py), against
a real MLflow store (a sqlite file): every refusal is a miss with one warning line naming the
run, the group and the reason, and leaves nothing behind."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from engineforge import cache, mlflow_store, signing
from engineforge.sidecar import make_sidecar, read_json, sha256_file, write_json
from mlflow.tracking import MlflowClient
from workflow_helpers import artifact_file, assert_nothing_installed

GROUP = "build"


@pytest.fixture
def store(local_mlflow, monkeypatch):
    """A local MLflow store, cache on, trust as configured by no config."""
    uri = local_mlflow
    monkeypatch.delenv("ENGINEFORGE_CACHE", raising=False)
    monkeypatch.delenv(signing.ENV_KEY, raising=False)
    cache._unreachable.clear()
    signing.configure(None)
    yield uri
    signing.configure(None)


def built(tmp_path: Path, name="builder", payload=b"engine bytes") -> tuple[Path, Path, str]:
    """(engine, build.json, fingerprint) as a build job leaves them."""
    d = tmp_path / name / "build"
    d.mkdir(parents=True)
    engine = d / "engine.onnx"
    engine.write_bytes(payload)
    side = make_sidecar(stage="build", model="m", inputs={}, input_hashes={},
                        config_slice={"opt": 3}, tools={"onnxruntime": "1"},
                        outputs={"engine": engine}, device="cpu")
    side["ran"] = {"host": "node7", "slurm_job_id": "4242"}
    sidecar = d / "build.json"
    write_json(sidecar, side)
    return engine, sidecar, side["fingerprint"]


def upload(engine: Path, sidecar: Path, fp: str, rid="r1") -> str:
    """Track the build as the track stage does; returns the engine's run id."""
    child = {"name": "m/fp32/p/onnxruntime", "tags": {f"{mlflow_store.CACHE_TAG}.{GROUP}": fp},
             "params": {}, "metrics": {}, "artifacts": [[str(sidecar), "build"],
                                                         [str(engine), "build"]]}
    record = {"experiment": "t", "model": "m", "id": rid, "children": [child],
              "parent": {"name": "m", "tags": {}, "params": {}, "metrics": {}, "artifacts": []}}
    return mlflow_store.upload(record)["children"][child["name"]]


def sign_with(tmp_path: Path, monkeypatch, name: str) -> signing.SigningKey:
    """Make ``name``'s key this process's signing key for the next uploads."""
    path = tmp_path / f"{name}.key"
    signing.generate(path)
    monkeypatch.setenv(signing.ENV_KEY_FILE, str(path))
    return signing.signing_key()


def restore(tmp_path: Path, fp: str) -> tuple[bool, Path, Path]:
    dest = tmp_path / "consumer" / "m" / "build"
    dest.mkdir(parents=True, exist_ok=True)
    engine, sidecar = dest / "engine.onnx", dest / "build.json"
    return cache.restore(GROUP, fp, {"engine": engine}, sidecar), engine, sidecar


def one_warning(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records
             if r.name == "engineforge.cache" and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("signer", ["own key", "configured key"])
def test_a_signed_entry_by_a_trusted_key_is_restored(tmp_path, monkeypatch, store, signer):
    # setup
    engine, sidecar, fp = built(tmp_path)
    if signer == "configured key":  # a colleague's key, trusted by the config
        colleague = sign_with(tmp_path, monkeypatch, "colleague")
        run_id = upload(engine, sidecar, fp)
        me = sign_with(tmp_path, monkeypatch, "me")
        signing.configure(signing.parse_trust({"trusted_keys": [colleague.public_key]}))
        assert me.key_id != colleague.key_id
    else:
        run_id = upload(engine, sidecar, fp)
    key_id = MlflowClient(store).get_run(run_id).data.tags[f"{mlflow_store.SIGNED_TAG}.build"]
    # execute
    hit, got_engine, got_sidecar = restore(tmp_path, fp)
    # assert
    assert hit and got_engine.read_bytes() == engine.read_bytes()
    side = read_json(got_sidecar)
    assert side["fingerprint"] == fp and side["outputs"]["engine"]["path"] == str(got_engine)
    assert side["cache"] == {"hit": True, "run_id": run_id, "group": GROUP, "signed_by": key_id}
    assert side["ran"] == {"host": "node7", "slurm_job_id": "4242"}  # where it was built


def test_the_signature_artifact_holds_files_and_provenance(tmp_path, store):
    # setup
    engine, sidecar, fp = built(tmp_path)
    # execute
    run_id = upload(engine, sidecar, fp)
    # assert
    doc = json.loads(artifact_file(store, run_id, "build/entry.sig.json").read_text())
    assert signing.open_entry(doc, signing.trusted()) == {
        "group": "build", "fingerprint": fp, "provenance": {"host": "node7",
                                                            "slurm_job_id": "4242"},
        "files": {"build.json": sha256_file(sidecar), "engine.onnx": sha256_file(engine)}}
    assert doc["key_id"] == signing.signing_key().key_id
    assert "PRIVATE" not in json.dumps(doc)


def test_an_unsigned_entry_is_a_miss(tmp_path, store, caplog):
    # setup: a run as an engineforge without signatures logged it
    engine, sidecar, fp = built(tmp_path)
    client = MlflowClient(store)
    exp = client.create_experiment("t")
    run = client.create_run(exp, tags={f"{mlflow_store.CACHE_TAG}.build": fp})
    client.log_artifact(run.info.run_id, str(sidecar), "build")
    client.log_artifact(run.info.run_id, str(engine), "build")
    client.set_terminated(run.info.run_id)
    # execute
    with caplog.at_level(logging.INFO):
        hit, got_engine, got_sidecar = restore(tmp_path, fp)
    # assert
    assert not hit
    assert one_warning(caplog) == (f"cache entry for build in MLflow run {run.info.run_id} not "
                                   "used, rebuilding: unsigned")
    assert_nothing_installed(got_engine, got_sidecar)


def test_an_unsigned_holder_is_not_referenced_so_the_rebuild_fills_the_cache(tmp_path, store):
    """After a miss on an unsigned entry the rebuilt files are uploaded and signed, not
    deduplicated against the unsigned run (which would miss forever)."""
    # setup
    engine, sidecar, fp = built(tmp_path)
    client = MlflowClient(store)
    old = client.create_run(client.create_experiment("old"),
                            tags={f"{mlflow_store.CACHE_TAG}.build": fp})
    client.log_artifact(old.info.run_id, str(engine), "build")
    client.set_terminated(old.info.run_id)
    # execute
    new = upload(engine, sidecar, fp)
    hit, got_engine, _ = restore(tmp_path, fp)
    # assert
    assert f"{mlflow_store.REF_TAG}.build" not in client.get_run(new).data.tags
    assert hit and read_json(got_engine.with_name("build.json"))["cache"]["run_id"] == new


def test_an_entry_signed_by_an_untrusted_key_is_a_miss(tmp_path, monkeypatch, store, caplog):
    # setup: a stranger uploads a matching build (sidecar and all), signed with their key
    engine, sidecar, fp = built(tmp_path)
    stranger = sign_with(tmp_path, monkeypatch, "stranger")
    run_id = upload(engine, sidecar, fp)
    sign_with(tmp_path, monkeypatch, "me")  # this builder: trusts itself only
    # execute
    with caplog.at_level(logging.INFO):
        hit, got_engine, got_sidecar = restore(tmp_path, fp)
    # assert
    assert not hit
    assert one_warning(caplog) == (f"cache entry for build in MLflow run {run_id} not used, "
                                   f"rebuilding: signed by untrusted key {stranger.key_id}")
    assert_nothing_installed(got_engine, got_sidecar)


@pytest.mark.parametrize("replaced", ["engine", "engine and sidecar"])
def test_a_file_replaced_in_the_store_after_upload_is_a_miss(tmp_path, store, caplog, replaced):
    # setup: a signed entry, then its engine swapped in the artifact store (with a sidecar
    # that matches the new engine: a consistent forgery)
    engine, sidecar, fp = built(tmp_path)
    run_id = upload(engine, sidecar, fp)
    stored = artifact_file(store, run_id, "build/engine.onnx")
    stored.write_bytes(b"evil engine")
    if replaced == "engine and sidecar":
        side_path = artifact_file(store, run_id, "build/build.json")
        side = read_json(side_path)
        side["outputs"]["engine"]["sha256"] = sha256_file(stored)
        side_path.write_text(json.dumps(side))
    # execute
    with caplog.at_level(logging.INFO):
        hit, got_engine, got_sidecar = restore(tmp_path, fp)
    # assert
    assert not hit
    name = "build.json" if replaced == "engine and sidecar" else "engine.onnx"
    assert one_warning(caplog) == (f"cache entry for build in MLflow run {run_id} not used, "
                                   f"rebuilding: {name} sha256 differs from the signed entry")
    assert_nothing_installed(got_engine, got_sidecar)


def test_a_fingerprint_other_than_the_signed_one_is_a_miss(tmp_path, store, caplog):
    # setup: a signed entry, re-tagged with another fingerprint
    engine, sidecar, fp = built(tmp_path)
    run_id = upload(engine, sidecar, fp)
    other = "0" * 64
    MlflowClient(store).set_tag(run_id, f"{mlflow_store.CACHE_TAG}.build", other)
    # execute
    with caplog.at_level(logging.INFO):
        hit, got_engine, got_sidecar = restore(tmp_path, other)
    # assert
    assert not hit
    assert one_warning(caplog) == (f"cache entry for build in MLflow run {run_id} not used, "
                                   f"rebuilding: signed for build {fp[:12]}, not build "
                                   f"{other[:12]}")
    assert_nothing_installed(got_engine, got_sidecar)


def test_cache_off_queries_no_store(tmp_path, store, monkeypatch):
    # setup: a tracking URI whose store does not exist yet (any query creates it)
    db = tmp_path / "never.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("ENGINEFORGE_CACHE", "0")
    # execute
    hit, got_engine, got_sidecar = restore(tmp_path, "f" * 64)
    # assert
    assert not hit and not db.exists()
    assert_nothing_installed(got_engine, got_sidecar)
    # positive control: with the cache on, the same lookup reaches the store
    monkeypatch.setenv("ENGINEFORGE_CACHE", "1")
    assert restore(tmp_path, "f" * 64)[0] is False and db.exists()
