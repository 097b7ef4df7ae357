# Config validation, the artifact layout, input functions and params.
# Nothing heavy is imported here (no torch, no ONNX Runtime, no binaries run):
# parsing the workflow must stay fast. Backends and stages come from their registries.
import functools
import os
import sys
import importlib.util
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
sys.path.insert(1, str(Path(workflow.basedir)))  # the shipped models/ package

from engineforge import backends as efbackends
from engineforge import config as efconfig
from engineforge import failures as effailures
from engineforge import integrity as efintegrity
from engineforge import mlflow_store as efmlflow
from engineforge import redaction as efredaction
from engineforge import resources as efresources
from engineforge import runlock as efrunlock
from engineforge import runner as efrunner
from engineforge import settings as efsettings
from engineforge import signing as efsigning
from engineforge import worker as efworker
from engineforge.errors import EngineforgeError
from engineforge.job import Canonical
from engineforge.layout import ALL_PROFILES, Layout, files_of
from engineforge.stages import build as efbuild
from engineforge.stages import export as efexport
from engineforge import versions as efversions
from engineforge.versions import tool_versions

efrunner.quiet_stage_failures()  # a failed job prints our one line, not rule-file frames
# A cluster executor runs each job as its own process: that is the job's isolation.
efworker.JOB_PROCESS = workflow.remote_exec or workflow.subprocess_exec

try:
    # no --configfile: the demo zoo's config.yaml (--configfile replaces it)
    if not workflow.overwrite_configfiles:
        config.update(efconfig.deep_merge(efconfig.read("config.yaml"), config))
    EF = efconfig.resolve(config, Path("."))
    efsigning.configure(EF["trust"])  # cache restores and uploads of this process
    efversions.overrides()  # a malformed ENGINEFORGE_TOOL_VERSIONS: one line, here
    if not efworker.JOB_PROCESS:
        efconfig.check_artifacts(EF["artifacts"])
except EngineforgeError as err:
    efrunner.fail_fast(err)

if not efworker.JOB_PROCESS:
    efrunlock.remove_stale_locks()  # left by a run that was killed

MODELS = EF["models"]
A = EF["artifacts"]
L = Layout(A)


def storage_local(path):
    """Where a job finds ``path`` (a relative workflow path): itself, or Snakemake's local
    copy of it under a default storage provider (`--default-storage-provider s3`)."""
    provider = workflow.storage_registry.default_storage_provider
    if provider is None:
        return path
    prefix = workflow.storage_settings.default_storage_prefix.rstrip("/")
    return str(provider.object(f"{prefix}/{os.path.normpath(path)}").local_path())


A_INPUTS = storage_local(A)  # the track, summary and report stages read siblings here
# Outputs that disagree with their sidecar are rebuilt; not while another run publishes.
if not efworker.JOB_PROCESS and not efrunlock.busy_line():
    efintegrity.at_parse(A)
# Availability of every backend a model asks for (package metadata / cached probes only).
AVAILABLE = {
    b: efbackends.get_backend(b).availability()
    for b in sorted({b for m in MODELS.values() for b in m["backends"]})
}


wildcard_constraints:
    model="|".join(MODELS) or "^$",
    precision="|".join(efsettings.VARIANTS),
    backend="|".join(efbackends.names()),
    profile="[A-Za-z0-9][A-Za-z0-9_-]*",


def run_stage(stage, wildcards, input, output, params, log):
    model = dict(wildcards.items()).get("model")
    limits = MODELS[model]["time_limits"] if model in MODELS else {}
    efrunner.run_rule(stage, wildcards, input, output, params, log, A, limits, A_INPUTS)


def settings_param(stage, **fixed):
    """The stage's typed config slice: the params value, the slice the stage sees and the
    slice in the fingerprint are this one object (editing it reruns only its jobs).
    ``fixed``: values a rule holds in its paths instead of wildcards (a build's backend).
    """
    stage_settings = efrunner.stage_module(stage).settings
    return lambda w: Canonical(stage_settings(MODELS[w.model], dict(w.items()) | fixed))


PROFILE_PARTITION = efresources.profile_partition(workflow.resource_settings)


def job_resources(stage, backend=None):
    """The rule's resources (cores, memory, time, partition, GPU), one callable per key, from
    the model's typed settings (engineforge/resources.py): a rule never repeats numbers.
    ``backend``: fixed by the rule, else the job's ``backend`` wildcard."""

    def value(key):
        return lambda w: resources_of(
            w.get("model"), stage, backend or w.get("backend")
        )[key]

    return {key: value(key) for key in efresources.KEYS}


@functools.cache
def resources_of(model, stage, backend):
    """One job's resources, computed once for all its keys (and all jobs alike)."""
    return efresources.job_resources(
        MODELS.get(model), stage, backend, PROFILE_PARTITION
    )


def tools_param(stage, backend=None):
    """Tool versions as a params value; a backend's own version (e.g. the trtexec banner)
    counts too, so an upgrade reruns exactly its jobs."""

    def versions(w):
        backend_ = backend or w.get("backend")
        tools = tool_versions(stage, backend_)
        if backend_:
            tools[backend_] = str(AVAILABLE[backend_].version)
        return Canonical(tools)

    return versions


def checkpoint_input(w):
    """The checkpoint file and the project's model-definition source (editing either
    re-exports that model)."""
    m = MODELS[w.model]
    files = (
        {"checkpoint": m["checkpoint"]["path"]} if m["checkpoint"].get("path") else {}
    )
    arch = efexport.arch_source(m["checkpoint"], (Path("."), Path(workflow.basedir)))
    return files | ({"arch_source": arch} if arch else {})


def reference_data_input(w):
    """What the export draws its reference inputs from: the evaluation data (labelled: also
    the accuracy reference), else the calibration data. Only that one file is declared, so
    new calibration data re-exports nothing where evaluation data exists."""
    m = MODELS[w.model]
    section = "evaluation" if "evaluation" in m else "calibration"
    return {section: m[section]["path"]} if section in m else {}


def data_input(*sections):
    def files(w):
        m = MODELS[w.model]
        return {s: m[s]["path"] for s in sections if s in m}

    return files


def calibration_input(w):
    if efsettings.base_precision(w.precision) in efsettings.QUANTIZED:
        return {"calibration": MODELS[w.model]["calibration"]["path"]}
    return {}


def build_input(backend):
    """What a backend builds from: the precision's ONNX (its own quantizer's graph where it
    declares one, ``Backend.quantizers``), or (TensorRT 10 flags mode) the fp32 ONNX plus
    calibration; or the export's torch.export program for backends that build from PyTorch.
    """
    cls = efbackends.backend_class(backend)

    def files(w):
        m = MODELS[w.model]
        if cls.builds_from == "torch":
            return {"program": L.export("model.pt2", w.model)}
        q = cls.quantizer(w.precision)
        if q:  # <p>-repaired too: that quantizer's graph with the repair's exclusions
            return {"onnx": L.quantized("model.onnx", q, w.model, w.precision)}
        if not efbuild.flags_mode(m, backend):
            return {"onnx": L.precision("model.onnx", w.model, w.precision)}
        out = {"fp32": L.precision("model.onnx", w.model, "fp32")}
        if efsettings.base_precision(w.precision) == "int8":
            cache = m["tensorrt"].get("int8_calibration_cache")
            out |= {"calib_cache": cache} if cache else {}
            out |= (
                {"calibration": m["calibration"]["path"]} if "calibration" in m else {}
            )
        return out

    return files


def localise_audits(w):
    """The variant's audits by the backends that build from its ONNX (graph mode): the
    verdicts that decide whether it is localised (stages/localise.py)."""
    m, base = MODELS[w.model], efsettings.base_precision(w.precision)
    return [
        L.audit(w.model, b, w.precision)
        for b in usable_backends(w.model)
        if efbackends.backend_class(b).builds_from == "onnx"
        and not efbuild.flags_mode(m, b)
        and base in efbackends.backend_class(b).precisions
    ]


def repair_record_input(w):
    """A repaired variant's repair record (the sidecar naming the nodes it keeps)."""
    if efsettings.is_repaired(w.precision):
        return {"repair": L.precision("precision.json", w.model, w.precision)}
    return {}


def plain_of(path_of):
    """An input of a repaired variant's job: ``path_of(model, plain precision)``."""
    return lambda w: path_of(w.model, efsettings.base_precision(w.precision))


def profile_checks(w):
    """The checks that the engine's profile shapes run through the fp32 ONNX."""
    m = MODELS[w.model]
    names = list(m["profiles"]) if w.profile == ALL_PROFILES else [w.profile]
    return [L.profile_check(w.model, p) for p in names]


def engine_of(w, profile=None):
    return L.engine(w.backend, w.model, w.precision, profile or w.profile)


def first_profile(model):
    return next(iter(MODELS[model]["profiles"]))


def usable_backends(model):
    return [b for b in MODELS[model]["backends"] if AVAILABLE[b].ok]


def builds(model):
    """Usable backend -> the profiles it builds (``all``: one engine with every profile)."""
    m = MODELS[model]
    out = {}
    for b in usable_backends(model):
        multi = efbackends.backend_class(b).multi_profile
        extra = (
            [ALL_PROFILES] if multi and m["tensorrt"]["multi_profile_engine"] else []
        )
        out[b] = list(m["profiles"]) + extra
    return out


def model_outputs(model):
    m = MODELS[model]
    return L.model_outputs(
        model,
        efsettings.variants(m),
        builds(model),
        list(m["profiles"]),
        gate=bool(m["gate"]),
    )


def summary_inputs(model):
    """The sidecars the summary reads: all but engines and report files."""
    skip = ("engine", "report")
    return {k: v for k, v in model_outputs(model).items() if k not in skip}


def all_targets():
    strict = [
        L.gate("gate.ok", m) for m in MODELS if (MODELS[m]["gate"] or {}).get("strict")
    ]
    return [L.summary("md"), L.report_html()] + [L.track(m) for m in MODELS] + strict


def track_settings(model):
    """The track rule's settings (also those of a partial record after failures)."""
    stage = efrunner.stage_module("track")
    return stage.settings(
        MODELS[model], {"model": model}, EF["experiment"], builds(model)
    )


def report_settings(model=None):
    """The report's settings: one model's (its page and figures), or the whole page's."""
    stage = efrunner.stage_module("report")
    if model is None:
        return stage.Settings(models=list(MODELS))
    return stage.settings_of(track_settings(model))


def summary_settings():
    """The summary rule's settings (also those of the summary after failures)."""
    return efrunner.stage_module("summary").Settings(
        models={
            m: {
                "precisions": efsettings.variants(MODELS[m]),
                "backends": usable_backends(m),
                "profile": first_profile(m),
                "profiles": list(MODELS[m]["profiles"]),
                "gate": bool(MODELS[m]["gate"]),
            }
            for m in MODELS
        },
        skipped_backends={b: a.line(b) for b, a in AVAILABLE.items() if not a.ok},
    )


def start_workers():
    """Jobs are about to run: under Slurm, every partition named must exist (one line, not
    an sbatch error per job); the tracking store must take our credentials and have its
    bucket (mlflow_store.preflight); record the run as this directory's owner; failures of
    earlier runs are cleared (this run lists its own); warm the worker fork server (its
    own output: <artifacts>/logs/worker.log) in the background, and import the MLflow
    client (cache lookups, gate, tracking) now, in this thread: in-process jobs import it
    from their own threads, and two threads importing mlflow at once can hit Python's import
    deadlock detection (a gate job failed so: `_DeadlockError` on mlflow.protos, beside a
    background import). ~1.2 s, while the fork server starts."""
    if getattr(workflow.executor_plugin, "name", None) == "slurm":
        try:  # the executor is known only now; no job is submitted yet
            efresources.check_partitions(MODELS, PROFILE_PARTITION)
        except EngineforgeError as err:
            efrunner.fail_fast(err)
    try:  # credentials the store refuses, a missing bucket: one line before any job
        efmlflow.preflight()
    except EngineforgeError as err:
        efrunner.fail_fast(err)
    efrunlock.claim()
    effailures.clear_all(A)
    efredaction.install_log_redaction()  # no credential in any message of this process
    efmlflow.create_local_store()  # before jobs in other processes race to migrate it
    efworker.start(log_path=f"{A}/logs/worker.log")
    if importlib.util.find_spec("mlflow"):  # absent: each track job says so
        import mlflow.tracking  # noqa: F401 - imported once, here


def print_summary():
    efrunner.print_file(L.summary("md"))


def print_failures():
    """Jobs failed: report everything that succeeded (drift matrices, summary, MLflow
    records) and list each failure; Snakemake then exits non-zero."""
    effailures.finalise(A, summary_settings(), {m: track_settings(m) for m in MODELS})
