"""What each job asks its scheduler for, from the model's typed settings.

One place for every rule (``resources: **job_resources(...)`` in the rule files): cores,
memory, a time limit, a partition and a GPU, named as Snakemake's Slurm executor plugin
reads them (``cpus_per_task``, ``mem_mb``, ``runtime`` in minutes, ``slurm_partition``,
``gpu``, ``slurm_extra``). A local run reads the same names (``--resources gpu=1`` gives one
GPU to one job at a time). The numbers come from ``resources`` (cores, memory, partitions,
device) and ``time_limits`` (the scheduler's limit is ours plus a margin, so a job past its
time fails in our one line before Slurm kills it); a backend says which of its jobs need a
GPU (``Backend.needs_gpu``). Nothing here is part of a fingerprint.
"""

from __future__ import annotations

import math

from engineforge.settings import ResourceSettings, TimeLimits

# stage -> the resources section that sizes its jobs (the rest: ``other``)
SECTION = {"export": "export", "profiles": "export", "simplify": "simplify",
           "precision": "precision", "ort_quantize": "precision", "repair": "repair",
           "audit": "audit", "localise": "localise", "build": "build", "bench": "bench",
           "baseline": "bench"}
GPU_STAGES = ("build", "audit", "bench")  # a GPU backend's jobs; the eager baseline follows
# the model's device (it is timed where the engines are)
KEYS = ("cpus_per_task", "mem_mb", "runtime", "gpu", "slurm_partition", "slurm_extra")
DEFAULT_LIMIT_S = 3600.0


def needs_gpu(m: dict, stage: str, backend: str | None) -> bool:
    """Does this job ask for a GPU? A GPU backend's build, audit or bench does, and the eager
    baseline of a model whose engines run on CUDA."""
    if stage == "baseline":
        return m["resources"]["device"] == "cuda"
    if stage not in GPU_STAGES or backend is None:
        return False
    from engineforge.backends import backend_class

    return backend_class(backend).needs_gpu(stage, m["resources"]["device"])


def job_resources(m: dict | None, stage: str, backend: str | None = None,
                  profile_partition: str | None = None) -> dict:
    """The job's resources (every key of :data:`KEYS`; "" and 0 mean "not asked for",
    which the Slurm plugin leaves out of ``sbatch``). ``m``: the model's resolved config,
    None for jobs of no model (summary, report), which get the defaults.
    ``profile_partition``: the workflow profile's default partition, used where the config
    names none (a rule's own value would otherwise hide it)."""
    if m is None:
        m = {"resources": ResourceSettings().model_dump(),
             "time_limits": TimeLimits().model_dump(), "bench": {"threads": 1}}
    r = m["resources"]
    section = r[SECTION.get(stage, "other")]
    cpus = section["cpus"]
    if SECTION.get(stage) == "bench":  # a bench times with bench.threads cores
        cpus = max(cpus, m["bench"]["threads"])
    gpu = needs_gpu(m, stage, backend)
    limit_s = m["time_limits"].get(stage, DEFAULT_LIMIT_S)
    return {"cpus_per_task": cpus, "mem_mb": section["mem_mb"],
            "runtime": math.ceil(limit_s / 60) + r["runtime_margin_min"],
            "gpu": int(gpu),
            "slurm_partition": (r["gpu_partition" if gpu else "cpu_partition"]
                                or profile_partition or ""),
            "slurm_extra": "--exclusive" if section["exclusive"] else ""}


def check_partitions(models: dict, profile_partition: str | None = None) -> None:
    """Every Slurm partition the config (``resources.cpu_partition``/``gpu_partition``) or
    the workflow profile (``default-resources: slurm_partition=...``) names exists: sbatch
    would refuse each job one at a time, deep in the plugin's traceback."""
    import shutil
    import subprocess

    from engineforge.errors import ConfigError

    named: dict[str, str] = {}  # partition -> where it is named
    for name, m in models.items():
        for key in ("cpu_partition", "gpu_partition"):
            if m["resources"][key]:
                named.setdefault(m["resources"][key], f"models.{name}.resources.{key}")
    if profile_partition:
        named.setdefault(profile_partition, "default-resources: slurm_partition (profile)")
    if not named:
        return
    sinfo = shutil.which("sinfo")
    out = subprocess.run([sinfo, "-h", "-o", "%R"], capture_output=True, text=True,
                         timeout=60) if sinfo else None
    if out is None or out.returncode != 0:
        why = "sinfo is not on PATH" if out is None else (out.stderr.strip() or "sinfo failed")
        raise ConfigError(f"cannot list the Slurm partitions ({why.splitlines()[0]}).",
                          key=next(iter(named.values())),
                          fix="run where the Slurm client tools reach the cluster")
    have = sorted(set(out.stdout.split()))
    for partition, key in named.items():
        if partition not in have:
            raise ConfigError(f"Slurm has no partition '{partition}' (it has: "
                              f"{', '.join(have) or 'none'}).", key=key,
                              fix="name one of those, or null for the cluster's default")


def profile_partition(resource_settings) -> str | None:
    """The ``slurm_partition`` a workflow profile's ``default-resources`` names, if any."""
    defaults = getattr(resource_settings, "default_resources", None)
    try:
        value = defaults.get("slurm_partition") if defaults is not None else None
    except (AttributeError, TypeError):
        return None
    value = getattr(value, "raw", value)  # a parsed resource: its command-line text
    return str(value).strip("'\"") if isinstance(value, str) and value.strip("'\"") else None
