# One tracking job per model; `resources: mlflow=1` (profile) serializes writers.
# The summary comes last (after tracking): a run with any failed job never runs it, and
# the onerror handler writes it from what succeeded (engineforge/failures.py).


rule track:
    input:
        lambda w: files_of(
            {k: v for k, v in model_outputs(w.model).items() if k != "engine"}
        ),
        lambda w: list(model_outputs(w.model)["engine"].values()),
    output:
        track=L.track(),
    log:
        L.log("track"),
    resources:
        **job_resources("track"),
        mlflow=1,
    params:
        settings=lambda w: Canonical(track_settings(w.model)),
    run:
        run_stage("track", wildcards, input, output, params, log)


rule summary:
    input:
        # every sidecar it reads (a storage provider retrieves declared inputs only)
        [files_of(summary_inputs(m)) for m in MODELS],
        [L.track(m) for m in MODELS],
    output:
        md=L.summary("md"),
        json=L.summary("json"),
    log:
        f"{A}/logs/summary.log",
    resources:
        **job_resources("summary"),
    params:
        # a function: Snakemake would format a plain string value as a wildcard pattern
        settings=lambda w: Canonical(summary_settings()),
    run:
        run_stage("summary", wildcards, input, output, params, log)
