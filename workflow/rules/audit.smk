rule audit:
    input:
        unpack(evaluation_input),
        engine=lambda w: engine_path(w.model, w.backend, w.precision, first_profile(w.model)),
        reference=f"{A}/{{model}}/export/reference.npz",
    output:
        f"{A}/{{model}}/audit/{{backend}}/{{precision}}.json",
    params:
        config=slice_param("audit"),
        tools=tools_param("audit"),
    log:
        f"{A}/{{model}}/logs/audit-{{backend}}-{{precision}}.log",
    run:
        from engineforge.stages import audit

        efrunner.run_stage(
            log[0],
            f"{wildcards.model}-audit-{wildcards.backend}-{wildcards.precision}",
            A,
            audit.run,
            wildcards.model,
            M(wildcards),
            wildcards.backend,
            wildcards.precision,
            Path(input.engine),
            Path(input.reference),
            Path(output[0]),
            Path("."),
        )


rule drift_matrix:
    input:
        lambda w: list(model_targets(w.model)["audit"].values()),
    output:
        json=f"{A}/{{model}}/audit/drift.json",
        md=f"{A}/{{model}}/audit/drift.md",
    log:
        f"{A}/{{model}}/logs/drift.log",
    run:
        from engineforge.stages import audit

        efrunner.run_stage(
            log[0],
            f"{wildcards.model}-drift",
            A,
            audit.drift_matrix,
            wildcards.model,
            [Path(p) for p in input],
            Path(output.json),
            Path(output.md),
        )
