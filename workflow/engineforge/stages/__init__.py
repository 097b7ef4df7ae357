"""Stages: one module each, one line here.

A stage module defines ``Settings`` (its typed config slice), ``settings(m, w)`` (that
slice for one job, from the model's resolved config and the wildcards), ``TOOLS`` (the
distributions whose versions change its output), ``run(job) -> Result`` and optionally
``cache_group(job)`` (MLflow cache) and ``ISOLATED = False`` (pure-Python bodies that need
no child process). The runner does the rest (see runner.py).
"""

STAGES = {
    "export": "engineforge.stages.export",
    "profiles": "engineforge.stages.profiles",
    "simplify": "engineforge.stages.simplify",
    "precision": "engineforge.stages.precision",
    "ort_quantize": "engineforge.stages.ort_quantize",
    "audit": "engineforge.stages.audit",
    "localise": "engineforge.stages.localise",
    "repair": "engineforge.stages.repair",
    "drift": "engineforge.stages.drift",
    "gate": "engineforge.stages.gate",
    "build": "engineforge.stages.build",
    "bench": "engineforge.stages.bench",
    "baseline": "engineforge.stages.baseline",
    "track": "engineforge.stages.track",
    "summary": "engineforge.stages.summary",
    "report": "engineforge.stages.report",
}
