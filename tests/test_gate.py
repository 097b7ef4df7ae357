"""The baseline gate: this run's drift matrix against an earlier one.

The first tests run the gate stage through the real runner on drift matrices written here
(JSON baselines, missing rows, NaN). The end-to-end tests build tinycls (fp32, onnxruntime)
with the real workflow once, then gate against a real release bundle and manifest, MLflow runs
found by alias and by tag in the workspace's sqlite tracking store, and run strict mode through
Snakemake. Nothing is mocked.
"""

from __future__ import annotations

import copy
import json
import math
import tarfile
from pathlib import Path

import pytest
from conftest import tiny_raw_config, write_tiny_workspace
from engineforge.job import Job
from engineforge.runner import StageFailed, run_job
from engineforge.settings import GateSettings
from engineforge.sidecar import read_json, write_json
from engineforge.stages import gate
from workflow_helpers import mlflow_client, snakemake, write_config

ROWS = [
    {"precision": "fp32", "backend": "onnxruntime", "status": "pass", "max_abs": 2e-6,
     "p99_abs": 1e-6, "cosine": 0.999999, "snr_db": 120.0, "top1_agreement": 1.0,
     "accuracy": 0.9},
    {"precision": "int8", "backend": "onnxruntime", "status": "pass", "max_abs": 0.05,
     "p99_abs": 0.02, "cosine": 0.9981, "snr_db": 31.0, "top1_agreement": 0.97,
     "accuracy": 0.88},
]


def changed(rows, **edits):
    """A copy of ``rows`` with ``edits`` = {"<precision>": {metric: value}}."""
    out = copy.deepcopy(rows)
    for r in out:
        r.update(edits.get(r["precision"], {}))
    return out


def gate_run(tmp: Path, current: list[dict], baseline, model="m", strict=False, artifacts=None,
             **margin):
    """Run the gate stage through the real runner: ``baseline`` is a source string or rows
    (written to a drift.json); ``artifacts``: where release:<version> looks. Returns
    gate.json."""
    drift = tmp / "artifacts" / model / "audit" / "drift.json"
    write_json(drift, {"model": model, "rows": current})
    if not isinstance(baseline, str):
        write_json(tmp / "before.json", {"model": model, "rows": baseline})
        baseline = str(tmp / "before.json")
    settings = gate.Settings(gate=GateSettings(baseline=baseline, strict=strict,
                                               margin=margin), experiment="engineforge-tests")
    out = drift.with_name("gate.json")
    run_job(Job(stage="gate", model=model, wildcards={"model": model},
                inputs={"drift": drift}, outputs={"json": out}, settings=settings, tools={},
                device=None, log=tmp / "gate.log",
                artifacts=str(artifacts or tmp / "artifacts")))
    return read_json(out)


def strict_check(tmp: Path, model="m") -> str:
    """The strict job on the gate.json of ``model``: its one-line failure, or '' (gate.ok)."""
    g = tmp / "artifacts" / model / "audit" / "gate.json"
    ok = g.with_name("gate.ok")
    ok.unlink(missing_ok=True)  # as Snakemake removes a job's outputs before it runs
    try:
        run_job(Job(stage="gate", model=model, wildcards={"model": model}, inputs={"gate": g},
                    outputs={"ok": ok}, settings=None, tools={}, device=None,
                    log=tmp / "strict.log", artifacts=str(tmp / "artifacts")))
    except StageFailed as err:
        assert not ok.exists()
        return str(err)
    assert ok.is_file()
    return ""


def regressed(g: dict) -> list[tuple]:
    return [(r["precision"], r["metric"]) for r in g["rows"] if r["regressed"]]


# -- against a JSON drift matrix ---------------------------------------------------------------
def test_json_baseline_passes_within_margins_and_fails_beyond(tmp_path):
    within = changed(ROWS, int8={"cosine": 0.9985, "snr_db": 32.5, "max_abs": 0.04})
    g = gate_run(tmp_path, ROWS, within)
    assert g["status"] == "pass" and g["regressions"] == 0
    assert g["compared"] == 2 * 6  # both rows x the 6 metrics with a margin and a value
    assert strict_check(tmp_path) == ""
    row = next(r for r in g["rows"] if r["precision"] == "int8" and r["metric"] == "cosine")
    assert row["before"] == 0.9985 and row["after"] == 0.9981
    assert math.isclose(row["delta"], -0.0004) and row["margin"] == 0.001

    # positive control: the same run against a better baseline
    better = changed(ROWS, int8={"cosine": 0.9999, "accuracy": 0.9, "max_abs": 0.02})
    g = gate_run(tmp_path, ROWS, better)
    assert g["status"] == "regressed"
    assert sorted(regressed(g)) == [("int8", "accuracy"), ("int8", "cosine"),
                                    ("int8", "max_abs")]
    line = strict_check(tmp_path)
    assert "\n" not in line
    assert line.startswith("[model=m stage=gate key=models.m.gate.margin.cosine] int8/onnxruntime "
                           "cosine 0.9999 -> 0.9981 (margin 0.001) regressed vs ")
    assert "(2 more in " in line and "Fix:" in line

    # a wider margin accepts the same change
    g = gate_run(tmp_path, ROWS, better, cosine=0.01, accuracy=0.05, max_abs=2.0)
    assert g["status"] == "pass"


def test_error_growth_is_relative_with_a_floor_for_exact_rows(tmp_path):
    g = gate_run(tmp_path, changed(ROWS, fp32={"max_abs": 5e-7}),
                 changed(ROWS, fp32={"max_abs": 1e-7}))  # growth under the 1e-6 floor
    assert ("fp32", "max_abs") not in regressed(g)
    g = gate_run(tmp_path, changed(ROWS, fp32={"max_abs": 4e-6}),
                 changed(ROWS, fp32={"max_abs": 1e-7}))
    assert ("fp32", "max_abs") in regressed(g)


def test_rows_and_metrics_missing_on_one_side_are_reported(tmp_path):
    current = ROWS + [{"precision": "fp16", "backend": "onnxruntime", "cosine": 0.9999}]
    baseline = changed(ROWS[:1], fp32={"top5_agreement": 1.0})
    baseline[0].pop("accuracy")
    g = gate_run(tmp_path, current, baseline)
    assert g["status"] == "pass"
    missing = {(m["precision"], m.get("metric"), m["missing_in"]) for m in g["missing"]}
    assert missing == {("int8", None, "baseline"), ("fp16", None, "baseline"),
                       ("fp32", "accuracy", "baseline"), ("fp32", "top5_agreement",
                                                          "current")}
    assert {r["precision"] for r in g["rows"]} == {"fp32"}


def test_rows_are_matched_per_output_where_the_matrix_has_them(tmp_path):
    per_output = {"logits": {"cosine": 0.9981}, "embedding": {"cosine": 0.97}}
    current = changed(ROWS, int8={"outputs": per_output})
    baseline = changed(ROWS, int8={"outputs": {**per_output, "embedding": {"cosine": 0.99}}})
    g = gate_run(tmp_path, current, baseline)
    assert [(r["output"], r["metric"]) for r in g["rows"] if r["regressed"]] == [
        ("embedding", "cosine")]
    assert "int8/onnxruntime output embedding cosine 0.99 -> 0.97" in strict_check(tmp_path)


def test_nothing_in_common_is_not_a_pass(tmp_path):
    g = gate_run(tmp_path, ROWS[:1], ROWS[1:])
    assert g["status"] == "nothing_compared" and g["compared"] == 0
    assert "no row of " in strict_check(tmp_path)


@pytest.mark.parametrize("before,after", [(0.999, math.nan), (math.nan, 0.999),
                                          (math.nan, math.nan), (0.999, math.inf)])
def test_non_finite_numbers_never_pass(tmp_path, before, after):
    g = gate_run(tmp_path, changed(ROWS, int8={"cosine": after}),
                 changed(ROWS, int8={"cosine": before}))
    row = next(r for r in g["rows"] if r["precision"] == "int8" and r["metric"] == "cosine")
    assert row["regressed"] and row["note"] == "not finite"
    assert g["status"] == "regressed"
    assert "int8/onnxruntime cosine" in strict_check(tmp_path)


@pytest.mark.parametrize("write,needle", [
    (None, "baseline file '{p}' does not exist"),
    (lambda p: p.write_text("{not json"), "cannot be read"),
    (lambda p: write_json(p, {"something": 1}), "neither a drift matrix"),
    (lambda p: write_json(p, {"model": "other", "rows": ROWS}), "of model 'other'"),
    (lambda p: write_json(p, {"format": 1, "engines": []}), "holds no drift rows"),
])
def test_an_unreadable_baseline_is_one_line_naming_the_key(tmp_path, write, needle):
    path = tmp_path / "base.json"
    if write:
        write(path)
    with pytest.raises(StageFailed) as err:
        gate_run(tmp_path, ROWS, str(path))
    line = str(err.value)
    assert line.startswith("[model=m stage=gate key=models.m.gate.baseline]") and "\n" not in line
    assert needle.format(p=path) in line


@pytest.mark.parametrize("cfg,key", [({"margin": {"cosine": 0.1}}, "gate"),
                                     ({"baseline": "b.json", "margin": {"cosin": 0.1}},
                                      "gate.margin"),
                                     ({"baseline": "b.json", "margin": {"snr_db": -1}},
                                      "gate.margin.snr_db")])
def test_bad_gate_settings_are_config_errors_naming_the_key(tiny_workspace, cfg, key):
    from engineforge import config
    from engineforge.errors import ConfigError

    raw = tiny_raw_config()
    raw["models"]["tinycls"]["gate"] = cfg
    with pytest.raises(ConfigError) as err:
        config.resolve(raw, tiny_workspace)
    assert f"invalid config at 'models.tinycls.{key}'" in str(err.value)
    raw["models"]["tinycls"]["gate"] = {"baseline": "b.json", "margin": {"snr_db": None}}
    m = config.resolve(raw, tiny_workspace)["models"]
    assert gate.settings(m["tinycls"], {}).gate.margin.snr_db is None  # positive control
    assert m["tinyfcn"]["gate"] is None


# -- against a real workflow run, release and MLflow --------------------------------------------
def raw_config(gate_cfg=None) -> dict:
    raw = tiny_raw_config(precisions=("fp32",), backends=("onnxruntime",))
    del raw["models"]["tinyfcn"]
    if gate_cfg:
        raw["models"]["tinycls"]["gate"] = gate_cfg
    return raw


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """tinycls fp32/onnxruntime built and tracked once, and released as 1.0 (registered)."""
    ws = tmp_path_factory.mktemp("gate-ws")
    write_tiny_workspace(ws)
    write_config(ws, raw_config())
    snakemake(ws)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws}/mlflow.db")
        from engineforge import release

        release.release("1.0", config_path=ws / "config.yaml", say=lambda _: None)
    return ws


@pytest.fixture
def in_ws(ws, monkeypatch):
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws}/mlflow.db")
    return ws


def current_rows(ws: Path) -> list[dict]:
    return read_json(ws / "artifacts/tinycls/audit/drift.json")["rows"]


def better(rows: list[dict]) -> list[dict]:
    """The run's own rows with an accuracy 0.05 higher and an SNR 10 dB higher."""
    return [{**r, "accuracy": r["accuracy"] + 0.05, "snr_db": r["snr_db"] + 10} for r in rows]


def gate_ws(ws: Path, source: str, **kw) -> dict:
    """The gate on the workspace's real drift matrix (written under a scratch tree)."""
    scratch = ws / "scratch"
    return gate_run(scratch, current_rows(ws), source, model="tinycls",
                    artifacts=ws / "artifacts", **kw)


@pytest.mark.e2e
def test_release_manifest_carries_the_drift_matrix_and_gates(in_ws):
    ws = in_ws
    bundle = ws / "artifacts/releases/engineforge-1.0.tar.gz"
    with tarfile.open(bundle) as tar:
        manifest = json.loads(tar.extractfile("engineforge-1.0/manifest.json").read())
    assert manifest["drift"]["tinycls"] == current_rows(ws)

    for source in ("release:1.0", str(bundle)):
        g = gate_ws(ws, source)
        assert g["status"] == "pass" and g["compared"] > 0, source
        assert g["baseline"]["label"] == "release 1.0 manifest"

    # the manifest as a JSON file, its drift made better than this run: regressed
    manifest["drift"]["tinycls"] = better(manifest["drift"]["tinycls"])
    write_json(ws / "manifest.json", manifest)
    g = gate_ws(ws, str(ws / "manifest.json"))
    assert regressed(g) == [("fp32", "snr_db"), ("fp32", "accuracy")]
    # a manifest without the drift section (older releases): the engines' rows
    del manifest["drift"]
    write_json(ws / "old-manifest.json", manifest)
    assert gate_ws(ws, str(ws / "old-manifest.json"))["status"] == "pass"


@pytest.mark.e2e
def test_mlflow_runs_by_alias_and_by_tag(in_ws):
    ws = in_ws
    name = "engineforge.tinycls.fp32.b1-8.onnxruntime"
    for source in (f"models:/{name}@release-1_0", f"models:/{name}/1",
                   "models:/engineforge.{model}.fp32.b1-8.onnxruntime@release-1_0",
                   "tag:engineforge.release=1.0"):
        g = gate_ws(ws, source)
        assert g["status"] == "pass" and g["compared"] > 0, source
        assert g["regressions"] == 0

    # a run of this model, tagged, whose drift matrix is better than this run's
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name("engineforge-tests")
    run = client.create_run(exp.experiment_id, tags={"engineforge.model": "tinycls",
                                                     "engineforge.kind": "model",
                                                     "champion": "yes"})
    client.log_text(run.info.run_id, json.dumps({"model": "tinycls",
                                                 "rows": better(current_rows(ws))}),
                    "audit/drift.json")
    client.set_terminated(run.info.run_id)
    g = gate_ws(ws, "tag:champion=yes")
    assert regressed(g) == [("fp32", "snr_db"), ("fp32", "accuracy")]
    assert run.info.run_id in g["baseline"]["label"]
    assert g["regressions"] == 2
    g = gate_ws(ws, f"runs:/{run.info.run_id}")
    assert regressed(g) == [("fp32", "snr_db"), ("fp32", "accuracy")]

    # unreadable MLflow baselines: one line naming the key each
    empty = client.create_run(exp.experiment_id, tags={"engineforge.model": "tinycls",
                                                       "bare": "yes"})
    for source, needle in [(f"models:/{name}@nosuchalias", "cannot be read from MLflow"),
                           ("tag:engineforge.release=9.9", "carries the tag"),
                           ("tag:bare=yes", "has no audit/drift.json"),
                           (f"runs:/{'0' * 32}", "cannot be read from MLflow")]:
        with pytest.raises(StageFailed) as err:
            gate_ws(ws, source)
        line = str(err.value)
        assert line.startswith("[model=tinycls stage=gate key=models.tinycls.gate.baseline]"), line
        assert needle in line and "\n" not in line, line
    client.delete_run(empty.info.run_id)


@pytest.mark.e2e
def test_strict_gate_fails_the_workflow_with_one_line(in_ws):
    """Through Snakemake: strict fails the run on a regression (the gate is still recorded,
    summarised and tracked); non-strict records it and the run succeeds."""
    ws = in_ws
    write_json(ws / "better.json", {"model": "tinycls", "rows": better(current_rows(ws))})
    write_config(ws, raw_config({"baseline": "better.json", "strict": True,
                                 "margin": {"snr_db": None}}))
    proc = snakemake(ws, check=False)
    assert proc.returncode != 0
    acc = [r for r in current_rows(ws) if r["precision"] == "fp32"][0]["accuracy"]
    want = (f"[model=tinycls stage=gate key=models.tinycls.gate.margin.accuracy] "
            f"fp32/onnxruntime accuracy {acc + 0.05:.6g} -> {acc:.6g} (margin 0.005) "
            "regressed vs better.json. Fix:")
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if want in ln]
    assert lines, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    g = read_json(ws / "artifacts/tinycls/audit/gate.json")
    assert g["status"] == "regressed" and not (ws / "artifacts/tinycls/audit/gate.ok").exists()
    assert "## Baseline gate" in (ws / "artifacts/summary.md").read_text()
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name("engineforge-tests")
    parents = client.search_runs([exp.experiment_id], "tags.`engineforge.kind` = 'model' and "
                                 "tags.`engineforge.gate` = 'regressed'")
    assert len(parents) == 1
    assert parents[0].data.metrics["gate_regressions"] == 1
    assert "audit/gate.json" in {a.path for a in client.list_artifacts(parents[0].info.run_id,
                                                                       "audit")}

    # not strict: the same regression is recorded, and the run succeeds
    write_config(ws, raw_config({"baseline": "better.json", "margin": {"snr_db": None}}))
    snakemake(ws)
    summary = (ws / "artifacts/summary.md").read_text()
    assert "- tinycls: **regressed** vs better.json" in summary
    assert "fp32/onnxruntime accuracy" in summary
    # against the release: passes
    write_config(ws, raw_config({"baseline": "release:1.0", "strict": True}))
    snakemake(ws)
    assert (ws / "artifacts/tinycls/audit/gate.ok").is_file()
    assert "- tinycls: **pass** vs release 1.0 manifest" in (
        ws / "artifacts/summary.md").read_text()


@pytest.mark.e2e
def test_the_gate_reruns_when_its_mlflow_tag_moves_to_another_run(in_ws):
    """Through Snakemake: a gate on tag:<k>=<v> (or an alias) reruns when the tag (alias)
    now names another run, though no file changed; and not when nothing moved."""
    ws = in_ws
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name("engineforge-tests")

    def champion(rows: list[dict]) -> str:
        """A run of tinycls tagged champion=moving with ``rows`` as its drift matrix; the
        tag is taken off every earlier holder."""
        for old in client.search_runs([exp.experiment_id], "tags.`champion` = 'moving'"):
            client.delete_tag(old.info.run_id, "champion")
        run = client.create_run(exp.experiment_id, tags={"engineforge.model": "tinycls",
                                                         "engineforge.kind": "model",
                                                         "champion": "moving"})
        client.log_text(run.info.run_id, json.dumps({"model": "tinycls", "rows": rows}),
                        "audit/drift.json")
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    gate_json = ws / "artifacts/tinycls/audit/gate.json"
    first = champion(better(current_rows(ws)))
    write_config(ws, raw_config({"baseline": "tag:champion=moving",
                                 "margin": {"snr_db": None}}))
    snakemake(ws)
    g = read_json(gate_json)
    assert g["status"] == "regressed" and first in g["baseline"]["label"]
    # nothing moved: the gate is not run again
    stamp = gate_json.stat().st_mtime_ns
    snakemake(ws)
    assert gate_json.stat().st_mtime_ns == stamp
    # the tag moves to a run with this run's own rows: the gate reruns and passes
    second = champion(current_rows(ws))
    snakemake(ws)
    g = read_json(gate_json)
    assert second in g["baseline"]["label"] and g["status"] == "pass", g["baseline"]
