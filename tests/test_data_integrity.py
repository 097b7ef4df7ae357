"""Bad calibration / evaluation data is refused before any work, in one line.

``modelio.load_data`` is the one checking reader; the first stage that reads the data
raises its own error with the config key and a fix: the export (evaluation, else
calibration, for the reference), the precision stage (calibration for int8/fp8) and the
audit (evaluation; labels against the model's classes, known once outputs exist)."""

from __future__ import annotations

import pickle
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_stage, tiny_raw_config
from engineforge import config, modelio
from engineforge.backends import onnx_reference
from engineforge.errors import AuditError, ExportError, PrecisionError
from engineforge.runner import StageFailed

INPUTS = {"x": {"dtype": "float32", "shape": ["batch", 3, 8, 8]}}
GOOD = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
LABELS = np.array([0, 1, 2, 3])


@pytest.fixture(autouse=True)
def _no_mlflow_cache(monkeypatch):
    monkeypatch.setenv("ENGINEFORGE_CACHE", "0")


def _nan(a):
    a = a.copy()
    a[1, 0, 0, 0] = np.nan
    a[2, 0, 2, 3] = np.nan
    return a


def _inf(a):
    a = a.copy()
    a[0, 0, 0, 0] = -np.inf
    return a


def _truncated(path: Path) -> None:
    np.savez(path, x=GOOD)
    path.write_bytes(path.read_bytes()[:200])


BAD_FILES = {  # name: (writer, message fragment)
    "truncated zip": (_truncated, "cannot be read as .npz"),
    "random bytes": (lambda p: p.write_bytes(bytes(range(256)) * 4), "cannot be read as .npz"),
    "a .npy array": (lambda p: np.save(p.open("wb"), GOOD), "single .npy array, not an .npz"),
    "a pickle": (lambda p: p.write_bytes(pickle.dumps({"x": GOOD})), "cannot be read as .npz"),
    "object array": (lambda p: np.savez(p, x=np.array([GOOD, "a"], dtype=object)),
                     "array 'x' cannot be read"),
    "no arrays": (lambda p: np.savez(p), "holds no arrays"),
    "missing input": (lambda p: np.savez(p, image=GOOD), "has no array 'x' (it has ['image'])"),
    "no samples": (lambda p: np.savez(p, x=GOOD[:0]), "array 'x' holds no values"),
    "NaN": (lambda p: np.savez(p, x=_nan(GOOD)), "holds 2 NaN and 0 Inf of 768 values"),
    "Inf": (lambda p: np.savez(p, x=_inf(GOOD)), "holds 0 NaN and 1 Inf of 768 values"),
    "wrong rank": (lambda p: np.savez(p, x=GOOD[0]), "rank 3, but input 'x' has rank 4"),
    "wrong static dim": (lambda p: np.savez(p, x=GOOD[:, :1]), "dim 1 must be 3"),
    "strings": (lambda p: np.savez(p, x=np.array(["a", "b"])), "not numbers"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_file_is_one_line_naming_key_and_fix(tmp_path, case):
    # setup
    write, fragment = BAD_FILES[case]
    path = tmp_path / "data.npz"
    write(path)
    # execute
    with pytest.raises(PrecisionError) as info:
        modelio.load_data(path, INPUTS, model="m", section="calibration",
                          error_cls=PrecisionError)
    # assert
    text = str(info.value)
    assert fragment in text
    assert text.startswith(f"[model=m stage=precision key=models.m.calibration.path] "
                           f"calibration data '{path}' ")
    assert "\n" not in text and " Fix: " in text
    assert info.value.__suppress_context__  # no chained library traceback


def test_good_data_loads_cast_to_the_input_dtypes(tmp_path):
    # setup: float64 on disk, a second input of int64 token ids, labels
    inputs = INPUTS | {"ids": {"dtype": "int64", "shape": ["batch", 5]}}
    np.savez(tmp_path / "d.npz", x=GOOD.astype(np.float64), ids=np.ones((4, 5), np.int32),
             labels=LABELS, other=np.array(["ignored"]))
    # execute
    data = modelio.load_data(tmp_path / "d.npz", inputs, model="m", section="evaluation",
                             labels="labels", error_cls=ExportError)
    # assert
    assert set(data) == {"x", "ids", "labels"}
    assert data["x"].dtype == np.float32 and data["ids"].dtype == np.int64
    np.testing.assert_array_equal(data["labels"], LABELS)


def test_data_outside_the_profile_is_refused_where_engines_run_it(tmp_path):
    # setup: 8x8 images for a model of dynamic size, a profile of 16..32
    inputs = {"img": {"shape": ["batch", 1, "h", "w"]}}
    profile = {"img": {"min": [1, 1, 16, 16], "opt": [1, 1, 16, 16], "max": [2, 1, 32, 32]}}
    np.savez(tmp_path / "d.npz", img=np.zeros((2, 1, 8, 8), np.float32))
    # control: without a profile (calibration on ONNX Runtime's CPU) the size is free
    modelio.load_data(tmp_path / "d.npz", inputs, model="m", section="evaluation")
    # execute / assert
    with pytest.raises(AuditError, match=r"dim 2 \(h\) is outside the first profile's "
                                         r"16..32") as info:
        modelio.load_data(tmp_path / "d.npz", inputs, model="m", section="evaluation",
                          profile=profile, error_cls=AuditError)
    assert info.value.key == "models.m.evaluation.path" and "profiles" in info.value.fix


def test_inputs_with_different_sample_counts_are_refused(tmp_path):
    inputs = INPUTS | {"ids": {"dtype": "int64", "shape": ["batch", 5]}}
    np.savez(tmp_path / "d.npz", x=GOOD, ids=np.ones((3, 5), np.int64))
    with pytest.raises(ExportError, match=r"different sample counts per input \(\{'x': 4, "
                                          r"'ids': 3\}\)"):
        modelio.load_data(tmp_path / "d.npz", inputs, model="m", section="calibration",
                          error_cls=ExportError)


BAD_LABELS = {
    "missing": (None, "has no labels array 'labels' (it has ['x'])"),
    "float": (LABELS.astype(np.float32), "must be 1-D integers (class indices); found float32"),
    "2-D": (LABELS[:, None], "found int64 of shape [4, 1]"),
    "count": (LABELS[:3], "has 3 labels 'labels' for 4 samples"),
    "negative": (np.array([0, -1, 2, 3]), "hold negative class indices (min -1)"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_bad_labels_are_one_line_naming_the_labels_key(tmp_path, case):
    # setup
    labels, fragment = BAD_LABELS[case]
    np.savez(tmp_path / "e.npz", x=GOOD, **({} if labels is None else {"labels": labels}))
    # execute
    with pytest.raises(ExportError) as info:
        modelio.load_data(tmp_path / "e.npz", INPUTS, model="m", section="evaluation",
                          labels="labels", error_cls=ExportError)
    # assert
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert info.value.key == ("models.m.evaluation.labels")


def test_labels_beyond_the_classes_are_refused():
    modelio.check_labels(LABELS, 4, path="e.npz", model="m", name="labels", output="y",
                         error_cls=AuditError)  # control: classes 0..3 fit 4 outputs
    with pytest.raises(AuditError, match="labels 'labels' go up to 3, but output 'y' has 3 "
                                         "classes") as info:
        modelio.check_labels(LABELS, 3, path="e.npz", model="m", name="labels", output="y",
                             error_cls=AuditError)
    assert info.value.key == "models.m.evaluation.labels"
    assert "0..2" in info.value.fix


# --- the stages refuse the data before any work


def _models(root: Path) -> dict:
    return config.resolve(tiny_raw_config(precisions=("fp32", "int8")), root)["models"]


def _export(models: dict, model: str, root: Path, out: str = "e") -> dict:
    m = models[model]
    data = {s: m[s]["path"] for s in ("evaluation", "calibration") if s in m}
    return run_stage("export", models, model, {"arch_source": "tinynets.py", **data,
                                               **({"checkpoint": m["checkpoint"]["path"]}
                                                  if m["checkpoint"].get("path") else {})},
                     {"onnx": root / out / "model.onnx",
                      "reference": root / out / "reference.npz",
                      "sidecar": root / out / "export.json"}, root)


def _assert_refused(failed, root: Path, out: str, line_start: str, fragment: str) -> None:
    """One line, our format, nothing published or half-written left in ``out``."""
    text = str(failed.value)
    assert text.startswith(line_start) and fragment in text, text
    assert "\n" not in text and " Fix: " in text and "unexpected" not in text
    d = root / out
    assert not d.exists() or not [p.name for p in d.iterdir()], list(d.iterdir())


DATA_FAULTS = {
    "NaN": (lambda a: _nan(a), "holds 2 NaN and 0 Inf of"),
    "Inf": (lambda a: _inf(a), "holds 0 NaN and 1 Inf of"),
    "empty": (lambda a: a[:0], "holds no values"),
}


@pytest.mark.parametrize("fault", list(DATA_FAULTS))
def test_export_refuses_bad_calibration_data(tiny_workspace, fault):
    # setup: tinyfcn draws its reference from calibration data
    models = _models(tiny_workspace)
    _export(models, "tinyfcn", tiny_workspace, "ok")  # control: the good data exports
    spoil, fragment = DATA_FAULTS[fault]
    good = np.load(tiny_workspace / "calib_fcn.npz")["img"]
    np.savez(tiny_workspace / "calib_fcn.npz", img=spoil(good))
    # execute
    with pytest.raises(StageFailed) as failed:
        _export(models, "tinyfcn", tiny_workspace)
    # assert
    _assert_refused(failed, tiny_workspace, "e", "[model=tinyfcn stage=export key=models."
                    "tinyfcn.calibration.path] calibration data 'calib_fcn.npz' array 'img' ",
                    fragment)


@pytest.mark.parametrize("case, fragment, key", [
    ("missing labels", "has no labels array 'labels'", "evaluation.labels"),
    ("labels count", "has 31 labels 'labels' for 32 samples", "evaluation.labels"),
    ("missing input", "has no array 'x' (it has ['image', 'labels'])", "evaluation.path"),
    ("NaN", "array 'x' holds 2 NaN", "evaluation.path")])
def test_export_refuses_bad_evaluation_data(tiny_workspace, case, fragment, key):
    # setup: tinycls draws its reference (and the labelled outputs) from evaluation data
    models = _models(tiny_workspace)
    data = dict(np.load(tiny_workspace / "eval.npz"))
    if case == "missing labels":
        del data["labels"]
    elif case == "labels count":
        data["labels"] = data["labels"][:31]
    elif case == "missing input":
        data["image"] = data.pop("x")
    else:
        data["x"] = _nan(data["x"])
    np.savez(tiny_workspace / "eval.npz", **data)
    # execute
    with pytest.raises(StageFailed) as failed:
        _export(models, "tinycls", tiny_workspace)
    # assert
    _assert_refused(failed, tiny_workspace, "e", f"[model=tinycls stage=export key=models."
                    f"tinycls.{key}] evaluation data 'eval.npz' ", fragment)


@pytest.fixture(scope="module")
def _fcn_onnx(tmp_path_factory) -> Path:
    """tinyfcn's ONNX, exported once per module."""
    from conftest import write_tiny_workspace

    root = tmp_path_factory.mktemp("fcn")
    write_tiny_workspace(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("ENGINEFORGE_CACHE", "0")
        _export(_models(root), "tinyfcn", root)
    return root / "e/model.onnx"


@pytest.mark.parametrize("fault", [*DATA_FAULTS, "missing input"])
def test_precision_refuses_bad_calibration_data(tiny_workspace, _fcn_onnx, fault):
    # setup
    models = _models(tiny_workspace)
    shutil.copy(_fcn_onnx, tiny_workspace / "model.onnx")

    def quantize(out: str) -> dict:
        return run_stage("precision", models, "tinyfcn",
                         {"onnx": tiny_workspace / "model.onnx",
                          "calibration": "calib_fcn.npz"},
                         {"onnx": tiny_workspace / out / "model.onnx",
                          "sidecar": tiny_workspace / out / "precision.json"},
                         tiny_workspace, precision="int8")

    # control: the good data calibrates
    assert quantize("ok")["result"]["extra"]["calibration_samples"] == 8
    good = np.load(tiny_workspace / "calib_fcn.npz")["img"]
    if fault == "missing input":
        np.savez(tiny_workspace / "calib_fcn.npz", image=good)
        fragment = "has no array 'img' (it has ['image'])"
    else:
        spoil, fragment = DATA_FAULTS[fault]
        np.savez(tiny_workspace / "calib_fcn.npz", img=spoil(good))
    # execute
    with pytest.raises(StageFailed) as failed:
        quantize("p")
    # assert
    _assert_refused(failed, tiny_workspace, "p", "[model=tinyfcn stage=precision key=models."
                    "tinyfcn.calibration.path] calibration data 'calib_fcn.npz' ", fragment)


@pytest.mark.parametrize("case, fragment", [
    ("out of range", "labels 'labels' go up to 9, but output "),
    ("missing labels", "has no labels array 'labels'"),
    ("labels count", "has 16 labels 'labels' for 32 samples")])
def test_audit_refuses_bad_evaluation_data(tiny_workspace, case, fragment):
    # setup: a good export and engine, then the evaluation data the audit reads goes bad
    models = _models(tiny_workspace)
    _export(models, "tinycls", tiny_workspace)
    run_stage("build", models, "tinycls", {"onnx": tiny_workspace / "e/model.onnx"},
              {"engine": tiny_workspace / "b/engine.onnx",
               "sidecar": tiny_workspace / "b/build.json"}, tiny_workspace,
              backend="onnxruntime", precision="fp32", profile="b1-8")

    def audit() -> dict:
        return run_stage("audit", models, "tinycls",
                         {"engine": tiny_workspace / "b/engine.onnx",
                          "reference": tiny_workspace / "e/reference.npz",
                          "evaluation": "eval.npz"},
                         {"sidecar": tiny_workspace / "a/fp32.json"}, tiny_workspace,
                         backend="onnxruntime", precision="fp32")

    assert audit()["result"]["status"] == "pass"  # control: the good data audits
    (tiny_workspace / "a/fp32.json").unlink()
    data = dict(np.load(tiny_workspace / "eval.npz"))
    if case == "out of range":
        data["labels"] = np.arange(32) % 10  # 10 classes; the model has 5
    elif case == "missing labels":
        del data["labels"]
    else:
        data["labels"] = data["labels"][:16]
    np.savez(tiny_workspace / "eval.npz", **data)
    # execute
    with pytest.raises(StageFailed) as failed:
        audit()
    # assert
    _assert_refused(failed, tiny_workspace, "a", "[model=tinycls stage=audit key=models."
                    "tinycls.evaluation.labels] evaluation data ", fragment)


# --- the emulated audit's time limit, in the main thread (SIGALRM) and in another thread


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _limited(limit: float, work: float) -> bool:
    """True when ``work`` seconds of pure Python were stopped at ``limit``."""
    try:
        with onnx_reference.time_limit(limit):
            _busy(work)
    except onnx_reference.Stopped:
        return True
    return False


# Wall-clock bounds with room for a loaded machine: the stopped work would run 30 s and is
# stopped at 0.1 s (taking < 10 s shows the stop, not the work's end); the control's
# 10 ms of work gets a 1 s limit (a 0.3 s one failed when the machine stalled the thread);
# the wait after it, past that limit, shows no timer is left to fire.
STOPPED_WORK_S, CONTROL_LIMIT_S = 30.0, 1.0


def test_time_limit_stops_pure_python_and_clears_its_timer():
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    assert _limited(0.1, STOPPED_WORK_S) and time.monotonic() - t0 < 10
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before
    # control: work within the limit ends normally, and nothing fires after the block
    assert not _limited(CONTROL_LIMIT_S, 0.01)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before
    time.sleep(CONTROL_LIMIT_S + 0.3)  # a live timer would interrupt this sleep


def test_time_limit_works_outside_the_main_thread():
    results = {}

    def job():
        results["stopped"] = _limited(0.1, STOPPED_WORK_S)
        results["control"] = _limited(CONTROL_LIMIT_S, 0.01)
        time.sleep(CONTROL_LIMIT_S + 0.3)  # a late timer's exception is raised after this
        results["late"] = False

    t = threading.Thread(target=job)
    t0 = time.monotonic()
    t.start()
    t.join(60)
    assert results == {"stopped": True, "control": False, "late": False}
    assert time.monotonic() - t0 < 10 + CONTROL_LIMIT_S + 0.3
