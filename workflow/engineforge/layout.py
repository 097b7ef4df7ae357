"""Every artifact path, in one place: the rules, summary, tracking and release use it.

``<root>/<model>/<stage>/...``. Arguments left out stay Snakemake wildcards
(``{model}``, ``{precision}``, ...), so the same call gives a rule's output
template or one concrete file. An engine's file name comes from its backend
(``Backend.artifact``).
"""

from __future__ import annotations

from dataclasses import dataclass

from engineforge.backends import backend_class
from engineforge.settings import base_precision

ALL_PROFILES = "all"  # the profile name of an engine holding every profile
# a model's report files that its MLflow parent run holds (stages/report.py writes them)
REPORT_FILES = ("drift_heatmap.png", "error_histograms.png", "latency.png", "report.html")


@dataclass(frozen=True)
class Layout:
    root: str = "artifacts"

    def model(self, model="{model}") -> str:
        return f"{self.root}/{model}"

    # export / simplify
    def export(self, name: str, model="{model}") -> str:
        """``model.onnx``, ``reference.npz`` or the sidecar ``export.json``."""
        return f"{self.root}/{model}/export/{name}"

    def simplify(self, name: str, model="{model}") -> str:
        return f"{self.root}/{model}/simplify/{name}"

    # precision
    def profile_check(self, model="{model}", profile="{profile}") -> str:
        """Sidecar of the check that runs a profile's shapes through the fp32 ONNX."""
        return f"{self.root}/{model}/export/profiles/{profile}.json"

    def precision(self, name: str, model="{model}", precision="{precision}") -> str:
        """``model.onnx`` or the sidecar ``precision.json``."""
        return f"{self.root}/{model}/precision/{precision}/{name}"

    def quantized(self, name: str, quantizer: str, model="{model}",
                  precision="{precision}") -> str:
        """A backend's own quantized graph beside ModelOpt's (``Backend.quantizers``):
        ``model.onnx`` or the sidecar ``precision.json``."""
        return f"{self.root}/{model}/precision/{precision}/{quantizer}/{name}"

    # build
    def build_dir(self, backend: str, model="{model}", precision="{precision}",
                  profile="{profile}") -> str:
        return f"{self.root}/{model}/build/{backend}/{precision}/{profile}"

    def engine(self, backend: str, model="{model}", precision="{precision}",
               profile="{profile}") -> str:
        artifact = backend_class(backend).artifact
        return f"{self.build_dir(backend, model, precision, profile)}/{artifact}"

    def build(self, backend="{backend}", model="{model}", precision="{precision}",
              profile="{profile}") -> str:
        return f"{self.build_dir(backend, model, precision, profile)}/build.json"

    def timing_cache_dir(self) -> str:
        return f"{self.root}/_timing_cache"

    # audit / drift
    def audit(self, model="{model}", backend="{backend}", precision="{precision}") -> str:
        return f"{self.root}/{model}/audit/{backend}/{precision}.json"

    def localise(self, model="{model}", precision="{precision}") -> str:
        """Where a (failing) variant's drift enters: its localisation sidecar."""
        return f"{self.root}/{model}/audit/localise/{precision}.json"

    def drift(self, ext: str, model="{model}") -> str:
        return f"{self.root}/{model}/audit/drift.{ext}"

    def gate(self, name: str = "gate.json", model="{model}") -> str:
        """The baseline gate's report ``gate.json``; ``gate.ok``: its strict check passed."""
        return f"{self.root}/{model}/audit/{name}"

    # bench
    def bench(self, model="{model}", backend="{backend}", precision="{precision}",
              profile="{profile}") -> str:
        return f"{self.root}/{model}/bench/{backend}/{precision}/{profile}.json"

    def bench_work(self, model="{model}", backend="{backend}", precision="{precision}",
                   profile="{profile}") -> str:
        return f"{self.root}/{model}/bench/{backend}/{precision}/{profile}"

    def baseline(self, model="{model}", profile="{profile}") -> str:
        return f"{self.root}/{model}/bench/pytorch/{profile}.json"

    # report (per model: figures + page, logged to the model's MLflow run; then one page)
    def report(self, name: str, model="{model}") -> str:
        return f"{self.root}/{model}/report/{name}"

    def report_html(self) -> str:
        return f"{self.root}/report.html"

    # logs, tracking, summary
    def log(self, name: str, model="{model}") -> str:
        return f"{self.root}/{model}/logs/{name}.log"

    def track(self, model="{model}") -> str:
        return f"{self.root}/{model}/track.json"

    def summary(self, ext: str) -> str:
        return f"{self.root}/summary.{ext}"

    def failures_dir(self) -> str:
        return f"{self.root}/_failures"

    def pending_dir(self) -> str:
        return f"{self.root}/_tracking/pending"

    def model_outputs(self, model: str, precisions: list[str], builds: dict[str, list[str]],
                      profiles: list[str], gate: bool = False) -> dict:
        """Every per-model output the tracking record reads, by role.

        ``precisions``: the model's variants (``settings.variants``: repaired ones too);
        ``builds``: backend -> the profiles it builds (``all`` included where built);
        ``profiles``: the model's profile names (bench and baseline points); ``gate``: the
        model configures a baseline gate."""
        t = {"export": self.export("export.json", model),
             "simplify": self.simplify("simplify.json", model),
             "drift": self.drift("json", model), "drift_md": self.drift("md", model),
             "precision": {p: self.precision("precision.json", model, p) for p in precisions},
             "localise": {p: self.localise(model, p) for p in precisions if p != "fp32"},
             "audit": {}, "build": {}, "bench": {}, "engine": {},
             "baseline": {prof: self.baseline(model, prof) for prof in profiles},
             "report": {name: self.report(name, model) for name in REPORT_FILES}}
        if gate:
            t["gate"] = self.gate("gate.json", model)
        for b, build_profiles in builds.items():
            for p in precisions:  # the backend's own quantizer's graphs (repaired ones too)
                if q := backend_class(b).quantizer(p):
                    t["precision"][f"{p}/{q}"] = self.quantized("precision.json", q, model, p)
            for p in [p for p in precisions
                      if base_precision(p) in backend_class(b).precisions]:
                t["audit"][(b, p)] = self.audit(model, b, p)
                for prof in build_profiles:
                    t["build"][(b, p, prof)] = self.build(b, model, p, prof)
                    t["engine"][(b, p, prof)] = self.engine(b, model, p, prof)
                    if prof != ALL_PROFILES:
                        t["bench"][(b, p, prof)] = self.bench(model, b, p, prof)
        return t


def files_of(targets) -> list[str]:
    """Every path in a (nested) ``model_outputs`` dict."""
    if isinstance(targets, dict):
        return [f for v in targets.values() for f in files_of(v)]
    return [targets]
