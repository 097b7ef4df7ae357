"""The report: artifacts/report.html is self-contained (every image a data: URI that decodes
to a real PNG, no external resource), holds per model the drift heatmap and the error
histograms of every output, renders localisation and repaired variants when their JSON
exists ("none" when not), is logged to the model's MLflow parent run, and Snakemake's own
`--report` includes the figures. One real workflow run (ONNX Runtime, fp32 + fp16) feeds it."""

from __future__ import annotations

import base64
import copy
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_raw_config, write_tiny_workspace
from engineforge.layout import REPORT_FILES, Layout
from engineforge.sidecar import read_json, sha256_file, write_json
from workflow_helpers import Page, mlflow_client, snakemake, write_config

pytestmark = pytest.mark.e2e

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    ws = tmp_path_factory.mktemp("report")
    write_tiny_workspace(ws)
    raw = tiny_raw_config(precisions=("fp32", "fp16"), backends=("onnxruntime",))
    write_config(ws, raw)
    snakemake(ws)
    return ws, raw


def check_png(src: str) -> None:
    from PIL import Image

    head, _, data = src.partition(",")
    assert head == "data:image/png;base64", head[:60]
    raw = base64.b64decode(data, validate=True)
    assert raw.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(raw)) as img:
        img.verify()
        assert img.format == "PNG" and min(img.size) > 50


def external(text: str) -> list[str]:
    """What a page would fetch or link outside itself (offline it would be missing)."""
    found = []
    for tag, attrs in Page(text).tags:
        if tag in ("script", "link", "iframe", "object", "embed"):
            found.append(tag)
        for key in ("src", "href", "data", "srcset", "poster"):
            v = (attrs.get(key) or "").strip().lower()
            if v and not (v.startswith("#") or (key == "src" and v.startswith("data:"))):
                found.append(f"{tag} {key}={v[:80]}")
    return found + [s for s in ("@import", "url(") if s in text]


def test_report_is_self_contained(finished):
    ws, _ = finished
    text = (ws / "artifacts/report.html").read_text()
    page = Page(text)
    assert page.imgs(), "no image in the report"
    for img in page.imgs():
        check_png(img["src"])
    assert external(text) == []
    # positive control: the check sees what a CDN-backed page would load
    assert len(external('<link rel="stylesheet" href="https://cdn.example/x.css">'
                        '<img src="https://cdn.example/a.png"><a href="http://x">x</a>'
                        "<style>@import 'x.css'</style>")) == 5


def test_heatmap_and_histograms_for_every_model_and_output(finished):
    ws, raw = finished
    L = Layout(str(ws / "artifacts"))
    page = Page((ws / "artifacts/report.html").read_text())
    alts = {img["alt"]: img["src"] for img in page.imgs()}
    text = " ".join(" ".join(page.text).split())
    for model in raw["models"]:
        for figure in ("drift heatmap", "error histograms", "latency"):
            src = alts[f"{model} {figure}"]
            # the page embeds exactly the figure file the model's MLflow run gets
            png = {"drift heatmap": "drift_heatmap.png", "error histograms":
                   "error_histograms.png", "latency": "latency.png"}[figure]
            assert base64.b64decode(src.partition(",")[2]) == Path(
                L.report(png, model)).read_bytes()
        for precision in ("fp32", "fp16"):
            audit = read_json(L.audit(model, "onnxruntime", precision))["result"]
            assert audit["outputs"]
            for name, drift in audit["outputs"].items():
                h = drift["abs_error_hist"]
                assert len(h["edges"]) == len(h["counts"]) + 1 <= 57  # compact: <= 56 bins
                total = sum(h["counts"]) + h["below"] + h["above"] + h["non_finite"]
                ref = np.load(L.export("reference.npz", model))[f"out:{name}"]
                assert total == ref.size
                # the histogram table names every output of every variant
                assert f"{name} {precision} / onnxruntime" in text, (model, name, precision)
    for model in raw["models"]:  # the localise stage (where there is one) found all passing
        found = sorted(p.stem for p in (ws / f"artifacts/{model}/audit/localise").glob("*"))
        assert (f"not localised (every audit passed): {', '.join(found)}" if found
                else "none (no variant was localised)") in text
    assert text.count("none (no repaired variant)") == len(raw["models"])


def test_error_histogram_counts_and_bins():
    from engineforge.stages.audit import error_histogram

    a = np.zeros(6, np.float32)
    b = np.array([0, 1e-3, 1.1e-3, 0.2, np.inf, 1e9], np.float32)
    h = error_histogram(a, b)
    assert (h["below"], h["above"], h["non_finite"]) == (1, 1, 1)
    assert sum(h["counts"]) == 3
    edges, counts = np.array(h["edges"]), np.array(h["counts"])
    assert edges[0] <= 1e-3 < edges[1] and counts[0] == 2  # 1e-3 and 1.1e-3 share a bin
    assert edges[-2] <= 0.2 < edges[-1] and counts[-1] == 1
    assert error_histogram(a, a)["counts"] == [] and error_histogram(a, a)["below"] == 6


def test_heatmap_colours_follow_the_tolerance():
    from engineforge.stages.report import NEUTRAL, OVER, PASS_LIMIT, PASS_LOW, cell_colour

    tol = {"snr_min_db": 40.0, "cosine_min": 0.999, "max_abs": None, "top1_min": 1.0,
           "accuracy_drop_max": 0.01}
    assert cell_colour("cosine", 1.0, tol) == PASS_LOW  # none of the tolerance used
    assert cell_colour("cosine", 0.999, tol) == PASS_LIMIT  # all of it, still a pass
    assert cell_colour("cosine", 0.998, tol) == OVER
    assert cell_colour("snr_db", 39.9, tol) == OVER
    assert cell_colour("snr_db", 40.0, tol) == PASS_LIMIT
    assert cell_colour("snr_db", float("nan"), tol) == OVER
    assert cell_colour("top1_agreement", 1.0, tol) == PASS_LOW  # a zero budget, unused
    assert cell_colour("top1_agreement", 0.99, tol) == OVER
    assert cell_colour("accuracy_drop", 0.02, tol) == OVER
    assert cell_colour("max_abs", 5.0, tol) == NEUTRAL  # max_abs: null, not checked
    assert cell_colour("max_abs", 5.0, {"max_abs": 1.0}) == OVER
    assert cell_colour("p99_abs", 5.0, tol) == NEUTRAL  # no limit for it
    assert cell_colour("snr_db", 10.0, {"cosine_min": 0.9}) == NEUTRAL  # tolerance without


@pytest.mark.parametrize("counts, below, above, median", [
    ([1, 1], 5, 0, "exact or below the bins"), ([3, 1], 1, 0, "[1, 2)"),
    ([1, 3], 1, 0, "[2, 3)"), ([1, 1], 0, 5, "above the bins")])
def test_histogram_table_names_the_bin_of_the_median(counts, below, above, median):
    from engineforge.results import ErrorHistogram
    from engineforge.stages import report

    h = ErrorHistogram(edges=[1, 2, 3], counts=counts, below=below, above=above)
    page = Page(report._hist_table([("fp16 / onnxruntime", {"y": h})]))
    cells = [t for t in page.text if t.strip()][7:]  # after the header
    assert cells[:4] == ["y", "fp16 / onnxruntime", str(sum(counts) + below + above),
                         f"{below / (sum(counts) + below + above):.1%}"]
    assert cells[4] == median


def _node(node, op, snr_in, snr_out):
    return {"node": node, "op_type": op, "output": f"{node}_out", "snr_in_db": snr_in,
            "snr_out_db": snr_out, "drop_db": snr_in - snr_out, "cosine": 0.97,
            "fp32_peak_abs": 70000.0, "non_finite": 0}


def test_localisation_and_repaired_variants_render_when_present(finished, tmp_path):
    """A copy of the finished artifacts plus fixture JSON in the shapes the localise and
    repair stages write: a Localisation (as a sidecar's result, and bare) and a
    ``fp16-repaired`` variant whose precision.json holds ``extra.repair``."""
    from engineforge.job import Job
    from engineforge.runner import run_job
    from engineforge.stages import report

    ws, raw = finished
    art = tmp_path / "artifacts"
    shutil.copytree(ws / "artifacts", art, ignore=shutil.ignore_patterns("*.onnx"))
    L = Layout(str(art))
    model = "tinycls"
    loc = art / model / "audit/localise"
    loc.mkdir(parents=True, exist_ok=True)
    first = _node("/act/Exp", "Exp", 80.0, 12.5)
    write_json(loc / "fp16.json", {"result": {
        "status": "localised", "runtime": "onnxruntime-cpu", "samples": 8, "compared": 11,
        "passes": 1, "drop_threshold_db": 10.0, "snr_threshold_db": 40.0, "first": first,
        "worst": [first, _node("/head/MatMul", "MatMul", 60.0, 30.0)], "time_s": 0.4}})
    write_json(loc / "int8.json", {"status": "clean", "drop_threshold_db": 10.0,
                                   "snr_threshold_db": 40.0})
    write_json(loc / "bf16.json", {"status": "half-written"})  # shown, not fatal
    # fp16 fails its audit; fp16-repaired passes and runs 20 % slower
    plain_audit = L.audit(model, "onnxruntime", "fp16")
    side = read_json(plain_audit)
    side["result"] |= {"status": "fail", "failures": ["linear: cosine 0.97 < 0.999"],
                       "reason": "linear: cosine 0.97 < 0.999"}
    write_json(plain_audit, side)
    repaired = copy.deepcopy(side)
    repaired["result"] |= {"status": "pass", "failures": [], "reason": None,
                           "precision": "fp16-repaired"}
    write_json(L.audit(model, "onnxruntime", "fp16-repaired"), repaired)
    prec = read_json(L.precision("precision.json", model, "fp16"))
    prec["result"]["extra"] = {"repair": {
        "status": "repaired", "from": "fp16", "excluded_nodes": ["/act/Exp", "/act/Mul"],
        "rounds": [{"round": 0, "excluded": [], "passed": False,
                    "failures": ["linear: snr 25.7 < 40.0 dB"],
                    "metrics": {"linear": {"snr_db": 25.7, "cosine": 0.97}}},
                   {"round": 1, "excluded": ["/act/Exp", "/act/Mul"], "passed": True,
                    "failures": [], "metrics": {"linear": {"snr_db": 68.2, "cosine": 1.0}}}]}}
    write_json(L.precision("precision.json", model, "fp16-repaired"), prec)
    prof = next(iter(raw["models"][model]["profiles"]))
    for kind, path_of in (("build", lambda v: L.build("onnxruntime", model, v, prof)),
                          ("bench", lambda v: L.bench(model, "onnxruntime", v, prof))):
        s = read_json(path_of("fp16"))
        if kind == "bench":
            s["result"]["points"]["opt"]["p50_ms"] = 1.0
            write_json(path_of("fp16"), s)
            s["result"]["points"]["opt"]["p50_ms"] = 1.2
        write_json(path_of("fp16-repaired"), s)

    settings = report.Settings(precisions=["fp32", "fp16", "fp16-repaired"],
                               builds={"onnxruntime": [prof]}, profiles=[prof])
    run_job(Job(stage="report", model=model, wildcards={"model": model}, inputs={},
                outputs={k: Path(L.report(v, model)) for k, v in report.OUTPUTS.items()},
                settings=settings, tools={}, device=None, log=tmp_path / "report.log",
                artifacts=str(art)))
    page = Page(Path(L.report("report.html", model)).read_text())
    text = " ".join(" ".join(page.text).split())
    for img in page.imgs():
        check_png(img["src"])
    assert "none (no variant was localised)" not in text
    assert "fp16 : localised" in text and "int8 : clean" in text
    assert "bf16 : unreadable bf16.json: " in text
    assert "first /act/Exp Exp 80.0 12.5 67.5" in text
    assert "worst /head/MatMul MatMul 60.0 30.0 30.0" in text
    assert "none (no repaired variant)" not in text
    assert "fp16-repaired (from fp16): repair repaired" in text
    assert "/act/Exp, /act/Mul" in text
    assert "0 none fail linear: 25.7 dB linear: snr 25.7 < 40.0 dB" in text  # the rounds
    assert "1 /act/Exp, /act/Mul pass linear: 68.2 dB —" in text
    assert "onnxruntime fail pass" in text  # the verdicts side by side
    assert "1.000 → 1.200 +20.0%" in text  # the latency cost
    assert "fp16 / onnxruntime fail linear: cosine 0.97 < 0.999" in text  # why it failed
    rows = report.gather(L, model, settings)["rows"]  # the heatmap's rows
    assert [(r["precision"], r["status"]) for r in rows] == [
        ("fp32", "pass"), ("fp16", "fail"), ("fp16-repaired", "pass")]


def test_mlflow_parent_run_holds_the_report(finished, tmp_path):
    ws, raw = finished
    L = Layout(str(ws / "artifacts"))
    client = mlflow_client(ws)
    exp = client.get_experiment_by_name(raw["experiment"])
    for model in raw["models"]:
        (parent,) = client.search_runs([exp.experiment_id],
                                       f"tags.`engineforge.kind` = 'model' and "
                                       f"tags.`engineforge.model` = '{model}'")
        logged = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id,
                                                                   "report")}
        assert logged == set(REPORT_FILES)
        got = client.download_artifacts(parent.info.run_id, "report/report.html",
                                         str(tmp_path))
        assert sha256_file(got) == sha256_file(L.report("report.html", model))
        assert parent.data.tags["engineforge.report.sha256"] == sha256_file(got)


def test_snakemake_report_includes_the_figures(finished):
    ws, raw = finished
    snakemake(ws, "--report", "snakemake-report.html", cores=1)
    text = (ws / "snakemake-report.html").read_text()
    for name in ("drift_heatmap.png", "error_histograms.png", "latency.png", "report.html"):
        assert name in text, name
    assert all(model in text for model in raw["models"])


def test_after_failed_jobs_the_report_shows_what_exists(finished, tmp_path):
    """``failures.finalise``'s report step on a copy where one audit failed: the failed
    model's page is written from what exists (and not trusted by the next run), the healthy
    model's page is kept, the whole page lists the failed job."""
    from engineforge import config, failures
    from engineforge.stages import track

    ws, raw = finished
    art = tmp_path / "artifacts"
    shutil.copytree(ws / "artifacts", art, ignore=shutil.ignore_patterns("*.onnx"))
    L = Layout(str(art))
    shutil.rmtree(art / "tinycls/report")
    Path(L.audit("tinycls", "onnxruntime", "fp16")).unlink()
    (art / "report.html").unlink()
    kept = Path(L.report("report.html", "tinyfcn")).stat().st_mtime_ns
    models = config.resolve(raw, ws)["models"]
    track_settings = {m: track.settings(models[m], {"model": m}, raw["experiment"],
                                           {"onnxruntime": list(models[m]["profiles"])})
                      for m in models}
    outputs = {m: track.model_outputs(L, m, s) for m, s in track_settings.items()}
    failed = [{"job": "audit-tinycls-onnxruntime-fp16", "model": "tinycls", "stage": "audit",
               "precision": "fp16", "backend": "onnxruntime", "reason": "a broken runtime"}]
    failures._report(L, outputs, track_settings, failed)

    page = Page((art / "report.html").read_text())
    text = " ".join(" ".join(page.text).split())
    assert "Failed jobs" in text and "tinycls audit fp16/onnxruntime a broken runtime" in text
    assert {"tinycls drift heatmap", "tinyfcn drift heatmap"} <= {i["alt"] for i in page.imgs()}
    for img in page.imgs():
        check_png(img["src"])
    assert Path(L.report("report.html", "tinycls")).stat().st_mtime == failures.UNTRUSTED_MTIME
    assert Path(L.report("report.html", "tinyfcn")).stat().st_mtime_ns == kept
