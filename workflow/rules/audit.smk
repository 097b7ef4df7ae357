rule audit:
    input:
        unpack(evaluation_input),
        engine=lambda w: engine_path(
            w.model, w.backend, w.precision, first_profile(w.model)
        ),
        reference=f"{A}/{{model}}/export/reference.npz",
    output:
        f"{A}/{{model}}/audit/{{backend}}/{{precision}}.json",
    log:
        f"{A}/{{model}}/logs/audit-{{backend}}-{{precision}}.log",
    params:
        config=slice_param("audit"),
        tools=tools_param("audit"),
    run:
        efjobs.run(rule, wildcards, input, output, params, log, MODELS, A)


rule drift_matrix:
    input:
        lambda w: list(model_targets(w.model)["audit"].values()),
    output:
        json=f"{A}/{{model}}/audit/drift.json",
        md=f"{A}/{{model}}/audit/drift.md",
    log:
        f"{A}/{{model}}/logs/drift.log",
    run:
        efjobs.run(rule, wildcards, input, output, params, log, MODELS, A)
