"""torch-inductor backend on CPU: the export keeps its torch.export program, AOTInductor
packages build (fp32, fp16) and load in a child process, the audit passes against the
PyTorch reference, the bench writes points, a package that cannot load falls back to
torch.compile with the cause recorded, and the workflow runs it beside onnxruntime.

Nothing is mocked: the packages are compiled by AOTInductor (C++ on the CPU, seconds each);
the failing package is a real package truncated on disk. A GPU (CUDA graphs, the H100's
segfault) is not exercised here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_stage, tiny_raw_config, write_tiny_workspace
from engineforge import config
from engineforge.backends import get_backend
from engineforge.backends import torch_inductor as ti
from engineforge.layout import Layout
from engineforge.results import AuditResult, BenchResult, BuildResult, ExportResult
from workflow_helpers import snakemake, write_config

# compiles AOTInductor packages (C++) and runs torch.compile in children: minutes
pytestmark = pytest.mark.slow

MODEL, PROFILE, BACKEND = "tinycls", "b1-8", "torch-inductor"


@pytest.fixture(autouse=True)
def _no_mlflow_cache(monkeypatch):
    monkeypatch.setenv("ENGINEFORGE_CACHE", "0")


def _models(root: Path) -> dict:
    raw = tiny_raw_config(precisions=("fp32", "fp16"), backends=("onnxruntime", BACKEND))
    del raw["models"]["tinyfcn"]
    return config.resolve(raw, root)["models"]


def _export(models: dict, root: Path) -> dict:
    L, m = Layout(str(root / "artifacts")), models[MODEL]
    return run_stage("export", models, MODEL,
                     {"checkpoint": root / m["checkpoint"]["path"],
                      "evaluation": root / m["evaluation"]["path"]},
                     {"onnx": L.export("model.onnx", MODEL),
                      "reference": L.export("reference.npz", MODEL),
                      "program": L.export("model.pt2", MODEL),
                      "sidecar": L.export("export.json", MODEL)}, root)


def _build(models: dict, root: Path, precision: str) -> dict:
    L = Layout(str(root / "artifacts"))
    return run_stage("build", models, MODEL, {"program": L.export("model.pt2", MODEL)},
                     {"engine": L.engine(BACKEND, MODEL, precision, PROFILE),
                      "sidecar": L.build(BACKEND, MODEL, precision, PROFILE)}, root,
                     backend=BACKEND, precision=precision, profile=PROFILE)


def _audit(models: dict, root: Path, precision: str) -> AuditResult:
    L = Layout(str(root / "artifacts"))
    side = run_stage("audit", models, MODEL,
                     {"engine": L.engine(BACKEND, MODEL, precision, PROFILE),
                      "reference": L.export("reference.npz", MODEL),
                      "evaluation": root / "eval.npz"},
                     {"sidecar": L.audit(MODEL, BACKEND, precision)}, root,
                     backend=BACKEND, precision=precision)
    return AuditResult.model_validate(side["result"])


def _bench(models: dict, root: Path, precision: str) -> BenchResult:
    L = Layout(str(root / "artifacts"))
    side = run_stage("bench", models, MODEL,
                     {"engine": L.engine(BACKEND, MODEL, precision, PROFILE),
                      "build": L.build(BACKEND, MODEL, precision, PROFILE)},
                     {"sidecar": L.bench(MODEL, BACKEND, precision, PROFILE)}, root,
                     backend=BACKEND, precision=precision, profile=PROFILE)
    return BenchResult.model_validate(side["result"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One export and the fp32 and fp16 packages of the tiny classifier (shared: each
    package is a C++ compile)."""
    root = tmp_path_factory.mktemp("inductor")
    write_tiny_workspace(root)
    models = _models(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("ENGINEFORGE_CACHE", "0")
        export = _export(models, root)
        builds = {p: _build(models, root, p) for p in ("fp32", "fp16")}
    return root, models, export, builds


def test_export_keeps_the_torch_export_program(built):
    # setup: the shared export
    root, models, export, _ = built
    L = Layout(str(root / "artifacts"))
    # execute: load the kept program and run it on the reference inputs
    program = torch.export.load(L.export("model.pt2", MODEL))
    ref = np.load(L.export("reference.npz", MODEL))
    out = program.module()(torch.from_numpy(ref["in:x"])).detach().numpy()
    # assert: it is the model the reference came from, with its I/O facts beside it
    assert ExportResult.model_validate(export["result"]).program == \
        "torch.export (dynamo exporter)"
    (name,) = [k[4:] for k in ref.files if k.startswith("out:")]
    np.testing.assert_allclose(out, ref[f"out:{name}"], atol=1e-5)
    io = ti.read_io(Path(L.export("model.pt2", MODEL)))
    assert io["inputs"] == ["x"] and io["outputs"] == [name]
    assert io["dims"] == {"x": {0: "batch"}} and io["dtypes"] == {"x": "float32"}


def test_builds_fp32_and_fp16_packages_that_load_in_a_child(built):
    # setup: the shared builds
    root, _, _, builds = built
    L = Layout(str(root / "artifacts"))
    for precision, side in builds.items():
        r = BuildResult.model_validate(side["result"])
        # assert: an AOTInductor package with the profile's batch range, loaded by a child
        assert (r.status, r.backend, r.precision) == ("ok", BACKEND, precision)
        assert r.extra["runtime"] == "aotinductor" and r.extra["fallback_reason"] is None
        assert r.extra["dtype"] == ti.DTYPES[precision] and r.extra["device"] == "cpu"
        assert list(r.extra["dynamic_dims"].values()) == [[1, 8]]
        assert r.extra["cudnn_fusion"] is None  # cuDNN's fused kernels: GPU only
        engine = Path(L.engine(BACKEND, MODEL, precision, PROFILE))
        assert zipfile.is_zipfile(engine) and r.engine_bytes == engine.stat().st_size > 0
    # the build probed batch 1 in a child; the same package also runs batch 8 (dynamic)
    assert ti.probe(engine, {"x": [8, 3, 8, 8]}, {"x": "float32"}, "cpu") is None


def test_audit_passes_against_the_pytorch_reference(built, monkeypatch):
    # setup
    root, models, _, _ = built
    monkeypatch.chdir(root)
    for precision in ("fp32", "fp16"):
        # execute
        a = _audit(models, root, precision)
        # assert: within the precision's tolerances, and fp16 really computed in fp16
        assert a.status == "pass", a.reason
        (drift,) = a.outputs.values()
        assert drift.cosine > 0.999 and a.task and a.task.accuracy_drop <= 0.01
        if precision == "fp32":
            assert drift.max_abs < 1e-4
        else:
            assert 1e-5 < drift.max_abs < 5e-2


def test_bench_writes_points_with_the_runtime(built, monkeypatch):
    # setup
    root, models, _, _ = built
    monkeypatch.chdir(root)
    # execute
    r = _bench(models, root, "fp32")
    # assert: every profile point timed, by the AOTInductor package, CUDA graphs n/a on CPU
    assert r.status == "ok" and set(r.points) == {"min", "opt", "max"}
    assert {k: p.batch for k, p in r.points.items()} == {"min": 1, "opt": 4, "max": 8}
    for p in r.points.values():
        assert 0 < p.min_ms <= p.p50_ms <= p.p99_ms and np.isfinite(p.cv)
        assert p.extra["runtime"] == "aotinductor" and p.extra["cuda_graphs"] == "n/a (cpu)"
        assert p.extra["fallback_reason"] is None and p.extra["note"] is None


def test_a_package_that_cannot_load_falls_back_to_torch_compile(built, tmp_path, monkeypatch):
    # setup: a copy of the export and fp32 build, with the package truncated (a real fault)
    src_root, models, _, _ = built
    shutil.copytree(src_root / "artifacts", tmp_path / "artifacts")
    for f in ("eval.npz", "tinycls.pt", "tinynets.py"):
        shutil.copy(src_root / f, tmp_path / f)
    monkeypatch.chdir(tmp_path)
    engine = Path(Layout(str(tmp_path / "artifacts")).engine(BACKEND, MODEL, "fp32", PROFILE))
    data = engine.read_bytes()
    engine.write_bytes(data[: len(data) // 2])
    # execute: the audit and bench of the broken package
    a = _audit(models, tmp_path, "fp32")
    r = _bench(models, tmp_path, "fp32")
    # assert: both ran through torch.compile, correct, and say why
    assert a.status == "pass", a.reason
    assert r.status == "ok" and set(r.points) == {"min", "opt", "max"}
    for p in r.points.values():
        assert p.extra["runtime"] == "torch.compile"
        assert "aoti_load_package failed in the child process" in p.extra["fallback_reason"]
        assert p.extra["fallback_reason"] in p.extra["note"]
    # and the summary carries the note on the backend's row
    from engineforge.stages import summary

    s = summary.Settings(models={MODEL: {"precisions": ["fp32"], "backends": [BACKEND],
                                         "profile": PROFILE}}, skipped_backends={})
    md = summary.markdown(summary.collect(Layout(str(tmp_path / "artifacts")), s))
    assert f"| {BACKEND} [1] |" in md and "ran torch.compile instead" in md
    # and the MLflow record tags the engine's run with it
    from engineforge.stages import track

    def note_tag(root: Path):
        outs = Layout(str(root / "artifacts")).model_outputs(MODEL, ["fp32"],
                                                             {BACKEND: [PROFILE]}, [PROFILE])
        (child,) = track.build_record(MODEL, models[MODEL], "e", outs)["children"]
        return child["tags"].get("engineforge.note")

    assert "ran torch.compile instead" in note_tag(tmp_path)
    # positive control: the intact package's summary row and record have no note
    md_ok = summary.markdown(summary.collect(Layout(str(src_root / "artifacts")), s))
    assert f"| {BACKEND} |" in md_ok and "torch.compile" not in md_ok
    assert note_tag(src_root) is None


def test_the_builds_probe_is_reused_only_for_the_same_package(built, tmp_path):
    """The audit and bench take the build's probe of the package from build.json (no child
    process) when the package's content hash matches; a changed package is probed again."""
    # setup: a copy of the fp32 build whose sidecar records a (made-up) load failure
    src_root, _, _, _ = built
    shutil.copytree(src_root / "artifacts", tmp_path / "artifacts")
    engine = Path(Layout(str(tmp_path / "artifacts")).engine(BACKEND, MODEL, "fp32", PROFILE))
    side = json.loads(engine.with_name("build.json").read_text())
    side["result"]["extra"]["fallback_reason"] = "recorded by the build"
    engine.with_name("build.json").write_text(json.dumps(side))
    shapes, dtypes = {"x": [2, 3, 8, 8]}, {"x": "float32"}
    # execute + assert: same package -> the record; another device -> probed for real
    assert ti.probe(engine, shapes, dtypes, "cpu") == "recorded by the build"
    assert ti.built_here(engine, "cuda") is None
    # a package that changed since its build: probed for real (it loads: None)
    engine.write_bytes(engine.read_bytes() + b"\0")
    assert ti.built_here(engine, "cpu") is None
    assert ti.probe(engine, shapes, dtypes, "cpu") is None


LIBSTDCXX_SCOPE = """
import ctypes, sys
python_has_it = any("libstdc++" in ln for ln in open("/proc/self/maps"))
import torch  # brings libstdc++ in with libtorch, local to it
sys.path.insert(0, sys.argv[1])
from engineforge.backends.torch_inductor import share_libstdcxx
found = lambda: hasattr(ctypes.CDLL(None), "_ZNSt6locale7classicEv")  # std::locale::classic
before = found()
share_libstdcxx()
print(python_has_it, before, found())
"""


def test_libstdcxx_is_made_global_before_a_package_loads():
    """The H100 segfault's cause: a package's wrapper library does not link libstdc++ and
    the process's copy (loaded with libtorch) is not in the global scope. share_libstdcxx
    puts it there (what LD_PRELOAD did on the H100, where the load then worked)."""
    out = subprocess.run([sys.executable, "-c", LIBSTDCXX_SCOPE, str(ROOT / "workflow")],
                         capture_output=True, text=True, check=True).stdout.split()
    python_has_it, before, after = out[-3:]
    assert after == "True"
    if python_has_it == "False":  # python itself does not link libstdc++: torch's is local
        assert before == "False"


CRASH_C = """
#include <signal.h>
__attribute__((constructor)) static void crash(void) { raise(SIGSEGV); }
"""


def test_a_package_that_segfaults_on_load_does_not_take_the_process_down(built, tmp_path):
    """The H100 failure (aoti_load_package: exit -11) reproduced for real: the package's
    compiled model library is swapped for one that raises SIGSEGV when it is loaded."""
    # setup: a copy of the fp32 build whose wrapper .so segfaults in its constructor
    src_root, _, _, _ = built
    shutil.copytree(src_root / "artifacts", tmp_path / "artifacts")
    (tmp_path / "crash.c").write_text(CRASH_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "crash.so"),
                    str(tmp_path / "crash.c")], check=True)
    engine = Path(Layout(str(tmp_path / "artifacts")).engine(BACKEND, MODEL, "fp32", PROFILE))
    with zipfile.ZipFile(engine) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    (lib,) = [n for n in entries if n.endswith(".so")]
    entries[lib] = (tmp_path / "crash.so").read_bytes()
    with zipfile.ZipFile(engine, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    x = np.load(Layout(str(src_root / "artifacts")).export("reference.npz", MODEL))
    feed = torch.from_numpy(x["in:x"][:4])
    # execute: load it as the audit and bench do, in this process
    loaded = ti.load(engine, {"x": list(feed.shape)})
    with torch.inference_mode():
        (out,) = loaded.call(feed)
    # assert: the child crashed, this process lives on through torch.compile, correctly
    assert loaded.runtime == "torch.compile"
    assert "exit -11, SIGSEGV" in loaded.fallback_reason
    (name,) = [k for k in x.files if k.startswith("out:")]
    np.testing.assert_allclose(out.numpy(), x[name][:4], atol=1e-4)
    # and a new shape compiles with frozen weights (constants in the generated code)
    from torch._inductor.utils import run_and_get_code

    with torch.inference_mode():
        (out2,), code = run_and_get_code(loaded.call, torch.from_numpy(x["in:x"][:3]))
    assert "_frozen_param" in "\n".join(code)
    np.testing.assert_allclose(out2.numpy(), x[name][:3], atol=1e-4)


def test_no_program_is_a_result_not_a_crash(built, tmp_path):
    # setup: the export of an ONNX checkpoint keeps no program (an empty model.pt2)
    _, models, _, _ = built
    program = tmp_path / "artifacts" / MODEL / "export" / "model.pt2"
    program.parent.mkdir(parents=True)
    program.write_bytes(b"")
    # execute
    side = run_stage("build", models, MODEL, {"program": program},
                     {"engine": tmp_path / "artifacts" / MODEL / f"build/{BACKEND}/fp32/"
                                f"{PROFILE}/package.pt2",
                      "sidecar": tmp_path / "b.json"}, tmp_path,
                     backend=BACKEND, precision="fp32", profile=PROFILE)
    # assert
    r = BuildResult.model_validate(side["result"])
    assert r.status == "not_runnable" and "kept no torch.export program" in r.reason


class MaskedMean(torch.nn.Module):
    """A text model's pooling: an int mask cast with ``.to(h.dtype)`` (traced as float32)."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)

    def forward(self, tokens, mask):
        h = self.emb(tokens)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cast_program_computes_in_its_precision_with_traced_float32_casts(tmp_path, precision):
    # setup: the exported program holds _to_copy(dtype=float32) for the mask
    torch.manual_seed(0)
    tokens, mask = torch.randint(0, 50, (2, 6)), torch.ones(2, 6, dtype=torch.int64)
    program = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(MaskedMean(), (tokens, mask)), program)
    # run
    module, _ = ti.cast_module(program, precision, "cpu")
    out = module(tokens, mask)
    # assert: no float32 left in the graph, fp32 out, close to the fp32 program
    nodes = list(module.inner.graph.nodes)
    assert not [n for n in nodes if torch.float32 in (*n.args, *n.kwargs.values())]
    dtype = getattr(torch, ti.DTYPES[precision])
    assert any(dtype in (*n.args, *n.kwargs.values()) for n in nodes)  # retyped, not dropped
    ref = torch.export.load(program).module()(tokens, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)


def test_a_dim_the_retrace_fixes_names_the_dim_and_the_profile_key(tmp_path, monkeypatch):
    """A GRU's time dim exports dynamic, but re-tracing the program for the engine fixes it:
    one line naming the dim, the profile key and the fix (not torch's 'Constraints violated')."""
    import shutil

    from engineforge.runner import StageFailed

    # setup
    write_tiny_workspace(tmp_path)
    shutil.copy(ROOT / "tests/fixtures/data_nets.py", tmp_path)
    monkeypatch.chdir(tmp_path)
    raw = tiny_raw_config(precisions=("fp32",), backends=(BACKEND,))
    raw["models"] = {MODEL: {
        "checkpoint": {"kind": "state_dict", "arch": "data_nets:SeqGRU", "seed": 0},
        "inputs": {"x": {"shape": ["batch", "time", 6]}},
        "profiles": {PROFILE: {"x": {"min": [1, 4, 6], "opt": [2, 8, 6], "max": [4, 8, 6]}}}}}
    models = config.resolve(raw, tmp_path)["models"]
    L = Layout(str(tmp_path / "artifacts"))
    run_stage("export", models, MODEL, {},
              {"onnx": L.export("model.onnx", MODEL), "program": L.export("model.pt2", MODEL),
               "reference": L.export("reference.npz", MODEL),
               "sidecar": L.export("export.json", MODEL)}, tmp_path)
    # run / assert
    with pytest.raises(StageFailed) as err:
        _build(models, tmp_path, "fp32")
    assert str(err.value).startswith(
        f"[model={MODEL} stage=build key=models.{MODEL}.profiles] torch-inductor fp32: "
        "torch.export fixes dim 'time' at 8 when it re-traces the program")
    assert "give 'time' one size in the profile" in str(err.value)
    assert "\n" not in str(err.value)


def test_backend_facts():
    be = get_backend(BACKEND)
    assert be.availability().ok and be.precisions == ("fp32", "fp16", "bf16")
    assert be.runnable("fp16") == (True, "")
    assert be.runnable("int8")[0] is False
    assert be.device() != "gpu:unknown"
    # the summary's note beside a CPU fp16 figure; none on a GPU or for bf16
    assert "not a speedup" in be.note("fp16", {"device": "cpu"})
    assert be.note("fp16", {"device": "cuda"}) is None
    assert be.note("bf16", {"device": "cpu"}) is None


@pytest.mark.e2e
def test_workflow_runs_it_beside_onnxruntime(tmp_path):
    # setup: the tiny classifier only, fp32, onnxruntime and torch-inductor
    write_tiny_workspace(tmp_path)
    raw = tiny_raw_config(precisions=("fp32",), backends=("onnxruntime", BACKEND))
    del raw["models"]["tinyfcn"]
    write_config(tmp_path, raw)
    # execute
    snakemake(tmp_path)
    # assert: both backends audited and benched in the summary
    L = Layout(str(tmp_path / "artifacts"))
    for backend in ("onnxruntime", BACKEND):
        a = AuditResult.model_validate(
            json.loads(Path(L.audit(MODEL, backend, "fp32")).read_text())
            ["result"])
        assert a.status == "pass", a.reason
    md = Path(L.summary("md")).read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith(f"| {MODEL} | fp32 | {BACKEND}")]
    assert len(rows) == 1 and "| pass |" in rows[0]
    bench = BenchResult.model_validate(
        json.loads(Path(L.bench(MODEL, BACKEND, "fp32", PROFILE)).read_text())
        ["result"])
    assert bench.points["opt"].extra["runtime"] == "aotinductor"
