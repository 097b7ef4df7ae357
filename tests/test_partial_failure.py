"""A failed job is a result: one model's broken evaluation data fails its jobs, and the run
still reports everything else (drift matrices, summary, printed table, MLflow), lists each
failure (model, stage, variant, reason, log), and exits non-zero. What it wrote for the
failed model is not trusted later: after the fix, the next run remakes it. A successful run
prints no ERROR/WARNING line about conditions expected here (no GPU, no NVML)."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_raw_config, write_tiny_workspace
from engineforge import failures
from engineforge.job import Job
from engineforge.layout import Layout
from engineforge.sidecar import read_json
from engineforge.stages import track
from workflow_helpers import ROOT, Page, mlflow_client, planned_outputs, snakemake, write_config

L = Layout()
STAGE_RULE = {"drift": "drift_matrix", "baseline": "bench_pytorch"}


def noisy_lines(text: str) -> list[str]:
    """Lines a user would read as something having gone wrong."""
    return [ln for ln in text.splitlines()
            if re.search(r"\b(ERROR|WARNING|CRITICAL|Traceback)\b|\w+Warning:", ln)]


def nvml_loadable() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def rule_of(f: dict) -> str:
    if f["stage"] == "build":
        return f"build_{f['backend'].replace('-', '_')}"
    return STAGE_RULE.get(f["stage"], f["stage"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run 1 with tinycls's labels cut short (a real broken input), then checks, the fix,
    and run 2."""
    ws = tmp_path_factory.mktemp("partial")
    write_tiny_workspace(ws)
    raw = tiny_raw_config(precisions=("fp32", "int8"))
    write_config(ws, raw)
    good = (ws / "eval.npz").read_bytes()
    data = dict(np.load(ws / "eval.npz"))
    np.savez(ws / "eval.npz", x=data["x"], labels=data["labels"][:3])
    first = snakemake(ws, check=False)
    a = ws / "artifacts"
    after_first = ws.parent / f"{ws.name}-after-first"
    shutil.copytree(a, after_first)  # copy2: modification times kept
    # The failed model leaves the config: the summary written after run 1 is not trusted.
    write_config(ws, {**raw, "models": {"tinyfcn": raw["models"]["tinyfcn"]}})
    without_failed_model = planned_outputs(ws)
    # The fix, plus a failure record of an earlier run that this run does not make again.
    write_config(ws, raw)
    (ws / "eval.npz").write_bytes(good)
    (a / "_failures/build-ghost-fp32-b1-8-onnxruntime.json").write_text(json.dumps(
        {"job": "build-ghost-fp32-b1-8-onnxruntime", "model": "ghost", "stage": "build",
         "precision": "fp32", "backend": "onnxruntime", "profile": "b1-8",
         "reason": "an old failure", "log": "old.log"}))
    planned_after_fix = planned_outputs(ws)
    second = snakemake(ws, check=False)
    planned_after_second = planned_outputs(ws)
    return SimpleNamespace(ws=ws, raw=raw, first=first, second=second, a1=after_first,
                           without_failed_model=without_failed_model,
                           planned_after_fix=planned_after_fix,
                           planned_after_second=planned_after_second)


def first_failures(runs) -> list[dict]:
    return [read_json(p) for p in sorted((runs.a1 / "_failures").glob("*.json"))]


def mlflow_parents(runs, model: str):
    client = mlflow_client(runs.ws)
    exp = client.get_experiment_by_name(runs.raw["experiment"])
    found = client.search_runs([exp.experiment_id], f"tags.`engineforge.model` = '{model}' "
                               "and tags.`engineforge.kind` = 'model'",
                               order_by=["attributes.start_time ASC"])
    return client, found


@pytest.mark.e2e
def test_failed_jobs_are_recorded_and_the_run_exits_non_zero(runs):
    assert runs.first.returncode != 0
    recs = first_failures(runs)
    assert recs and {f["model"] for f in recs} == {"tinycls"}
    for f in recs:
        assert set(f) >= {"job", "model", "stage", "precision", "backend", "profile", "reason",
                          "log"}
        assert f["reason"] and "\n" not in f["reason"]
        assert (runs.ws / f["log"]).is_file()
    # printed: the table with its "Failed jobs" section, each failure with its log path
    assert "# engineforge summary" in runs.first.stdout and "## Failed jobs" in runs.first.stdout
    assert f"{len(recs)} job(s) failed" in runs.first.stderr
    assert all(f["log"] in runs.first.stderr for f in recs)
    assert "Traceback" not in runs.first.stderr


@pytest.mark.e2e
def test_summary_holds_the_healthy_model_and_lists_each_failure(runs):
    md = (runs.a1 / "summary.md").read_text()
    for p in ("fp32", "int8"):
        assert re.search(rf"^\| tinyfcn \| {p} \| onnxruntime \| pass \|", md, re.M), md
        assert re.search(rf"^\| tinycls \| {p} \| onnxruntime \| (failed|not run) \|", md, re.M)
    section = md.split("## Failed jobs", 1)[1]
    for f in first_failures(runs):
        row = next(ln for ln in section.splitlines() if f["log"] in ln)
        assert row.startswith(f"| tinycls | {f['stage']} | {failures.variant(f)} |")
    summary = json.loads((runs.a1 / "summary.json").read_text())
    assert summary["complete"] is False
    assert [f["job"] for f in summary["failures"]] == [f["job"] for f in first_failures(runs)]


@pytest.mark.e2e
def test_drift_matrices_of_both_models_exist(runs):
    healthy = json.loads((runs.a1 / "tinyfcn/audit/drift.json").read_text())
    assert "complete" not in healthy  # made by its own job
    assert {(r["precision"], r["status"]) for r in healthy["rows"]} == {("fp32", "pass"),
                                                                         ("int8", "pass")}
    failed = json.loads((runs.a1 / "tinycls/audit/drift.json").read_text())
    assert failed["complete"] is False
    assert {r["precision"] for r in failed["rows"]} == {"fp32", "int8"}
    for r in failed["rows"]:
        assert r["status"] in ("failed", "not run") and r["error"] and r["failed_job"]
    assert "## Failed jobs" in (runs.a1 / "tinycls/audit/drift.md").read_text()


@pytest.mark.e2e
def test_report_of_the_real_partly_failed_run_lists_each_failed_job(runs):
    """report.html as run 1 left it (not fixture JSON): a Failed jobs table with one row per
    failure record (model, stage, variant, reason), the healthy model's heatmap, and the
    page marked untrusted for the next run."""
    recs = first_failures(runs)
    page = Page((runs.a1 / "report.html").read_text())
    text = page.words()
    assert "Failed jobs" in text
    table = text.split("Failed jobs", 1)[1]
    for f in recs:
        row = " ".join(f"{f['model']} {f['stage']} {failures.variant(f)} {f['reason']}".split())
        assert row in table, (row, table[:2000])
    assert "tinyfcn drift heatmap" in {i.get("alt") for i in page.imgs()}
    assert (runs.a1 / "report.html").stat().st_mtime == failures.UNTRUSTED_MTIME
    # control: after the fix the page lists no failed job
    fixed = Page((runs.ws / "artifacts/report.html").read_text()).words()
    assert "Failed jobs" not in fixed and "tinycls drift heatmap" in fixed + " ".join(
        i.get("alt", "") for i in Page((runs.ws / "artifacts/report.html").read_text()).imgs())


@pytest.mark.e2e
def test_mlflow_records_the_healthy_model_and_the_failures(runs, tmp_path):
    client, [healthy] = mlflow_parents(runs, "tinyfcn")
    assert healthy.info.status == "FINISHED"
    _, failed = mlflow_parents(runs, "tinycls")
    first = failed[0]  # run 1's record (run 2 logs another)
    recs = first_failures(runs)
    assert first.info.status == "FAILED"
    assert first.data.tags["engineforge.failed_jobs"] == str(len(recs))
    for f in recs:
        assert first.data.tags[f"engineforge.failure.{f['job']}"] == f["reason"]
    listed = json.loads(Path(client.download_artifacts(first.info.run_id, "failures.json",
                                                       str(tmp_path))).read_text())
    assert [f["job"] for f in listed] == [f["job"] for f in recs]
    track = json.loads((runs.a1 / "tinycls/track.json").read_text())
    assert track["status"] == "logged" and track["parent"] == first.info.run_id
    assert track["complete"] is False and track["failed_jobs"] == [f["job"] for f in recs]


@pytest.mark.e2e
def test_what_the_failed_run_wrote_is_not_trusted_later(runs):
    # files written after the failures are older than any input: Snakemake remakes them
    for rel in ("summary.md", "summary.json", "tinycls/track.json", "tinycls/audit/drift.json"):
        assert (runs.a1 / rel).stat().st_mtime == failures.UNTRUSTED_MTIME
    assert (runs.a1 / "tinyfcn/track.json").stat().st_mtime > 0
    # the failed model removed from the config: the summary is made again, without it
    assert ("summary", L.summary("md")) in runs.without_failed_model
    # the cause fixed: each failed job runs again, and everything downstream of it
    planned = runs.planned_after_fix
    rules = {r for r, _ in planned}
    assert {rule_of(f) for f in first_failures(runs)} <= rules
    for out in (("drift_matrix", L.drift("json", "tinycls")), ("track", L.track("tinycls")),
                ("summary", L.summary("md"))):
        assert out in planned
    # control: once healthy, nothing is planned
    assert runs.planned_after_second == []


@pytest.mark.e2e
def test_the_next_run_after_the_fix_is_complete_and_lists_no_old_failure(runs):
    assert runs.second.returncode == 0, runs.second.stderr[-3000:]
    a = runs.ws / "artifacts"
    assert list((a / "_failures").glob("*")) == []  # the ghost of an earlier run too
    md = (a / "summary.md").read_text()
    assert "Failed jobs" not in md and "failed" not in md
    assert re.search(r"^\| tinycls \| fp32 \| onnxruntime \| pass \|", md, re.M)
    assert json.loads((a / "summary.json").read_text())["complete"] is True
    drift = json.loads((a / "tinycls/audit/drift.json").read_text())
    assert "complete" not in drift and {r["status"] for r in drift["rows"]} == {"pass"}
    track = json.loads((a / "tinycls/track.json").read_text())
    assert "complete" not in track
    _, parents = mlflow_parents(runs, "tinycls")
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED"]
    assert parents[1].info.run_id == track["parent"]


@pytest.mark.e2e
def test_a_successful_run_prints_no_error_or_warning(runs):
    # positive control: the check catches what a library prints on a machine without NVML
    nvml = "[modelopt][onnx] - ERROR - Failed to get GPU count: NVML Shared Library Not Found"
    assert noisy_lines(f"ok\n{nvml}\nUserWarning: x\n") == [nvml, "UserWarning: x"]
    assert runs.second.returncode == 0
    assert noisy_lines(runs.second.stdout + runs.second.stderr) == []
    if not nvml_loadable():  # the condition did occur in this run: its line is in the log
        log = runs.ws / "artifacts/tinycls/logs/precision-int8.log"
        assert "Failed to get GPU count" in log.read_text()
    assert (runs.ws / "artifacts/logs/worker.log").is_file()


@pytest.mark.parametrize("to_log", [True, False])
def test_the_fork_servers_own_output_goes_to_its_log(tmp_path, to_log):
    """A library the fork server preloads prints an ERROR line at import (as ModelOpt does
    without NVML): with a log (the workflow gives one), not on the terminal. Control: with
    none, the line does reach the terminal, so the check can fail."""
    line = "[lib][onnx] - ERROR - Failed to get GPU count: test"
    (tmp_path / "noisy_preload.py").write_text(f"import sys\nprint({line!r}, file=sys.stderr)\n")
    log = tmp_path / "logs/worker.log"
    code = (f"from engineforge import worker\n"
            f"worker.PRELOAD = ['engineforge.worker', 'noisy_preload']\n"
            f"worker.start(log_path={str(log) if to_log else None!r})\n"
            f"print(worker.run_isolated('os:getpid', log_path={str(tmp_path / 'job.log')!r}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "workflow"), str(tmp_path)])}
    # execute
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    # assert
    assert proc.returncode == 0 and proc.stdout.strip().isdigit(), proc.stderr
    if to_log:
        assert noisy_lines(proc.stdout + proc.stderr) == []
        assert line in log.read_text()
    else:
        assert noisy_lines(proc.stderr) == [line] and not log.exists()


# -- units: records and partial MLflow records -----------------------------------------------
def _job(tmp_path, **w) -> Job:
    return Job(stage="build", model="m", wildcards={"model": "m", **w}, inputs={}, outputs={},
               settings=None, tools={}, device=None, log=tmp_path / "b.log",
               artifacts=str(tmp_path / "artifacts"))


def test_a_record_is_written_on_failure_and_removed_on_success(tmp_path):
    job = _job(tmp_path, precision="fp16", profile="p", backend="onnxruntime")
    failures.record(job, "[model=m stage=build] it broke.\n  second line")
    [rec] = failures.load(tmp_path / "artifacts")
    assert rec == {"job": "build-m-fp16-p-onnxruntime", "model": "m", "stage": "build",
                   "precision": "fp16", "backend": "onnxruntime", "profile": "p",
                   "reason": "[model=m stage=build] it broke. second line",
                   "log": str(tmp_path / "b.log")}
    assert failures.variant(rec) == "fp16/onnxruntime/p"
    failures.clear(job)
    assert failures.load(tmp_path / "artifacts") == []


def test_a_failed_build_is_a_failed_child_of_the_partial_record(tmp_path):
    """build_record from a model whose export exists and whose only build failed."""
    lay = Layout(str(tmp_path / "a"))
    outs = lay.model_outputs("m", ["fp32"], {"onnxruntime": ["p"]}, ["p"])
    export = Path(outs["export"])
    export.parent.mkdir(parents=True)
    export.write_text(json.dumps({"fingerprint": "f" * 8, "tools": {"torch": "2"},
                                  "result": {"time_s": 1.0}, "outputs": {}}))
    fail = {"job": "build-m-fp32-p-onnxruntime", "model": "m", "stage": "build",
            "precision": "fp32", "backend": "onnxruntime", "profile": "p",
            "reason": "[model=m stage=build] no.", "log": "b.log"}
    m = {"checkpoint": {}, "opset": 17, "precisions": ["fp32"], "backends": ["onnxruntime"],
         "task": "classification", "profiles": {"p": {}}}
    # execute
    complete = track.build_record("m", m, "e", outs, None)
    partial = track.build_record("m", m, "e", outs, [fail])
    # assert
    assert "status" not in complete["parent"] and complete["children"] == []
    assert partial["parent"]["status"] == "FAILED" and partial["id"] != complete["id"]
    assert partial["parent"]["tags"]["engineforge.failure.build-m-fp32-p-onnxruntime"] == (
        "[model=m stage=build] no.")
    assert json.loads(partial["parent"]["texts"]["failures.json"]) == [fail]
    [child] = partial["children"]
    assert child["name"] == "m/fp32/p/onnxruntime" and child["status"] == "FAILED"
