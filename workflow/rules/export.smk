rule export:
    input:
        unpack(checkpoint_input),
        unpack(reference_data_input),
    output:
        onnx=L.export("model.onnx"),
        reference=L.export("reference.npz"),
        program=L.export("model.pt2"),
        sidecar=L.export("export.json"),
    log:
        L.log("export"),
    # the critical path first: every later job waits on it
    priority: 3
    resources:
        **job_resources("export"),
    params:
        settings=settings_param("export"),
        tools=tools_param("export"),
    run:
        run_stage("export", wildcards, input, output, params, log)


rule profile_check:
    input:
        onnx=L.export("model.onnx"),
    output:
        sidecar=L.profile_check(),
    log:
        L.log("profile-check-{profile}"),
    priority: 3
    resources:
        **job_resources("profiles"),
    params:
        settings=settings_param("profiles"),
        tools=tools_param("profiles"),
    run:
        run_stage("profiles", wildcards, input, output, params, log)
