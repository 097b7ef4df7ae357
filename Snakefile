# engineforge: PyTorch checkpoints -> audited inference engines.
#   checkpoint -> export (ONNX) -> simplify (onnxsim) -> precision variants
#   -> audit (Polygraphy) + engine build per backend x precision x profile -> bench -> MLflow
# Settings: config.yaml or --configfile (schema: workflow/schemas/config.schema.yaml).
# Run settings: profiles/default (picked up automatically). Architecture: docs/architecture.md

from snakemake.utils import min_version

min_version("9.0")


# The demo zoo's config.yaml is read in common.smk unless --configfile names another config
# (which then replaces it; --config key=value edits either).


include: "workflow/rules/common.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/simplify.smk"
include: "workflow/rules/precision.smk"
include: "workflow/rules/audit.smk"
include: "workflow/rules/gate.smk"
include: "workflow/rules/build.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/track.smk"
include: "workflow/rules/report.smk"


# Cheap jobs that read many outputs run where Snakemake runs, not as cluster jobs: the
# tracking job signs the build cache's entries there, so the signing key stays on one host.
localrules:
    all,
    drift_matrix,
    gate,
    gate_strict,
    track,
    summary,
    report_model,
    report_html,


rule all:
    default_target: True
    input:
        all_targets(),


onstart:
    start_workers()


onsuccess:
    print_summary()


onerror:
    print_failures()
