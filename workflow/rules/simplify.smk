rule simplify:
    input:
        onnx=L.export("model.onnx"),
    output:
        onnx=L.simplify("model.onnx"),
        sidecar=L.simplify("simplify.json"),
    log:
        L.log("simplify"),
    params:
        settings=settings_param("simplify"),
        tools=tools_param("simplify"),
    run:
        run_stage("simplify", wildcards, input, output, params, log)
