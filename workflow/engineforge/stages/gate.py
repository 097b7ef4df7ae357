"""Report — the baseline gate: this run's drift matrix (``audit/drift.json``) against an
earlier one, metric by metric, with a margin per metric (``gate:`` in the config).

The earlier matrix comes from a file (a ``drift.json``, a release ``manifest.json`` or a
release bundle), ``release:<version>`` (the bundle under ``<artifacts>/releases``), or an
MLflow run (``runs:/<id>``, ``models:/<name>@<alias>`` / ``models:/<name>/<version>``,
``tag:<key>=<value>``): the ``audit/drift.json`` its model's parent run holds. Rows are
matched by (precision, backend, output). ``gate.json`` lists every compared metric (before,
after, delta, margin, limit, regressed) and the rows found on one side only. With
``strict: true`` a second job (``gate.ok``) fails the run with one line on a regression.
"""

from __future__ import annotations

import json
import math
import os
import re
import tarfile
import tempfile
from pathlib import Path

from engineforge.errors import GateError, first_line
from engineforge.settings import GateSettings, Section
from engineforge.sidecar import read_json, write_json

ISOLATED = False  # file reads and the MLflow client only
TOOLS = ()
LIKELY_FIX = "check gate.baseline (docs/gate.md: baseline sources)"


def key(model: str, leaf: str = "baseline") -> str:
    """The config key of a model's gate setting (as merged from defaults)."""
    return f"models.{model}.gate.{leaf}"


WORST = "worst"  # the output of a drift-matrix row that holds the worst of every output
HIGHER_IS_BETTER = ("cosine", "snr_db", "top1_agreement", "top5_agreement", "accuracy")
ABS_FLOOR = 1e-6  # error growths are relative to max(baseline, this): exact fp32 rows
MLFLOW_PREFIXES = ("runs:/", "models:/", "tag:")


class Settings(Section):
    gate: GateSettings
    experiment: str  # the MLflow experiment searched by tag:<key>=<value>


def settings(m: dict, w: dict) -> Settings:
    return Settings(gate=m["gate"], experiment=w.get("experiment", "engineforge"))


def source_of(gate: GateSettings | dict, model: str) -> str:
    baseline = gate.baseline if isinstance(gate, GateSettings) else gate["baseline"]
    return baseline.replace("{model}", model)


def local_file(source: str, artifacts: str) -> Path | None:
    """The file a source names (a file path, or ``release:<version>``'s bundle), None for
    MLflow sources. Cheap: the workflow declares it as an input at parse."""
    if source.startswith(MLFLOW_PREFIXES):
        return None
    if source.startswith("release:"):
        version = source.split(":", 1)[1]
        return Path(artifacts) / "releases" / f"engineforge-{version}.tar.gz"
    return Path(source)


def rule_inputs(m: dict, model: str, drift: str, artifacts: str) -> dict:
    """The gate rule's inputs: the drift matrix, and the baseline file where the source is
    one that exists (MLflow sources are read when the gate runs)."""
    path = local_file(source_of(m["gate"], model), artifacts)
    return {"drift": drift} | (
        {"baseline": str(path)} if path and path.is_file() else {})


def baseline_identity(m: dict, model: str, experiment: str) -> str:
    """The run an MLflow baseline resolves to now, as a params value of the gate rule: when
    an alias or a tag moves to another run, the gate reruns. '' for file baselines (the file
    is an input) and ``runs:/`` ones (fixed). An MLflow that cannot be read now gives a value
    no run id has, so the gate reruns and says why in one line."""
    source = source_of(m["gate"], model)
    if not source.startswith(("models:/", "tag:")):
        return ""
    try:
        return _resolve_run(_client()[0], source, model, experiment)[0]
    except Exception as err:  # noqa: BLE001 - the gate job reports it
        return f"unresolved: {type(err).__name__}"


# -- reading a baseline -------------------------------------------------------------------------
def _fail(model: str, message: str, fix: str) -> GateError:
    return GateError(message, model=model, key=key(model), fix=fix)


def _read_document(path: Path, model: str) -> dict:
    """A JSON document, or the manifest inside a release bundle (streamed, not extracted)."""
    if not path.is_file():
        raise _fail(model, f"baseline file '{path}' does not exist.",
                    "point gate.baseline at a drift.json, a manifest.json or a release bundle "
                    "(paths are relative to the run directory)")
    try:
        if path.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(path, "r:gz") as tar:
                member = next((m for m in tar.getmembers() if m.isfile()
                               and Path(m.name).name == "manifest.json"), None)
                if member is None:
                    raise _fail(model, f"release bundle '{path}' holds no manifest.json.",
                                "pass a bundle written by `engineforge release`")
                return json.loads(tar.extractfile(member).read())
        return json.loads(path.read_text())
    except (OSError, ValueError, tarfile.TarError, EOFError) as err:
        raise _fail(model, f"baseline '{path}' cannot be read: "
                           f"{first_line(err, 200, typed=False)}.",
                    "point gate.baseline at a readable JSON file or release bundle") from None


def rows_of(doc, model: str, what: str) -> list[dict]:
    """Drift rows of ``model`` in a drift.json or a release manifest (its ``drift`` section,
    else the rows of its engine entries, as manifests before that section hold them)."""
    if isinstance(doc, dict) and isinstance(doc.get("rows"), list):
        if doc.get("model") not in (None, model):
            raise _fail(model, f"{what} is the drift matrix of model '{doc['model']}'.",
                        "use {model} in gate.baseline, or set the gate per model")
        return doc["rows"]
    if isinstance(doc, dict) and isinstance(doc.get("engines"), list):
        rows = (doc.get("drift") or {}).get(model)
        if rows is None:
            seen: dict = {}
            for e in doc["engines"]:
                if e.get("model") == model and (e.get("audit") or {}).get("drift"):
                    key = (e["precision"], e["backend"])
                    seen.setdefault(key, {"precision": key[0], "backend": key[1],
                                          **e["audit"]["drift"]})
            rows = list(seen.values())
        if not rows:
            raise _fail(model, f"{what} holds no drift rows of model '{model}'.",
                        "pick a release that includes this model's engines")
        return rows
    raise _fail(model, f"{what} is neither a drift matrix (drift.json) nor a release "
                       "manifest.", "point gate.baseline at one of those")


def from_mlflow(source: str, model: str, experiment: str) -> tuple[list[dict], str]:
    """(rows, label) from the ``audit/drift.json`` of the model's parent run that ``source``
    resolves to. Any MLflow failure is one line naming the key."""
    from mlflow.exceptions import MlflowException

    from engineforge.redaction import redact  # credentials out of MLflow's messages

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file
    client, uri = _client()
    try:
        run_id, label = _resolve_run(client, source, model, experiment)
        run = client.get_run(run_id)
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent and run.data.tags.get("engineforge.kind") != "model":
            run_id = parent  # an engine's run: its model's drift matrix is on the parent
        names = {a.path for a in client.list_artifacts(run_id, "audit")}
        if "audit/drift.json" not in names:
            raise _fail(model, f"MLflow run {run_id} ({label}) has no audit/drift.json.",
                        "point gate.baseline at a run engineforge tracked (its model's parent "
                        "run logs the drift matrix)")
        with tempfile.TemporaryDirectory() as tmp:
            doc = read_json(client.download_artifacts(run_id, "audit/drift.json", tmp))
    except GateError:
        raise
    except (MlflowException, OSError, ValueError) as err:
        first = redact((str(err).strip().splitlines() or [type(err).__name__])[0])
        raise _fail(model, f"baseline '{source}' cannot be read from MLflow at "
                           f"{redact(uri)}: {first[:200]}.",
                    "check the alias, version, run id or tag, and MLFLOW_TRACKING_URI") from None
    return rows_of(doc, model, f"MLflow run {run_id}"), f"{label}, run {run_id}"


def _client():
    """(an MLflow client that fails fast on an unreachable server, its tracking URI)."""
    from engineforge import mlflow_store

    return mlflow_store.client(), mlflow_store.tracking_uri()


def _resolve_run(client, source: str, model: str, experiment: str) -> tuple[str, str]:
    if source.startswith("runs:/"):
        return source[len("runs:/"):].split("/")[0], source
    if source.startswith("models:/"):
        ref = source[len("models:/"):]
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        else:
            raise _fail(model, f"'{source}' names no alias or version.",
                        "write models:/<name>@<alias> or models:/<name>/<version>")
        # the run the release recorded (the version's own run may be an older holder of an
        # unchanged engine)
        return mv.tags.get("engineforge.run_id") or mv.run_id, source
    m = re.fullmatch(r"tag:([\w.\-/ ]+)=([^']*)", source)
    if not m:
        raise _fail(model, f"'{source}' is not tag:<key>=<value>.",
                    "write e.g. tag:engineforge.release=1.2")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`{m[1]}` = '{m[2]}' and tags.`engineforge.model` = "
                             f"'{model}'", order_by=["attributes.start_time DESC"],
        max_results=1) if exp else []
    if not runs:
        raise _fail(model, f"no MLflow run of model '{model}' in experiment '{experiment}' "
                           f"carries the tag {m[1]}={m[2]}.",
                    "check the tag (releases tag their runs engineforge.release=<version>) "
                    "and MLFLOW_TRACKING_URI")
    return runs[0].info.run_id, source


def load_baseline(source: str, model: str, experiment: str, artifacts: str
                  ) -> tuple[list[dict], str]:
    """(drift rows, a label saying where they come from) of ``source``."""
    if source.startswith(MLFLOW_PREFIXES):
        return from_mlflow(source, model, experiment)
    path = local_file(source, artifacts)
    doc = _read_document(path, model)
    kind = "manifest" if isinstance(doc, dict) and "engines" in doc else "drift.json"
    label = (f"release {doc.get('version')} manifest" if kind == "manifest"
             else f"{path}")
    return rows_of(doc, model, f"baseline '{path}'"), label


# -- comparing ----------------------------------------------------------------------------------
def _number(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan  # not a number: never passes


def _key(row: dict) -> tuple[str, str, str]:
    return (str(row.get("precision")), str(row.get("backend")), str(row.get("output") or WORST))


def compare_metric(metric: str, before: float, after: float, margin: float) -> dict:
    """One metric of one row: delta, the limit the margin allows, regressed or not (a value
    that is not finite, on either side, is a regression)."""
    delta = after - before
    if metric in HIGHER_IS_BETTER:
        limit = before - margin
        regressed = not after >= limit
    else:  # an error magnitude: relative growth
        limit = before + margin * max(abs(before), ABS_FLOOR)
        regressed = not after <= limit
    out = {"metric": metric, "before": before, "after": after, "delta": delta,
           "margin": margin, "limit": limit, "regressed": regressed}
    if not (math.isfinite(before) and math.isfinite(after)):
        out |= {"regressed": True, "note": "not finite"}
    return out


def _by_key(rows: list[dict]) -> dict:
    """Rows by (precision, backend, output); a row's per-output figures (an ``outputs``
    mapping, where a drift matrix holds them) become rows of their own."""
    out = {}
    for r in rows:
        out[_key(r)] = r
        for name, figures in (r.get("outputs") or {}).items():
            if isinstance(figures, dict):
                out[_key({**r, "output": name})] = figures
    return out


def compare(before_rows: list[dict], after_rows: list[dict], margins: dict) -> dict:
    """Every metric with a margin, in every row present on both sides; rows and metrics
    present on one side only are listed under ``missing``."""
    before, after = _by_key(before_rows), _by_key(after_rows)
    rows, missing = [], []
    for key in list(after) + [k for k in before if k not in after]:
        where = dict(zip(("precision", "backend", "output"), key))
        if key not in before or key not in after:
            missing.append({**where, "missing_in": "baseline" if key not in before
                            else "current"})
            continue
        for metric, margin in margins.items():
            if margin is None:
                continue
            b, a = _number(before[key].get(metric)), _number(after[key].get(metric))
            if b is None and a is None:
                continue
            if b is None or a is None:
                missing.append({**where, "metric": metric,
                                "missing_in": "baseline" if b is None else "current"})
                continue
            rows.append({**where, **compare_metric(metric, b, a, margin)})
    regressions = sum(r["regressed"] for r in rows)
    status = "regressed" if regressions else "pass" if rows else "nothing_compared"
    return {"status": status, "compared": len(rows), "regressions": regressions, "rows": rows,
            "missing": missing}


def run(job) -> None:
    if "ok" in job.outputs:
        return enforce(job.inputs["gate"], job.model, job.outputs["ok"])
    s: Settings = job.settings
    source = source_of(s.gate, job.model)
    before, label = load_baseline(source, job.model, s.experiment, job.artifacts)
    after = read_json(job.inputs["drift"])["rows"]
    result = compare(before, after, s.gate.margin.model_dump())
    write_json(job.outputs["json"], {
        "model": job.model, "baseline": {"source": source, "label": label},
        "strict": s.gate.strict, "margins": s.gate.margin.model_dump(), **result})


# -- strict mode ------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return format(v, ".6g")


def regression_line(row: dict, label: str) -> str:
    variant = f"{row['precision']}/{row['backend']}"
    if row["output"] != WORST:
        variant += f" output {row['output']}"
    note = f", {row['note']}" if row.get("note") else ""
    return (f"{variant} {row['metric']} {_fmt(row['before'])} -> {_fmt(row['after'])} "
            f"(margin {_fmt(row['margin'])}{note}) regressed vs {label}")


def enforce(gate_json: Path, model: str, ok: Path) -> None:
    """strict: one line for the first regression (and how many more), else ``gate.ok``."""
    g = read_json(gate_json)
    label = g["baseline"]["label"]
    if g["status"] == "nothing_compared":
        raise GateError(f"no row of {label} matches this run's drift matrix "
                        f"({len(g['missing'])} rows on one side only; see {gate_json}).",
                        model=model, key=key(model),
                        fix="gate against a baseline of the same precisions and backends")
    bad = [r for r in g["rows"] if r["regressed"]]
    if bad:
        more = f" ({len(bad) - 1} more in {gate_json})" if len(bad) > 1 else ""
        raise GateError(f"{regression_line(bad[0], label)}{more}.", model=model,
                        key=key(model, f"margin.{bad[0]['metric']}"),
                        fix=f"find the cause ({Path(gate_json).with_name('drift.md')}, "
                            f"{gate_json}); if the change is "
                            "accepted, raise that margin or move gate.baseline to a newer "
                            "baseline")
    ok.write_text(f"{label}: {g['compared']} metrics within their margins\n")
