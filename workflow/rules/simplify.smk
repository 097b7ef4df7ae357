rule simplify:
    input:
        onnx=L.export("model.onnx"),
    output:
        onnx=L.simplify("model.onnx"),
        sidecar=L.simplify("simplify.json"),
    log:
        L.log("simplify"),
    # the critical path first: every later job waits on it
    priority: 3
    resources:
        **job_resources("simplify"),
    params:
        settings=settings_param("simplify"),
        tools=tools_param("simplify"),
    run:
        run_stage("simplify", wildcards, input, output, params, log)
