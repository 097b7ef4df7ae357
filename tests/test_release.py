"""Release bundles and the MLflow Model Registry, on a tree built by the real workflow.

The tiny zoo (tinycls: 1 profile, tinyfcn: 2 profiles) × fp32/int8 × onnxruntime/tensorrt-rtx
is built once per session (about a minute on 2 cores): 12 engines, tracked in the
workspace's sqlite MLflow.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT
from engineforge import release, signing
from engineforge.backends import backend_class
from engineforge.errors import ReleaseError
from engineforge.layout import Layout
from engineforge.results import AuditResult, BenchResult
from engineforge.sidecar import read_json, sha256_file, write_json
from workflow_helpers import engineforge, job_stats, members, rewrite, snakemake

pytestmark = pytest.mark.e2e

@pytest.fixture
def ws(zoo) -> Path:
    """The standard zoo (tests/conftest.py: fp32 + int8 on onnxruntime and TensorRT-RTX),
    read-only; a test that registers models (writes mlflow.db) takes ``zoo_copy``."""
    return zoo


def cut(ws: Path, out: Path, version: str, patterns=None, **kw) -> tuple[dict, list[str]]:
    said: list[str] = []
    kw.setdefault("register_models", False)
    res = release.release(version, config_path=ws / "config.yaml", out=out, patterns=patterns,
                          say=said.append, **kw)
    return res, said


def test_select_by_pattern(ws, tmp_path):
    # setup
    patterns = ["tinycls/*/*/onnxruntime", "tinyfcn/fp32/small"]  # short form = .../*
    # execute
    res, _ = cut(ws, tmp_path, "0.1.0", patterns)
    # assert
    names = {e["name"] for e in res["manifest"]["engines"]}
    assert names == {"tinycls/fp32/b1-8/onnxruntime", "tinycls/int8/b1-8/onnxruntime",
                     "tinyfcn/fp32/small/onnxruntime", "tinyfcn/fp32/small/tensorrt-rtx"}
    assert res["bundle"] == tmp_path / "engineforge-0.1.0.tar.gz"


def test_manifest_contents(ws, tmp_path):
    # setup
    a = ws / "artifacts"
    layout = Layout(str(a))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    # execute
    res, _ = cut(ws, tmp_path, "1.0.0")
    # assert
    man = res["manifest"]
    files = members(res["bundle"])
    assert json.loads(files["engineforge-1.0.0/manifest.json"]) == json.loads(json.dumps(man))
    assert man["version"] == "1.0.0" and man["created"].endswith("Z")
    assert man["git"]["commit"] == commit and isinstance(man["git"]["dirty"], bool)
    assert set(man["config"]["models"]) == {"tinycls", "tinyfcn"}
    assert man["config"]["models"]["tinycls"]["precisions"] == ["fp32", "int8"]
    assert len(man["engines"]) == 12  # (1 + 2 profiles) × 2 precisions × 2 backends
    for e in man["engines"]:
        engine = a / e["path"]
        assert e["sha256"] == sha256_file(engine) == man["files"][e["path"]]["sha256"]
        assert e["bytes"] == engine.stat().st_size == len(files[f"engineforge-1.0.0/{e['path']}"])
        for stage in ("export", "simplify", "precision", "build"):
            assert e["fingerprints"][stage] == read_json(a / e["sidecars"][stage])["fingerprint"]
        build = read_json(a / e["sidecars"]["build"])
        assert e["tools"] == build["tools"] and e["device"] == build["device"]
        # the precision sidecar is that of the graph the engine was built from (onnxruntime
        # int8: ORT's own quantizer's, precision/int8/onnxruntime/)
        graph = read_json(a / e["sidecars"]["precision"])["outputs"]["onnx"]
        assert build["inputs"]["onnx"]["sha256"] == graph["sha256"]
        assert a / e["path"] == Path(layout.engine(e["backend"], e["model"], e["precision"],
                                                   e["profile"]))
        assert a / e["sidecars"]["build"] == Path(layout.build(
            e["backend"], e["model"], e["precision"], e["profile"]))
        track = read_json(layout.track(e["model"]))
        assert e["mlflow"]["run_id"] == track["children"][e["name"]]
        assert e["rebuild"][0] == f"git checkout {commit}" and e["rebuild"][1] == "make env"
        # no --workflow-profile: snakemake picks up profiles/default next to the Snakefile
        assert e["rebuild"][2].startswith(".venv/bin/snakemake --cores all")
        assert "--workflow-profile" not in e["rebuild"][2]
        assert e["rebuild"][2].endswith(f" artifacts/{e['path']}")
        assert e["audit"]["verdict"] in ("pass", "not_runnable")
    ort = next(e for e in man["engines"] if e["name"] == "tinycls/fp32/b1-8/onnxruntime")
    assert ort["audit"]["drift"]["max_abs"] < 1e-3 and ort["audit"]["drift"]["accuracy"] > 0.5
    bench = BenchResult.model_validate(read_json(a / ort["sidecars"]["bench"])["result"])
    assert ort["bench"]["p50_ms_opt"] == bench.points["opt"].p50_ms > 0


def test_rebuild_target_is_a_workflow_target(zoo_copy):
    # setup
    ws = zoo_copy
    res, _ = cut(ws, ws / "rel-target", "1.0.1", ["tinyfcn/int8/large/tensorrt-rtx"])
    target = res["manifest"]["engines"][0]["rebuild"][2].rsplit(" ", 1)[1]
    # execute: as built, then as after a TensorRT-RTX upgrade
    proc = snakemake(ws, "--dry-run", target)
    upgrade = snakemake(ws, "--dry-run", target, env={"ENGINEFORGE_TOOL_VERSIONS": json.dumps(
        {"tensorrt_rtx_cu13_bindings": "99"})})
    # assert: up to date; and when it is not, snakemake rebuilds exactly that engine
    assert target == Layout("artifacts").engine("tensorrt-rtx", "tinyfcn", "int8", "large")
    assert target == "artifacts/tinyfcn/build/tensorrt-rtx/int8/large/engine.plan"
    out = proc.stdout + proc.stderr
    assert "Nothing to be done (all requested files are present and up to date)." in out
    assert "MissingRuleException" not in out and "This was a dry-run" not in out
    out = upgrade.stdout + upgrade.stderr
    assert job_stats(out) == {"build_tensorrt_rtx": 1}
    assert f"output: {target}, " in out and "This was a dry-run" in out


def test_archive_members_are_deterministic(ws, tmp_path):
    # setup: what the output directory holds while the archive is being written
    seen_while_writing = []
    add = release._add

    def spy(tar, name, data, mtime):
        seen_while_writing.append(sorted(p.name for p in tmp_path.glob(".*.tmp")))
        add(tar, name, data, mtime)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(release, "_add", spy)
        first, _ = cut(ws, tmp_path, "2.0.0a")
    # execute
    second, _ = cut(ws, tmp_path, "2.0.0b")
    # assert
    with tarfile.open(first["bundle"]) as t1, tarfile.open(second["bundle"]) as t2:
        m1, m2 = t1.getmembers(), t2.getmembers()
    names1 = [m.name.split("/", 1)[1] for m in m1]
    assert names1 == [m.name.split("/", 1)[1] for m in m2]
    assert names1[:2] == ["manifest.json", "manifest.sig.json"]
    assert names1[2:] == sorted(names1[2:])
    assert {(m.uid, m.gid, m.uname, m.mode) for m in m1} == {(0, 0, "", 0o644)}
    assert len({m.mtime for m in m1}) == 1
    # the archive is written under a temporary name (the glob sees it), then renamed away
    assert seen_while_writing[0] and seen_while_writing[0][0].startswith(
        ".engineforge-2.0.0a.tar.gz.")
    assert not list(tmp_path.glob(".*.tmp"))


def test_verify_ok_on_a_fresh_bundle(ws, tmp_path):
    # setup
    res, _ = cut(ws, tmp_path, "3.0.0")
    # execute
    n, problems = release.verify(res["bundle"], extract_to=tmp_path / "x")
    # assert
    assert (n, problems) == (12, [])
    engine = res["manifest"]["engines"][0]["path"]
    assert sha256_file(tmp_path / "x" / "engineforge-3.0.0" / engine) == sha256_file(
        ws / "artifacts" / engine)


def test_verify_fails_after_one_engine_byte_changes(ws, tmp_path):
    # setup
    res, _ = cut(ws, tmp_path, "3.1.0")
    target = res["manifest"]["engines"][2]["path"]
    assert release.verify(res["bundle"], extract_to=tmp_path / "ok") == (12, [])
    assert (tmp_path / "ok" / "engineforge-3.1.0" / target).is_file()  # a good one extracts

    def flip(name, data):
        if name.endswith(target):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return name, data

    rewrite(res["bundle"], flip)
    # execute
    n, problems = release.verify(res["bundle"], extract_to=tmp_path / "x")
    # assert
    assert len(problems) == 1 and problems[0].startswith(f"sha256 mismatch {target}")
    assert not (tmp_path / "x").exists()  # nothing extracted from a bundle that fails


def test_verify_rejects_path_traversal_and_unlisted_engines(ws, tmp_path):
    # setup
    res, _ = cut(ws, tmp_path, "3.2.0", ["tinycls/fp32/*/onnxruntime"])
    plan = backend_class("tensorrt-rtx").artifact  # an engine file name, not this release's
    extra = [("../evil.sh", b"rm -rf ~"), (f"engineforge-3.2.0/x/{plan}", b"plan")]
    rewrite(res["bundle"], extra=extra)
    # execute
    _, problems = release.verify(res["bundle"], extract_to=tmp_path / "x")
    # assert
    assert any("unsafe member '../evil.sh'" in p for p in problems)
    assert f"not in the manifest: x/{plan}" in problems
    assert not (tmp_path / "evil.sh").exists() and not (tmp_path / "x").exists()
    # positive control: extracted without checks into <dir>/x, the member lands where the
    # assertion above looks (<dir>/evil.sh)
    naive = tmp_path / "naive"
    with tarfile.open(res["bundle"]) as tar:
        tar.extractall(naive / "x", filter="fully_trusted")
    assert (naive / "evil.sh").read_bytes() == b"rm -rf ~"


def test_verify_reports_a_truncated_bundle(ws, tmp_path):
    # setup
    res, _ = cut(ws, tmp_path, "3.3.0", ["tinyfcn/fp32/large"])
    data = res["bundle"].read_bytes()
    res["bundle"].write_bytes(data[: len(data) // 2])
    # execute
    n, problems = release.verify(res["bundle"])
    # assert
    assert n == 0 and len(problems) == 1 and problems[0].startswith("corrupt archive")


def test_refuses_an_existing_version_unless_forced(ws, tmp_path):
    # setup
    cut(ws, tmp_path, "4.0.0", ["tinycls"])
    # execute
    with pytest.raises(ReleaseError) as err:
        cut(ws, tmp_path, "4.0.0", ["tinycls"])
    forced, _ = cut(ws, tmp_path, "4.0.0", ["tinycls/fp32"], force=True)
    # assert
    line = str(err.value)
    assert "\n" not in line and line.startswith("[stage=release key=version]")
    assert "already exists" in line and "--force" in line
    assert len(forced["manifest"]["engines"]) == 2


def test_refuses_an_empty_selection(ws, tmp_path):
    # setup
    out = tmp_path / "out"
    # execute
    with pytest.raises(ReleaseError) as err:
        cut(ws, out, "5.0.0", ["nosuchmodel/*/*/*", "tinycls/fp64"])
    # assert
    line = str(err.value)
    assert "\n" not in line and line.startswith("[stage=release key=--select]")
    assert "no built engine" in line and "Fix:" in line
    assert not out.exists()
    # positive control: a selection that matches writes its bundle there
    cut(ws, out, "5.0.0", ["tinycls/fp32"])
    assert [p.name for p in out.iterdir()] == ["engineforge-5.0.0.tar.gz"]


def test_failed_audit_is_excluded_unless_allowed(ws, tmp_path):
    # setup: a copy of the tree where one audit failed
    arts = tmp_path / "artifacts"
    shutil.copytree(ws / "artifacts", arts, ignore=shutil.ignore_patterns("releases", "rel-*"))
    audit_path = Layout(str(arts)).audit("tinycls", "onnxruntime", "int8")
    audit = read_json(audit_path)
    failed = AuditResult.model_validate(audit["result"]).model_copy(
        update={"status": "fail", "failures": ["y: cosine 0.9 < 0.98"]})
    write_json(audit_path, {**audit, "result": failed.model_dump(mode="json")})
    # execute
    strict, said = cut(ws, tmp_path / "a", "6.0.0", ["tinycls"], artifacts=arts)
    lenient, _ = cut(ws, tmp_path / "b", "6.0.0", ["tinycls"], artifacts=arts,
                     allow_failed=True)
    # assert
    assert "tinycls/int8/b1-8/onnxruntime" not in {e["name"] for e in strict["manifest"]
                                                   ["engines"]}
    assert strict["manifest"]["excluded"][0]["engine"] == "tinycls/int8/b1-8/onnxruntime"
    assert said == ["excluded tinycls/int8/b1-8/onnxruntime: audit verdict 'fail' "
                    "(y: cosine 0.9 < 0.98); pass --allow-failed to include it"]
    failed = next(e for e in lenient["manifest"]["engines"]
                  if e["name"] == "tinycls/int8/b1-8/onnxruntime")
    assert failed["audit"]["verdict"] == "fail"


def test_a_result_of_another_version_is_excluded_with_its_reason(ws, tmp_path):
    # setup: a copy of the tree where one bench sidecar holds an older result shape
    arts = tmp_path / "artifacts"
    shutil.copytree(ws / "artifacts", arts, ignore=shutil.ignore_patterns("releases", "rel-*"))
    bench_path = Layout(str(arts)).bench("tinyfcn", "onnxruntime", "fp32", "large")
    bench = read_json(bench_path)
    bench["result"]["latency_ms"] = bench["result"].pop("points")
    write_json(bench_path, bench)
    # execute
    res, said = cut(ws, tmp_path / "a", "6.1.0", ["tinyfcn/fp32"], artifacts=arts)
    # assert
    assert {e["name"] for e in res["manifest"]["engines"]} == {
        "tinyfcn/fp32/small/onnxruntime", "tinyfcn/fp32/small/tensorrt-rtx",
        "tinyfcn/fp32/large/tensorrt-rtx"}
    assert said == ["excluded tinyfcn/fp32/large/onnxruntime: tinyfcn/bench/onnxruntime/fp32/"
                    "large.json is not a result of this version (latency_ms: Extra inputs are "
                    "not permitted); rebuild it: `engineforge run`"]


def test_registers_each_engine_with_the_release_alias(zoo_copy, tmp_path, monkeypatch):
    # setup
    ws = zoo_copy
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ws}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    # execute
    res, said = cut(ws, tmp_path, "7.0.0", ["tinycls/fp32", "tinyfcn/int8/small/tensorrt-rtx"],
                    register_models=True)
    # assert
    engines = res["manifest"]["engines"]
    assert len(engines) == 3 and res["manifest"]["alias"] == "release-7_0_0"
    for e in engines:
        name = f"engineforge.{e['model']}.{e['precision']}.{e['profile']}.{e['backend']}"
        assert e["mlflow"]["registered_model"] == name
        mv = client.get_model_version_by_alias(name, "release-7_0_0")
        assert str(mv.version) == e["mlflow"]["version"]
        assert mv.tags["engineforge.sha256"] == e["sha256"]
        assert mv.tags["engineforge.release"] == "7.0.0"
        assert mv.run_id == e["mlflow"]["run_id"]
        assert mv.source == f"runs:/{mv.run_id}/build"
        assert f"registered {name} version {mv.version} (alias release-7_0_0)" in said
    # the registered source really holds the released engine
    import mlflow.artifacts

    e = engines[0]
    got = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{e['mlflow']['registered_model']}@release-7_0_0",
        dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    assert sha256_file(Path(got) / Path(e["path"]).name) == e["sha256"]


def test_a_second_release_moves_a_new_alias_to_a_new_version(zoo_copy, tmp_path, monkeypatch):
    # setup
    ws = zoo_copy
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ws}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cut(ws, tmp_path, "8.0.0", ["tinycls/int8/*/onnxruntime"], register_models=True)
    # execute
    res, _ = cut(ws, tmp_path, "8.1.0", ["tinycls/int8/*/onnxruntime"], register_models=True,
                 alias="production")
    # assert
    name = "engineforge.tinycls.int8.b1-8.onnxruntime"
    client = MlflowClient(tracking_uri=uri)
    old = client.get_model_version_by_alias(name, "release-8_0_0")
    new = client.get_model_version_by_alias(name, "production")
    assert int(new.version) == int(old.version) + 1
    assert res["manifest"]["engines"][0]["mlflow"]["version"] == str(new.version)


def test_registration_failure_fails_the_release_and_leaves_no_archive(ws, tmp_path,
                                                                      monkeypatch):
    # setup: a tracking server that is down
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    # execute
    with pytest.raises(ReleaseError) as err:
        cut(ws, tmp_path, "9.0.0", ["tinycls/fp32"], register_models=True)
    # assert
    line = str(err.value)
    assert "\n" not in line and line.startswith("[stage=release key=MLFLOW_TRACKING_URI]")
    assert "http://127.0.0.1:9" in line and "--no-register" in line
    assert list(tmp_path.iterdir()) == []
    # positive control: the same release without registration writes its archive there
    cut(ws, tmp_path, "9.0.0", ["tinycls/fp32"])
    assert [p.name for p in tmp_path.iterdir()] == ["engineforge-9.0.0.tar.gz"]


def test_alias_rules():
    # setup / execute
    ok = release.alias_name("release-1.2.0+rc1")
    # assert
    assert ok == "release-1_2_0_rc1"
    for reserved in ("latest", "v3"):
        with pytest.raises(ReleaseError, match="--alias"):
            release.alias_name(reserved)
    assert release.registered_name("m:x", "fp32", "p/1", "tensorrt-rtx") == (
        "engineforge.m_x.fp32.p_1.tensorrt-rtx")


# -- signatures and provenance ----------------------------------------------------------------
def resign(bundle: Path, edit, key: signing.SigningKey | None = None,
           raw: bytes | None = None) -> None:
    """Edit the manifest (``edit(manifest)`` in place; or replace its bytes by ``raw``) and
    sign it again with ``key`` (default this builder's: a trusted signer of a wrong
    manifest)."""
    key = key or signing.signing_key()
    name = next(n for n in members(bundle) if n.endswith("/manifest.json"))
    if raw is None:
        manifest = json.loads(members(bundle)[name])
        edit(manifest)
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    else:
        data = raw
    sig = json.dumps({"signed": "manifest.json", "sha256": hashlib.sha256(data).hexdigest(),
                      **key.sign(data)}).encode()
    rewrite(bundle, lambda n, d: (n, data if n == name else sig if n.endswith(
        "/manifest.sig.json") else d))


def stranger_key(tmp_path: Path) -> tuple[Path, signing.SigningKey]:
    path = tmp_path / "stranger.key"
    signing.generate(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(signing.ENV_KEY_FILE, str(path))
        return path, signing.signing_key()


def test_bundle_is_signed_and_carries_provenance(ws, tmp_path):
    # setup
    key = signing.signing_key()
    a = ws / "artifacts"
    # execute
    res, _ = cut(ws, tmp_path, "10.0.0", ["tinycls/fp32", "tinyfcn/int8/large"])
    # assert: manifest.sig.json signs manifest.json's exact bytes
    files = members(res["bundle"])
    data = files["engineforge-10.0.0/manifest.json"]
    sig = json.loads(files["engineforge-10.0.0/manifest.sig.json"])
    assert signing.verify(data, sig, {key.public_key}) == key.key_id
    assert sig["signed"] == "manifest.json" and sig["sha256"] == hashlib.sha256(data).hexdigest()
    prov = res["manifest"]["provenance"]
    assert prov["builder"] == {"key_id": key.key_id, "public_key": key.public_key}
    assert set(prov["engines"]) == {e["name"] for e in res["manifest"]["engines"]} and len(
        prov["engines"]) == 4
    for e in res["manifest"]["engines"]:
        p = prov["engines"][e["name"]]
        assert p["fingerprints"] == e["fingerprints"]
        assert set(p["ran"]) == set(p["tools"]) == {"export", "simplify", "precision", "build"}
        for stage, where in p["ran"].items():
            ran = read_json(a / e["sidecars"][stage])["ran"]
            assert where == {"host": ran["host"], "slurm_job_id": ran["slurm_job_id"]}
            assert where["host"] == socket.gethostname()
        assert p["tools"]["build"] == e["tools"]
    assert "PRIVATE" not in data.decode()


def test_verify_refuses_an_unsigned_bundle(ws, tmp_path):
    # setup
    res, _ = cut(ws, tmp_path, "10.1.0", ["tinycls/fp32"])
    assert release.verify(res["bundle"]) == (2, [])  # control
    rewrite(res["bundle"], keep=lambda name: not name.endswith("/manifest.sig.json"))
    # execute
    n, problems = release.verify(res["bundle"], extract_to=tmp_path / "x")
    # assert
    assert (n, problems) == (0, ["unsigned bundle: no manifest.sig.json"])
    assert not (tmp_path / "x").exists()


def test_verify_refuses_an_untrusted_signer(ws, tmp_path):
    # setup: a bundle cut with another builder's key
    path, stranger = stranger_key(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(signing.ENV_KEY_FILE, str(path))
        res, _ = cut(ws, tmp_path, "10.2.0", ["tinycls/fp32"])
    # execute
    n, problems = release.verify(res["bundle"], extract_to=tmp_path / "x")
    # assert
    assert (n, problems) == (0, [f"manifest.json signed by untrusted key {stranger.key_id}: "
                                 "pass --trusted-key ed25519:... or add it to "
                                 "trust.trusted_keys (--configfile)"])
    assert not (tmp_path / "x").exists()
    # positive control: trusted explicitly, the same bundle verifies
    assert release.verify(res["bundle"], trusted_keys={stranger.public_key}) == (2, [])


def test_verify_refuses_a_manifest_edited_after_signing(ws, tmp_path):
    # setup: one engine's verdict changed in the manifest, hashes untouched
    res, _ = cut(ws, tmp_path, "10.3.0", ["tinycls/fp32"])

    def edit(name, data):
        if name.endswith("/manifest.json"):
            data = data.replace(b'"verdict": "pass"', b'"verdict": "PASS"', 1)
            assert b"PASS" in data
        return name, data

    rewrite(res["bundle"], edit)
    # execute
    n, problems = release.verify(res["bundle"], extract_to=tmp_path / "x")
    # assert
    assert (n, problems) == (0, ["manifest.json does not match its signature (bad signature):"
                                 " edited after signing"])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["fingerprints", "engine", "provenance", "builder"])
def test_verify_refuses_edited_or_missing_provenance(ws, tmp_path, case):
    # setup: a manifest whose provenance disagrees with its engines, signed by a trusted key
    res, _ = cut(ws, tmp_path, "10.4.0", ["tinycls/fp32/b1-8/onnxruntime"])
    name = "tinycls/fp32/b1-8/onnxruntime"

    def edit(manifest):
        prov = manifest["provenance"]
        if case == "fingerprints":
            prov["engines"][name]["fingerprints"]["build"] = "0" * 64
        elif case == "engine":
            del prov["engines"][name]
        elif case == "provenance":
            del manifest["provenance"]
        else:
            prov["builder"]["public_key"] = stranger_key(tmp_path)[1].public_key

    resign(res["bundle"], lambda manifest: None)  # control: re-signed unchanged, it verifies
    assert release.verify(res["bundle"]) == (1, [])
    resign(res["bundle"], edit)
    # execute
    n, problems = release.verify(res["bundle"], extract_to=tmp_path / "x")
    # assert
    expect = {"fingerprints": f"provenance of engine {name}: its fingerprints differ from "
                              "the engine's",
              "engine": f"provenance missing for engine {name}",
              "provenance": "provenance missing from the manifest",
              "builder": "provenance names builder ed25519:"}[case]
    assert len(problems) == 1 and problems[0].startswith(expect), problems
    assert not (tmp_path / "x").exists()


# -- `engineforge verify` on malformed bundles: exit 1, one line naming the problem -------------
def verify_line(bundle: Path, cwd: Path) -> str:
    """`engineforge verify BUNDLE`: asserts exit code 1 and exactly one stderr line, returns
    the problem it names (after ``FAILED: <bundle>: ``)."""
    proc = engineforge("verify", str(bundle), cwd=cwd)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    prefix = f"FAILED: {bundle}: "
    assert lines[0].startswith(prefix), lines
    return lines[0].removeprefix(prefix)


@pytest.fixture
def small_bundle(ws, tmp_path) -> tuple[Path, dict]:
    """A fresh bundle of tinycls's fp32 engines that verifies (positive control)."""
    res, _ = cut(ws, tmp_path / "rel", "10.0.0", ["tinycls/fp32"])
    ok = engineforge("verify", str(res["bundle"]), cwd=tmp_path)
    assert (ok.returncode, ok.stdout.strip(), ok.stderr) == (0, "OK: 2 engines verified", "")
    return res["bundle"], res["manifest"]


def test_verify_names_a_missing_member(small_bundle, tmp_path):
    bundle, manifest = small_bundle
    gone = manifest["engines"][0]["path"]
    rewrite(bundle, keep=lambda name: name != f"engineforge-10.0.0/{gone}")
    assert verify_line(bundle, tmp_path) == f"missing {gone}"


def test_verify_names_a_duplicate_member(small_bundle, tmp_path):
    # setup: the same engine twice, with the same bytes (the hash alone cannot tell)
    bundle, manifest = small_bundle
    twice = f"engineforge-10.0.0/{manifest['engines'][0]['path']}"
    rewrite(bundle, extra=[(twice, members(bundle)[twice])])
    assert [n for n in tarfile.open(bundle).getnames() if n == twice] == [twice, twice]
    # execute / assert
    assert verify_line(bundle, tmp_path) == f"duplicate member {manifest['engines'][0]['path']}"


def test_verify_names_invalid_manifest_json(small_bundle, tmp_path):
    # setup: a manifest that is not JSON, signed by a trusted key (the signature holds)
    bundle, _ = small_bundle
    resign(bundle, None, raw=b'{"files": {')
    # execute / assert
    assert verify_line(bundle, tmp_path).startswith("manifest.json is not valid JSON: ")


def test_verify_names_a_symlink_member(small_bundle, tmp_path):
    # setup: a symlink beside the engines (extracted, it would point out of the bundle)
    bundle, _ = small_bundle
    with gzip.open(bundle, "rb") as gz:
        plain = gz.read()
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        items = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with gzip.open(bundle, "wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for m, data in items:
            tar.addfile(m, io.BytesIO(data))
        link = tarfile.TarInfo("engineforge-10.0.0/tinycls/key")
        link.type, link.linkname = tarfile.SYMTYPE, "/home/user/.ssh/id_ed25519"
        tar.addfile(link)
    # execute / assert
    assert verify_line(bundle, tmp_path) == ("unsafe member 'engineforge-10.0.0/tinycls/key' "
                                             "(absolute, '..' or a link)")


@pytest.mark.parametrize("case", ["sha256", "unlisted"])
def test_verify_names_engines_that_disagree_with_the_files_list(small_bundle, tmp_path, case):
    # setup: a signed manifest whose engines list says another sha256 than its files list,
    # or names an engine the files list (and the bundle) do not hold
    bundle, manifest = small_bundle
    engine = manifest["engines"][0]

    def edit(m):
        if case == "sha256":
            m["engines"][0]["sha256"] = "0" * 64
        else:
            m["engines"].append({**m["engines"][0], "path": "tinycls/elsewhere/engine.onnx"})

    resign(bundle, edit)
    # execute / assert
    name = engine["name"]
    assert verify_line(bundle, tmp_path) == f"engine {name}: its sha256 differs from the files list"
