"""Stage 4 — accuracy audit of a variant (or engine) against the PyTorch reference.

The variant's Polygraphy runner runs every sample of the reference (``audit.samples``,
saved by the export) in batches that fit the first profile; the concatenated outputs are
compared with the PyTorch outputs, computed in the same batches, by Polygraphy
(``Comparator.compare_accuracy`` with ``SimpleCompareFunc``, error quantile 0.99): per
output max/mean/median/p99 absolute and relative error. On top: cosine similarity, top-1
agreement for classifiers, and task accuracy on labelled evaluation data. NaN or Inf in the
reference or in the variant's outputs, or a metric that is not finite, fails the verdict.
A variant that cannot run on the backend is a result ("not runnable on <backend>:
<reason>"), not an error; so is an emulated audit stopped at its time limit.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from engineforge import modelio
from engineforge.backends import get_backend, onnx_reference
from engineforge.errors import AuditError, key_line
from engineforge.results import AuditResult, Measurement
from engineforge.settings import Section, Tolerance, base_precision

TOOLS = ("polygraphy", "onnxruntime-gpu", "onnx", "torch")


class Settings(Section):
    backend: str
    precision: str
    task: str
    tolerance: Tolerance
    inputs: dict
    labels: str | None = None       # labels array of the evaluation data (None: unlabelled)
    batch: int = 1                  # samples per batch (fits the first profile; the export's)
    profile: dict = {}              # the first profile (the audited engines' shapes)


def settings(m: dict, w: dict) -> Settings:
    first = next(iter(m["profiles"].values()))
    return Settings(backend=w["backend"], precision=w["precision"], task=m["task"],
                    tolerance=m["tolerances"][base_precision(w["precision"])], inputs=m["inputs"],
                    labels=modelio.labels_key(m),
                    batch=modelio.batch_size(m["inputs"], first, m["audit"]["samples"]),
                    profile=first)


REFERENCE = "pytorch"
CONSTANT_REFERENCE = "the PyTorch reference is constant"  # a failure no node causes


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


SNR_BOUND_DB = 200.0  # identical outputs; float32 round-off alone sits near 140 dB


def snr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Signal-to-noise ratio of ``b`` against the reference ``a`` in dB (10 log10 of signal
    power over error power), within +-SNR_BOUND_DB so that identical outputs stay finite."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    signal, noise = float(a @ a), float((a - b) @ (a - b))
    if noise == 0:
        return SNR_BOUND_DB
    if signal == 0:
        return -SNR_BOUND_DB
    return float(np.clip(10 * np.log10(signal / noise), -SNR_BOUND_DB, SNR_BOUND_DB))


def top5_agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean overlap of the reference's and the variant's five highest classes per sample
    (1.0: the same five; None below five classes)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.shape[1] < 5:
        return None
    ta, tb = np.argsort(-a, axis=1)[:, :5], np.argsort(-b, axis=1)[:, :5]
    return float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(ta, tb)]))


HIST_DECADES = (-10, 4)  # |error| range of the histogram's fixed bins: 1e-10 .. 1e4
HIST_BINS_PER_DECADE = 4


def error_histogram(a: np.ndarray, b: np.ndarray) -> dict:
    """A compact histogram of ``|b - a|``: fixed log-spaced bins (the same for every variant,
    so they compare), trimmed to the occupied ones (``results.ErrorHistogram``)."""
    err = np.abs(b.astype(np.float64).ravel() - a.astype(np.float64).ravel())
    finite = err[np.isfinite(err)]
    lo, hi = HIST_DECADES
    edges = np.logspace(lo, hi, (hi - lo) * HIST_BINS_PER_DECADE + 1)
    counts, _ = np.histogram(finite, bins=edges)
    out = {"below": int((finite < edges[0]).sum()), "above": int((finite > edges[-1]).sum()),
           "non_finite": int(err.size - finite.size)}
    used = np.flatnonzero(counts)
    if not used.size:
        return {"edges": [], "counts": [], **out}
    first, last = used[0], used[-1] + 1
    return {"edges": [float(f"{e:.6g}") for e in edges[first:last + 1]],
            "counts": counts[first:last].tolist(), **out}


def _constant(a) -> bool:
    a = np.asarray(a)
    return a.size > 0 and bool((a == a.flat[0]).all())


def _cause(err: BaseException) -> str:
    return key_line(str(err)) if str(err).strip() else type(err).__name__


def non_finite(outputs: dict, who: str, names, where: str = "") -> list[str]:
    """One failure per output (of ``names``) that holds NaN or Inf, saying how many."""
    found = []
    for name in (n for n in names if n in outputs):
        arr = np.asarray(outputs[name])
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            found.append(f"{who} output '{name}'{where} is not finite: "
                         f"{int(np.isnan(arr).sum())} NaN and {int(np.isinf(arr).sum())} Inf "
                         f"of {arr.size} values")
    return found


def infer_all(runner, feed: dict, batch: int, model: str, engine: Path) -> dict:
    """The runner's outputs on every sample of ``feed``, run in batches of ``batch``.
    A runtime that cannot load or run it: :class:`NotRunnable`; inputs that differ from
    the reference's: :class:`AuditError` (a wrong export, not a runtime limit)."""
    try:
        runner.activate()
    except Exception as err:  # noqa: BLE001 - the runtime rejects the variant: a result
        raise NotRunnable(_cause(err)) from None
    try:
        takes = list(runner.get_input_metadata(use_numpy_dtypes=False))
        if set(takes) != set(feed):
            raise AuditError(
                f"input mismatch: the reference feeds {sorted(feed)}, the variant "
                f"'{engine}' takes {sorted(takes)}", model=model, key=f"models.{model}.inputs",
                fix="the exported ONNX must take exactly the model's declared inputs: check "
                    "the export (an input the model ignores is folded away) or the inputs: "
                    "section")
        try:
            return modelio.run_batched(runner.infer, feed, batch)
        except Exception as err:  # noqa: BLE001
            raise NotRunnable(_cause(err)) from None
    finally:
        runner.deactivate()


def compare(reference: dict, produced: dict, task: str) -> tuple[dict, list[str]]:
    """Per-output drift of ``produced`` against ``reference`` through Polygraphy, and the
    failures no metric can express (outputs the variant lacks)."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    missing = [n for n in reference if n not in produced]
    failures = [f"the variant has no output '{n}' (it has {sorted(produced)})" for n in missing]
    common = [n for n in reference if n in produced]
    if not common:
        return {}, failures
    if all(_constant(reference[n]) for n in common):  # any variant would "agree" with it
        failures.append(
            f"{CONSTANT_REFERENCE} (" + ", ".join(
                f"'{n}' is {np.asarray(reference[n]).flat[0].item()!r} everywhere" for n in common)
            + "): no drift can be measured against it; audit the model with its trained "
            "weights, or inputs (calibration / evaluation data, inputs.<name>.range) that "
            "drive its outputs")
    actual = {n: np.asarray(produced[n], dtype=np.float32) for n in common}
    runs = RunResults()
    runs.append((REFERENCE, [IterationResult(outputs={n: reference[n] for n in common},
                                             runner_name=REFERENCE)]))
    runs.append(("variant", [IterationResult(outputs=actual, runner_name="variant")]))
    acc = Comparator.compare_accuracy(
        runs, compare_func=SimpleCompareFunc(atol=np.inf, rtol=np.inf, error_quantile=0.99,
                                             check_error_stat="quantile", check_shapes=True))
    (per_iter,) = next(iter(acc[0].values()))  # one compare func, one iteration
    outputs = {}
    for name, res in per_iter.items():
        a, b = reference[name], actual[name]
        stats = {"max_abs": float(res.max_absdiff), "mean_abs": float(res.mean_absdiff),
                 "median_abs": float(res.median_absdiff), "p99_abs": float(res.quantile_absdiff),
                 "max_rel": float(res.max_reldiff), "mean_rel": float(res.mean_reldiff),
                 "median_rel": float(res.median_reldiff),
                 "p99_rel": float(res.quantile_reldiff), "cosine": cosine(a, b),
                 "snr_db": snr_db(a, b)}
        if task == "classification":
            stats["top1_agreement"] = float((top1(a) == top1(b)).mean())
            stats["top5_agreement"] = top5_agreement(a, b)
        stats["abs_error_hist"] = error_histogram(a, b)
        outputs[name] = stats
    return outputs, failures


def _evaluation(job, s: Settings, eval_ref: dict) -> dict:
    """The labelled evaluation data, checked (labels against the model's classes too)."""
    path = job.inputs["evaluation"]
    data = modelio.load_data(path, s.inputs, model=job.model, section="evaluation",
                             labels=s.labels, profile=s.profile, error_cls=AuditError)
    labels = data[s.labels]
    if not eval_ref or len(next(iter(eval_ref.values()))) != len(labels):
        raise AuditError("the export's reference holds no outputs for these evaluation data",
                         model=job.model, key=f"models.{job.model}.evaluation.path",
                         fix="re-run the export (it reads the evaluation data)")
    name, logits = next(iter(eval_ref.items()))
    modelio.check_labels(labels, int(np.prod(logits.shape[1:])), path=path, model=job.model,
                         name=s.labels, output=name, error_cls=AuditError)
    return data


def task_accuracy(outputs: dict, labels: np.ndarray, eval_ref: dict) -> dict:
    """Accuracy of the variant and of the PyTorch reference on labelled data."""
    acc = float((top1(np.asarray(next(iter(outputs.values())), np.float32)) == labels).mean())
    ref_acc = float((top1(next(iter(eval_ref.values()))) == labels).mean())
    return {"accuracy": acc, "reference_accuracy": ref_acc, "accuracy_drop": ref_acc - acc,
            "samples": len(labels)}


def verdict(metrics: dict, tol: Tolerance, task: str) -> tuple[bool, list[str]]:
    """Pass/fail against the precision's tolerances; lists every violated limit. A metric
    that is not finite, or no output compared at all, fails too. A limit whose metric an
    output lacks (top-1 of a regression) or that is unset (``max_abs: null``) is skipped."""
    failures = []
    if not metrics["outputs"]:
        failures.append("no output was compared")
    limits = [("snr_db", "snr", lambda v: v < tol.snr_min_db, f"< {tol.snr_min_db} dB", ".1f"),
              ("cosine", "cosine", lambda v: v < tol.cosine_min, f"< {tol.cosine_min}", ".6f")]
    if tol.max_abs is not None:
        limits.insert(0, ("max_abs", "max_abs", lambda v: v > tol.max_abs, f"> {tol.max_abs}",
                          ".3g"))
    if task == "classification":
        limits.append(("top1_agreement", "top1", lambda v: v < tol.top1_min,
                       f"< {tol.top1_min}", ".3f"))
    for name, s in metrics["outputs"].items():
        bad = [k for k, v in s.items() if isinstance(v, (int, float)) and not math.isfinite(v)]
        failures += [f"{name}: {k} is {s[k]} (not finite)" for k in bad]
        for key, label, violated, limit, spec in limits:
            if key in s and key not in bad and violated(s[key]):
                failures.append(f"{name}: {label} {format(s[key], spec)} {limit}")
    task_m = metrics.get("task")
    if task_m:
        drop = task_m["accuracy_drop"]
        if not math.isfinite(drop):
            failures.append(f"accuracy drop is {drop} (not finite)")
        elif drop > tol.accuracy_drop_max:
            failures.append(f"accuracy drop {drop:.4f} > {tol.accuracy_drop_max}")
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
    evaluation = _evaluation(job, s, eval_ref) if s.labels else None
    on_eval = " on the evaluation data"
    ref_failures = non_finite(ref_out, "reference (PyTorch)", ref_out)
    ref_failures += non_finite(eval_ref, "reference (PyTorch)", eval_ref, on_eval) if (
        evaluation) else []
    be = get_backend(s.backend)
    ok, why = be.runnable(base_precision(s.precision))

    def measure(make_runner) -> dict:
        produced = infer_all(make_runner(), feed, s.batch, job.model, engine)
        outputs, failures = compare(ref_out, produced, s.task)
        failures = ref_failures + non_finite(produced, "variant", ref_out) + failures
        metrics = {"outputs": outputs}
        if evaluation:
            eval_feed = {n: evaluation[n] for n in s.inputs}
            eval_out = infer_all(make_runner(), eval_feed, s.batch, job.model, engine)
            failures += non_finite(eval_out, "variant", eval_ref, on_eval)
            metrics["task"] = task_accuracy(eval_out, evaluation[s.labels], eval_ref)
        failures += verdict(metrics, s.tolerance, s.task)[1]
        return {"status": "fail" if failures else "pass", "failures": failures,
                "reason": "; ".join(failures) or None,
                "samples": len(next(iter(feed.values()))), **metrics}

    result: dict = {}
    if not ok:
        result = {"status": "not_runnable", "reason": f"not runnable on {s.backend}: {why}"}
    else:
        try:
            result = measure(lambda: _runner(be, engine))
        except NotRunnable as err:
            result = {"status": "not_runnable", "reason": f"not runnable on {s.backend}: {err}"}
            # The ONNX variant itself can still be audited by the ONNX spec's arithmetic.
            if engine.suffix == ".onnx" and onnx_reference.usable(engine):
                result["emulated"] = _emulate(job, measure, engine)
    return AuditResult(backend=s.backend, precision=s.precision,
                       tolerance=s.tolerance.model_dump(), **result,
                       time_s=round(time.perf_counter() - t0, 3))


def _emulate(job, measure, engine: Path) -> Measurement:
    """The emulated measurement, stopped at the model's ``time_limits.emulated_audit``."""
    limit = job.limits.get("emulated_audit", 300)
    try:
        with onnx_reference.time_limit(limit):
            return Measurement(**measure(lambda: onnx_reference.OnnxReferenceRunner(engine)))
    except NotRunnable as err:
        return Measurement(status="not_runnable", reason=str(err))
    except onnx_reference.Stopped:
        return Measurement(status="not_runnable", reason=(
            f"emulation stopped after {limit:g} s (models.{job.model}.time_limits."
            "emulated_audit): ONNX's reference evaluator is pure Python; raise the limit "
            "to measure it"))
