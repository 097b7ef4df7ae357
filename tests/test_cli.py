"""The `engineforge` command as users run it: exit codes, one-line errors, sync, run.

Runs on the standard zoo of tests/conftest.py (built once per session).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from engineforge import config, signing
from engineforge.backends import backend_class
from engineforge.layout import Layout
from engineforge.sidecar import read_json
from engineforge.stages import track
from workflow_helpers import ROOT, engineforge, job_stats, members, rewrite

pytestmark = pytest.mark.e2e


@pytest.fixture
def ws(zoo) -> Path:
    """The standard zoo (tests/conftest.py), read-only; tests that run in the workspace take
    ``zoo_copy``."""
    return zoo


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engineforge: ["), proc.stderr
    return lines[0]


def track_settings(cfg: dict, model: str) -> track.Settings:
    """The track stage's settings as `rule track` makes them: every configured backend is
    usable here and builds each profile of the model."""
    m = cfg["models"][model]
    builds = {b: list(m["profiles"]) for b in m["backends"]}
    return track.settings(m, {"model": model}, cfg["experiment"], builds)


def test_release_then_verify(ws, tmp_path):
    # setup
    out = tmp_path / "rel"
    # execute
    made = engineforge("release", "1.0.0", "--config", str(ws / "config.yaml"), "--no-register",
               "--out", str(out), cwd=tmp_path)
    checked = engineforge("verify", str(out / "engineforge-1.0.0.tar.gz"), cwd=tmp_path)
    # assert
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"wrote {out / 'engineforge-1.0.0.tar.gz'} (12 engine(s)")
    assert "tinycls/fp32/b1-8/onnxruntime  sha256=" in made.stdout
    assert (checked.returncode, checked.stdout) == (0, "OK: 12 engines verified\n")


def test_verify_exits_1_and_lists_the_mismatch(ws, tmp_path):
    # setup
    engineforge("release", "1.1.0", "--config", str(ws / "config.yaml"), "--no-register",
                "--select", "tinyfcn/*/small/tensorrt-rtx", "--out", str(tmp_path), cwd=tmp_path)
    bundle = tmp_path / "engineforge-1.1.0.tar.gz"
    intact = engineforge("verify", str(bundle), cwd=tmp_path)
    plan = backend_class("tensorrt-rtx").artifact
    rewrite(bundle, lambda n, d: (n, d[:-1] + bytes([d[-1] ^ 1]) if n.endswith(plan) else d))
    # execute
    proc = engineforge("verify", str(bundle), cwd=tmp_path)
    # assert
    assert (intact.returncode, intact.stdout) == (0, "OK: 2 engines verified\n")  # control
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines()[0] == f"FAILED: {bundle}"
    mismatches = [ln for ln in proc.stderr.splitlines() if "sha256 mismatch" in ln]
    assert len(mismatches) == 2  # fp32 and int8 plans
    plans = {Path(Layout("artifacts").engine("tensorrt-rtx", "tinyfcn", p, "small"))
             .relative_to("artifacts").as_posix() for p in ("fp32", "int8")}  # in the bundle
    assert {ln.split("sha256 mismatch ")[1].split(":")[0] for ln in mismatches} == plans


def test_verify_trusts_keys_from_the_flag_and_the_config(ws, tmp_path):
    """A bundle another builder signed: refused in one line, accepted once its key is
    trusted by --trusted-key or by a config's trust section."""
    # setup
    key = tmp_path / "ci.key"
    signing.generate(key)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(signing.ENV_KEY_FILE, str(key))
        public = signing.signing_key().public_key
    made = engineforge("release", "1.2.0", "--config", str(ws / "config.yaml"), "--no-register",
               "--select", "tinycls/fp32", "--out", str(tmp_path), cwd=tmp_path,
               env={signing.ENV_KEY_FILE: str(key)})
    assert made.returncode == 0, made.stderr
    bundle = tmp_path / "engineforge-1.2.0.tar.gz"
    conf = tmp_path / "trusting.yaml"
    conf.write_text(f"trust:\n  trusted_keys: ['{public}']\n")
    # execute
    refused = engineforge("verify", str(bundle), cwd=tmp_path)
    by_flag = engineforge("verify", str(bundle), "--trusted-key", public, cwd=tmp_path)
    by_config = engineforge("verify", str(bundle), "--configfile", str(conf), cwd=tmp_path)
    bad_flag = engineforge("verify", str(bundle), "--trusted-key", "ed25519:AAAA", cwd=tmp_path)
    # assert
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"FAILED: {bundle}: manifest.json signed by untrusted key {signing.key_id(public)}: "
        "pass --trusted-key ed25519:... or add it to trust.trusted_keys (--configfile)"]
    assert (by_flag.returncode, by_flag.stdout) == (0, "OK: 2 engines verified\n")
    assert (by_config.returncode, by_config.stdout) == (0, "OK: 2 engines verified\n")
    assert one_error_line(bad_flag).startswith("engineforge: [stage=config key=--trusted-key]")


def test_a_target_after_configfile_is_named_as_such(zoo_copy):
    """Snakemake's --configfile takes every name after it: a target there is not a config."""
    ws = zoo_copy
    # execute
    target = "artifacts/tinycls/bench/nosuch.json"  # a file the run would make
    late = engineforge("run", "--configfile", "config.yaml", target, cwd=ws)
    control = engineforge("run", "--dry-run", "artifacts/summary.md", "--configfile", "config.yaml",
                  cwd=ws)
    # assert
    assert one_error_line(late) == (
        f"engineforge: [stage=config] '{target}' follows --configfile, which takes "
        "every name after it as a config file. Fix: put targets before --configfile (or "
        "write --configfile=FILE)")
    assert control.returncode == 0, control.stderr[-2000:]


@pytest.mark.parametrize("case", ["duplicate", "empty", "no-config", "bad-bundle", "alias"])
def test_errors_are_one_line_with_exit_code_2(ws, tmp_path, case):
    # setup
    base = ["release", "2.0.0", "--config", str(ws / "config.yaml"), "--no-register",
            "--out", str(tmp_path)]
    if case == "duplicate":
        assert engineforge(*base, "--select", "tinycls/fp32", cwd=tmp_path).returncode == 0
    args = {"duplicate": base, "empty": base + ["--select", "resnet*/*/*/*"],
            "no-config": ["release", "2.0.0", "--config", str(tmp_path / "missing.yaml")],
            "bad-bundle": ["verify", str(tmp_path / "missing.tar.gz")],
            "alias": base + ["--alias", "latest"]}[case]
    # execute
    proc = engineforge(*args, cwd=tmp_path)
    # assert
    line = one_error_line(proc)
    expect = {"duplicate": "[stage=release key=version] release 2.0.0 already exists",
              "empty": "[stage=release key=--select] no built engine under",
              "no-config": "[stage=config] config file", "bad-bundle": "[stage=release key="
              "bundle] cannot read", "alias": "[stage=release key=--alias] 'latest'"}[case]
    assert line.startswith(f"engineforge: {expect}")


def test_sync_uploads_a_pending_record_and_release_finds_its_runs(zoo_copy, tmp_path,
                                                                 monkeypatch):
    ws = zoo_copy
    # setup: tracking of tinycls failed (server down): pending record + pending track.json
    arts = tmp_path / "artifacts"
    shutil.copytree(ws / "artifacts", arts, ignore=shutil.ignore_patterns("releases", "rel-*",
                                                                          "_tracking"))
    layout = Layout(str(arts))
    pending = Path(layout.pending_dir())
    monkeypatch.chdir(ws)  # record paths are relative to the workflow's directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = config.load(ws / "config.yaml")
    s = track_settings(cfg, "tinycls")
    record = track.build_record("tinycls", s.model, s.experiment,
                                track.model_outputs(Layout(cfg["artifacts"]), "tinycls", s))
    status = track.track(record, layout.track("tinycls"), arts)
    assert status["status"] == "pending"
    assert len(list(pending.glob("*.json"))) == 1
    down = engineforge("sync", "--artifacts", str(arts), cwd=ws, uri="http://127.0.0.1:9")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/up.db"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment(cfg["experiment"], artifact_location=str(tmp_path / "up-runs"))
    kept = {p.name: p.read_bytes() for p in pending.glob("*.json")}
    exp_id = client.get_experiment_by_name(cfg["experiment"]).experiment_id

    def n_runs() -> int:
        return len(client.search_runs([exp_id], max_results=1000))

    # execute: upload; sync again (nothing pending); sync a record already uploaded (a sync
    # killed between the upload and removing the record)
    up = engineforge("sync", "--artifacts", str(arts), cwd=ws, uri=uri)
    after_up = n_runs()
    again = engineforge("sync", "--artifacts", str(arts), cwd=ws, uri=uri)
    after_again = n_runs()
    for name, data in kept.items():
        (pending / name).write_bytes(data)
    replay = engineforge("sync", "--artifacts", str(arts), cwd=ws, uri=uri)
    after_replay = n_runs()
    rel = engineforge("release", "3.0.0", "--config", str(ws / "config.yaml"), "--artifacts",
                      str(arts), "--select", "tinycls", "--out", str(tmp_path / "rel"),
                      cwd=tmp_path, uri=uri)
    # assert
    line = one_error_line(down)
    assert "stage=track key=MLFLOW_TRACKING_URI" in line and "pending records kept" in line
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith(f"uploaded tinycls-{record['id']}.json: parent run ")
    assert up.stdout.rstrip().endswith("(4 child run(s))")
    assert list(pending.glob("*.json")) == []
    assert after_up == 1 + 4  # positive control: the first sync logged the parent and children
    assert again.returncode == 0 and again.stdout == f"nothing pending under {pending}\n"
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout == (f"uploaded tinycls-{record['id']}.json: parent run "
                             f"{up.stdout.split('parent run ')[1].split()[0]} (already logged)\n")
    assert after_again == after_replay == after_up  # nothing logged twice
    assert list(pending.glob("*.json")) == []
    exp = client.get_experiment_by_name(cfg["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = {r.info.run_name: r.info.run_id for r in runs
                if r.data.tags.get("engineforge.record_id.parent") == record["id"]}
    assert len(children) == 4
    assert rel.returncode == 0, rel.stderr
    with tarfile.open(tmp_path / "rel" / "engineforge-3.0.0.tar.gz") as tar:
        manifest = json.load(tar.extractfile("engineforge-3.0.0/manifest.json"))
    for e in manifest["engines"]:  # track.json says "pending": run ids found by record id
        assert e["mlflow"]["run_id"] == children[e["name"]]
        assert e["mlflow"]["registered_model"] == "engineforge." + e["name"].replace("/", ".")
    assert read_json(layout.track("tinycls"))["status"] == "pending"


def test_run_hands_over_to_snakemake_with_the_workflow_profile(zoo_copy):
    ws = zoo_copy
    # setup
    uri = f"sqlite:///{ws}/mlflow.db"
    upgrade = {"ENGINEFORGE_TOOL_VERSIONS": json.dumps({"tensorrt_rtx_cu13_bindings": "99"})}
    # execute: on the built tree, then as after a TensorRT-RTX upgrade
    proc = engineforge("run", "--dry-run", "--configfile", "config.yaml", cwd=ws, uri=uri)
    planned = engineforge("run", "--dry-run", "--configfile", "config.yaml", cwd=ws, uri=uri,
                  env=upgrade)
    # assert
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # Snakemake names the profile it uses: the checkout's profiles/default
    assert f"workflow specific profile {ROOT / 'profiles' / 'default'} " in out
    assert "Nothing to be done (all requested files are present and up to date)." in out
    assert "This was a dry-run" not in out
    # positive control: the same command sees work when there is some, exactly the
    # TensorRT-RTX engines (2 precisions x 3 profiles) and what reads them (the non-fp32
    # variant's localisation reads its audits)
    out = planned.stdout + planned.stderr
    assert planned.returncode == 0, out[-3000:]
    assert job_stats(out) == {"build_tensorrt_rtx": 6, "audit": 4, "bench": 6, "localise": 2,
                              "drift_matrix": 2, "report_model": 2, "report_html": 1,
                              "track": 2, "summary": 1, "all": 1}
    assert "This was a dry-run" in out and "Nothing to be done" not in out


def test_release_of_a_run_whose_config_sits_elsewhere(ws, tmp_path):
    """`engineforge run --configfile conf/c.yaml` resolves the config's paths and artifacts
    in the directory it runs in, not beside the config: --directory names that directory."""
    # setup: the same config, moved to a sub-directory of another place
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy(ws / "config.yaml", conf / "c.yaml")
    out = tmp_path / "rel"
    args = ("release", "4.0.0", "--config", str(conf / "c.yaml"), "--no-register", "--out",
            str(out), "--select", "tinycls/fp32/*/onnxruntime")
    # execute
    beside = engineforge(*args, cwd=tmp_path)  # the default: paths resolve beside the config
    made = engineforge(*args, "--directory", str(ws), cwd=tmp_path)
    # assert: without it, one line that names the option; with it, the run's engines
    assert "--directory" in one_error_line(beside)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"wrote {out / 'engineforge-4.0.0.tar.gz'} (1 engine(s)")
    manifest = json.loads(members(out / "engineforge-4.0.0.tar.gz")[
        "engineforge-4.0.0/manifest.json"])
    rebuild = manifest["engines"][0]["rebuild"][2]  # the snakemake command, in that directory
    assert f"--configfile {(conf / 'c.yaml').resolve()}" in rebuild
    assert f"--directory {ws.resolve()}" in rebuild
