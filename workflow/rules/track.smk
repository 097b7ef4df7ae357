# One tracking job per model; `resources: mlflow=1` (profile) serializes writers.


rule track:
    input:
        lambda w: flatten(model_targets(w.model)),
    output:
        f"{A}/{{model}}/track.json",
    log:
        f"{A}/{{model}}/logs/track.log",
    resources:
        mlflow=1,
    params:
        experiment=EF["experiment"],
        targets=lambda w: model_targets(w.model),
    run:
        efjobs.run(rule, wildcards, input, output, params, log, MODELS, A)


rule summary:
    input:
        [f"{A}/{m}/audit/drift.json" for m in MODELS],
        [flatten(model_targets(m)["bench"]) for m in MODELS],
        [flatten(model_targets(m)["baseline"]) for m in MODELS],
    output:
        md=f"{A}/summary.md",
        json=f"{A}/summary.json",
    log:
        f"{A}/logs/summary.log",
    params:
        backends=BACKENDS,
        models=MODELS,
    run:
        efjobs.run(rule, wildcards, input, output, params, log, MODELS, A)
