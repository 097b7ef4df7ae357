rule audit:
    input:
        unpack(data_input("evaluation")),
        engine=lambda w: engine_of(w, first_profile(w.model)),
        reference=L.export("reference.npz"),
    output:
        sidecar=L.audit(),
    log:
        L.log("audit-{backend}-{precision}"),
    resources:
        **job_resources("audit"),
    params:
        settings=settings_param("audit"),
        tools=tools_param("audit"),
    run:
        run_stage("audit", wildcards, input, output, params, log)


# Where a failing variant's drift enters (a passing one: a quick "passes" record).
rule localise:
    input:
        localise_audits,
        fp32=L.simplify("model.onnx"),
        variant=L.precision("model.onnx"),
        reference=L.export("reference.npz"),
    output:
        sidecar=L.localise(),
    log:
        L.log("localise-{precision}"),
    resources:
        **job_resources("localise"),
    params:
        settings=settings_param("localise"),
        tools=tools_param("localise"),
    run:
        run_stage("localise", wildcards, input, output, params, log)


rule drift_matrix:
    input:
        lambda w: list(model_outputs(w.model)["audit"].values()),
    output:
        json=L.drift("json"),
        md=L.drift("md"),
    log:
        L.log("drift"),
    resources:
        **job_resources("drift"),
    run:
        run_stage("drift", wildcards, input, output, params, log)
