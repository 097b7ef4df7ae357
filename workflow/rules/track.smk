# One tracking job per model; `resources: mlflow=1` (profile) serializes writers.


rule track:
    input:
        lambda w: flatten(model_targets(w.model)),
    output:
        f"{A}/{{model}}/track.json",
    params:
        experiment=EF["experiment"],
    resources:
        mlflow=1,
    log:
        f"{A}/{{model}}/logs/track.log",
    run:
        from engineforge import tracking

        record = tracking.build_record(
            wildcards.model, M(wildcards), params.experiment, model_targets(wildcards.model)
        )
        efrunner.run_stage(
            log[0],
            f"{wildcards.model}-track",
            A,
            tracking.track,
            record,
            Path(output[0]),
            A,
        )


rule summary:
    input:
        [f"{A}/{m}/audit/drift.json" for m in MODELS],
        [flatten(model_targets(m)["bench"]) for m in MODELS],
        [flatten(model_targets(m)["baseline"]) for m in MODELS],
    output:
        md=f"{A}/summary.md",
        json=f"{A}/summary.json",
    params:
        backends=BACKENDS,
    log:
        f"{A}/logs/summary.log",
    run:
        from engineforge import summary

        efrunner.run_stage(
            log[0],
            "summary",
            A,
            summary.write,
            Path(A),
            MODELS,
            params.backends,
            Path(output.md),
            Path(output.json),
        )
