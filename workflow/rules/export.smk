rule export:
    input:
        unpack(checkpoint_input),
        unpack(reference_data_input),
    output:
        onnx=L.export("model.onnx"),
        reference=L.export("reference.npz"),
        sidecar=L.export("export.json"),
    log:
        L.log("export"),
    # the critical path first: every later job waits on it
    priority: 3
    params:
        settings=settings_param("export"),
        tools=tools_param("export"),
    run:
        run_stage("export", wildcards, input, output, params, log)
