"""Stage 4 — accuracy audit of a variant (or engine) against the PyTorch reference.

Polygraphy runs the variant (``Comparator.run``) and compares it with the saved
PyTorch outputs (``Comparator.compare_accuracy`` with ``CompareFunc.simple``,
error quantile 0.99): per output max/mean/median/p99 absolute and relative
error. On top: cosine similarity, top-1 agreement for classifiers, and task
accuracy on labelled evaluation data. A variant that cannot run on the backend
is a result ("not runnable on <backend>: <reason>"), not an error.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from engineforge import modelio
from engineforge.backends import get_backend, onnx_reference
from engineforge.config import stage_slice
from engineforge.sidecar import make_sidecar, read_json, write_json
from engineforge.versions import tool_versions

REFERENCE = "pytorch"


class NotRunnable(Exception):
    """The backend's runtime cannot load or run the variant."""


def _reference(path: Path) -> tuple[dict, dict, dict]:
    data = modelio.load_npz(path)
    pick = lambda prefix: {k[len(prefix):]: v for k, v in data.items()
                           if k.startswith(prefix)}
    return pick("in:"), pick("out:"), pick("eval_out:")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def top1(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).argmax(axis=1)


def compare(reference: dict, feed: dict, runner, task: str) -> dict:
    """Per-output drift of ``runner`` against ``reference`` through Polygraphy."""
    from polygraphy.comparator import Comparator, CompareFunc, RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING

    try:
        results = Comparator.run([runner], data_loader=[feed], warm_up=0)
    except Exception as err:  # noqa: BLE001 - the runtime rejects the variant: a result
        text = str(err).strip().splitlines()
        raise NotRunnable((text[-1] if text else type(err).__name__)[:300]) from None
    ref = RunResults()
    ref.append((REFERENCE, [IterationResult(outputs=reference, runner_name=REFERENCE)]))
    actual_name, actual = results[0]
    ref.append((actual_name, actual))
    acc = Comparator.compare_accuracy(
        ref, compare_func=CompareFunc.simple(atol=np.inf, rtol=np.inf, error_quantile=0.99,
                                             check_error_stat="quantile", check_shapes=True))
    (per_iter,) = next(iter(acc[0].values()))  # one compare func, one iteration
    outputs = {}
    produced = actual[0]
    for name, res in per_iter.items():
        a, b = reference[name], np.asarray(produced[name], dtype=np.float32)
        stats = {"max_abs": float(res.max_absdiff), "mean_abs": float(res.mean_absdiff),
                 "median_abs": float(res.median_absdiff), "p99_abs": float(res.quantile_absdiff),
                 "max_rel": float(res.max_reldiff), "mean_rel": float(res.mean_reldiff),
                 "median_rel": float(res.median_reldiff),
                 "p99_rel": float(res.quantile_reldiff), "cosine": cosine(a, b)}
        if task == "classification":
            stats["top1_agreement"] = float((top1(a) == top1(b)).mean())
        outputs[name] = stats
    return outputs


def task_accuracy(runner, m: dict, eval_path: Path, eval_ref: dict, max_batch: int) -> dict:
    """Accuracy of the variant and of the PyTorch reference on labelled data."""
    data = modelio.load_npz(eval_path)
    labels = data[m["evaluation"].get("labels", "labels")]
    names = list(m["inputs"])
    preds = []
    with runner:
        for start in range(0, len(labels), max_batch):
            feed = {n: data[n][start:start + max_batch].astype(modelio.input_dtype(m, n))
                    for n in names}
            out = runner.infer(feed)
            preds.append(top1(np.asarray(next(iter(out.values())), dtype=np.float32)))
    acc = float((np.concatenate(preds) == labels).mean())
    ref_acc = float((top1(next(iter(eval_ref.values()))) == labels).mean())
    return {"accuracy": acc, "reference_accuracy": ref_acc, "accuracy_drop": ref_acc - acc,
            "samples": len(labels)}


def verdict(metrics: dict, tol: dict, task: str) -> tuple[bool, list[str]]:
    """Pass/fail against the precision's tolerances; lists every violated limit."""
    failures = []
    for name, s in metrics["outputs"].items():
        if "max_abs" in tol and s["max_abs"] > tol["max_abs"]:
            failures.append(f"{name}: max_abs {s['max_abs']:.3g} > {tol['max_abs']}")
        if "cosine_min" in tol and s["cosine"] < tol["cosine_min"]:
            failures.append(f"{name}: cosine {s['cosine']:.6f} < {tol['cosine_min']}")
        if (task == "classification" and "top1_min" in tol
                and s["top1_agreement"] < tol["top1_min"]):
            failures.append(f"{name}: top1 {s['top1_agreement']:.3f} < {tol['top1_min']}")
    task_m = metrics.get("task")
    if task_m and "accuracy_drop_max" in tol and task_m["accuracy_drop"] > tol[
            "accuracy_drop_max"]:
        failures.append(f"accuracy drop {task_m['accuracy_drop']:.4f} > "
                        f"{tol['accuracy_drop_max']}")
    return not failures, failures


def run(model: str, m: dict, backend: str, precision: str, engine: Path, reference: Path,
        out: Path, root: Path = Path(".")) -> dict:
    t0 = time.perf_counter()
    feed, ref_out, eval_ref = _reference(Path(reference))
    be = get_backend(backend)
    tol = m["tolerances"].get(precision, {})
    ok, why = be.runnable(precision)
    result: dict = {"backend": backend, "precision": precision, "tolerance": tol}

    def measure(make_runner) -> dict:
        metrics = {"outputs": compare(ref_out, feed, make_runner(), m["task"])}
        if "evaluation" in m and m["task"] == "classification":
            first = next(iter(m["profiles"].values()))
            max_batch = next(iter(first.values()))["max"][0]
            metrics["task"] = task_accuracy(make_runner(), m, root / m["evaluation"]["path"],
                                            eval_ref, max_batch)
        passed, failures = verdict(metrics, tol, m["task"])
        return {"status": "pass" if passed else "fail", "failures": failures, **metrics}

    if not ok:
        result |= {"status": "not_runnable", "reason": f"not runnable on {backend}: {why}"}
    else:
        try:
            result |= measure(lambda: be.runner(Path(engine)))
        except NotRunnable as err:
            result |= {"status": "not_runnable", "reason": f"not runnable on {backend}: {err}"}
            # The ONNX variant itself can still be audited by the ONNX spec's arithmetic.
            if onnx_reference.usable(engine):
                try:
                    result["emulated"] = measure(
                        lambda: onnx_reference.OnnxReferenceRunner(engine))
                except NotRunnable as err2:
                    result["emulated"] = {"status": "not_runnable", "reason": str(err2)}
    result["time_s"] = round(time.perf_counter() - t0, 3)
    side = make_sidecar(stage="audit", model=model,
                        inputs={"engine": engine, "reference": reference},
                        config_slice=stage_slice(m, "audit", precision=precision),
                        tools=tool_versions("audit", backend), outputs={}, result=result)
    write_json(out, side)
    return side


HEADLINE = ("status", "max_abs", "p99_abs", "mean_rel", "cosine", "top1_agreement", "accuracy",
            "accuracy_drop")


def drift_matrix(model: str, audits: list[Path], json_out: Path, md_out: Path) -> dict:
    """Rows precision × backend, columns the headline metrics (worst output)."""
    rows = []
    results = []
    for path in audits:
        r = read_json(path)["result"]
        results.append(r)
        if r.get("emulated"):
            results.append({**r["emulated"], "precision": r["precision"],
                            "backend": f"{onnx_reference.NAME} (emulated)"})
    for r in results:
        row = {"precision": r["precision"], "backend": r["backend"], "status": r["status"],
               "reason": r.get("reason")}
        outs = r.get("outputs") or {}
        if outs:
            row["max_abs"] = max(o["max_abs"] for o in outs.values())
            row["p99_abs"] = max(o["p99_abs"] for o in outs.values())
            row["mean_rel"] = max(o["mean_rel"] for o in outs.values())
            row["cosine"] = min(o["cosine"] for o in outs.values())
            if all("top1_agreement" in o for o in outs.values()):
                row["top1_agreement"] = min(o["top1_agreement"] for o in outs.values())
        if r.get("task"):
            row["accuracy"] = r["task"]["accuracy"]
            row["reference_accuracy"] = r["task"]["reference_accuracy"]
            row["accuracy_drop"] = r["task"]["accuracy_drop"]
        rows.append(row)
    order = {p: i for i, p in enumerate(("fp32", "fp16", "bf16", "int8", "fp8"))}
    backend_order = {b: i for i, b in enumerate(
        ("onnxruntime", f"{onnx_reference.NAME} (emulated)", "tensorrt-rtx", "tensorrt",
         "trtexec"))}
    rows.sort(key=lambda r: (backend_order.get(r["backend"], 9), order.get(r["precision"], 9)))
    matrix = {"model": model, "reference": REFERENCE, "rows": rows}
    write_json(json_out, matrix)
    notes: list[str] = []
    lines = [f"# Drift matrix — {model} (reference: PyTorch fp32)", "",
             "| precision | backend | " + " | ".join(HEADLINE) + " |",
             "|---|---|" + "---|" * len(HEADLINE)]
    for r in rows:
        cells = []
        for key in HEADLINE:
            v = r.get(key)
            if key == "status" and r.get("reason"):
                notes += [r["reason"]] if r["reason"] not in notes else []
                v = f"not runnable [{notes.index(r['reason']) + 1}]"
            spec = ".6f" if key == "cosine" else ".4g"
            cells.append("—" if v is None else format(v, spec) if isinstance(v, float)
                         else str(v))
        lines.append(f"| {r['precision']} | {r['backend']} | " + " | ".join(cells) + " |")
    lines += [""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)] if notes else []
    from engineforge.sidecar import atomic_path

    with atomic_path(md_out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return matrix
