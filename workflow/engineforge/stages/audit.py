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
from engineforge.results import AuditResult, Measurement
from engineforge.settings import Section, Tolerance

TOOLS = ("polygraphy", "onnxruntime-gpu", "onnx", "torch")


class Settings(Section):
    backend: str
    precision: str
    task: str
    tolerance: Tolerance
    inputs: dict
    labels: str | None = None       # labels array of the evaluation data (None: unlabelled)
    eval_batch: int = 1             # batch size of the accuracy pass (the first profile's max)


def settings(m: dict, w: dict) -> Settings:
    first = next(iter(m["profiles"].values()))
    labelled = "evaluation" in m and m["task"] == "classification"
    return Settings(backend=w["backend"], precision=w["precision"], task=m["task"],
                    tolerance=m["tolerances"][w["precision"]], inputs=m["inputs"],
                    labels=m["evaluation"].get("labels", "labels") if labelled else None,
                    eval_batch=next(iter(first.values()))["max"][0])


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


def task_accuracy(runner, s: Settings, eval_path: Path, eval_ref: dict) -> dict:
    """Accuracy of the variant and of the PyTorch reference on labelled data."""
    data = modelio.load_npz(eval_path)
    labels = data[s.labels]
    names, max_batch = list(s.inputs), s.eval_batch
    preds = []
    with runner:
        for start in range(0, len(labels), max_batch):
            feed = {n: data[n][start:start + max_batch].astype(modelio.input_dtype(s.inputs, n))
                    for n in names}
            out = runner.infer(feed)
            preds.append(top1(np.asarray(next(iter(out.values())), dtype=np.float32)))
    acc = float((np.concatenate(preds) == labels).mean())
    ref_acc = float((top1(next(iter(eval_ref.values()))) == labels).mean())
    return {"accuracy": acc, "reference_accuracy": ref_acc, "accuracy_drop": ref_acc - acc,
            "samples": len(labels)}


def verdict(metrics: dict, tol: Tolerance, task: str) -> tuple[bool, list[str]]:
    """Pass/fail against the precision's tolerances; lists every violated limit."""
    failures = []
    for name, s in metrics["outputs"].items():
        if s["max_abs"] > tol.max_abs:
            failures.append(f"{name}: max_abs {s['max_abs']:.3g} > {tol.max_abs}")
        if s["cosine"] < tol.cosine_min:
            failures.append(f"{name}: cosine {s['cosine']:.6f} < {tol.cosine_min}")
        if task == "classification" and s["top1_agreement"] < tol.top1_min:
            failures.append(f"{name}: top1 {s['top1_agreement']:.3f} < {tol.top1_min}")
    task_m = metrics.get("task")
    if task_m and task_m["accuracy_drop"] > tol.accuracy_drop_max:
        failures.append(f"accuracy drop {task_m['accuracy_drop']:.4f} > "
                        f"{tol.accuracy_drop_max}")
    return not failures, failures


def _runner(backend, engine: Path):
    try:
        return backend.runner(engine)
    except NotImplementedError as err:
        raise NotRunnable(str(err) or f"the {backend.name} backend has no runner for the "
                          "audit") from None


def worker_lane(job) -> str:
    """Many small jobs: a warm worker per backend runs them (see worker.py)."""
    return f"backend:{job.backend}"


def run(job) -> AuditResult:
    s: Settings = job.settings
    t0 = time.perf_counter()
    engine = job.inputs["engine"]
    feed, ref_out, eval_ref = _reference(job.inputs["reference"])
    be = get_backend(s.backend)
    ok, why = be.runnable(s.precision)

    def measure(make_runner) -> dict:
        metrics = {"outputs": compare(ref_out, feed, make_runner(), s.task)}
        if s.labels:
            metrics["task"] = task_accuracy(make_runner(), s, job.inputs["evaluation"], eval_ref)
        passed, failures = verdict(metrics, s.tolerance, s.task)
        return {"status": "pass" if passed else "fail", "failures": failures, **metrics}

    result: dict = {}
    if not ok:
        result = {"status": "not_runnable", "reason": f"not runnable on {s.backend}: {why}"}
    else:
        try:
            result = measure(lambda: _runner(be, engine))
        except NotRunnable as err:
            result = {"status": "not_runnable", "reason": f"not runnable on {s.backend}: {err}"}
            # The ONNX variant itself can still be audited by the ONNX spec's arithmetic.
            if onnx_reference.usable(engine):
                try:
                    result["emulated"] = measure(
                        lambda: onnx_reference.OnnxReferenceRunner(engine))
                except NotRunnable as err2:
                    result["emulated"] = Measurement(status="not_runnable", reason=str(err2))
    return AuditResult(backend=s.backend, precision=s.precision,
                       tolerance=s.tolerance.model_dump(), **result,
                       time_s=round(time.perf_counter() - t0, 3))
