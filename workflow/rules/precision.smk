rule precision:
    input:
        unpack(calibration_input),
        onnx=L.simplify("model.onnx"),
    output:
        onnx=L.precision("model.onnx"),
        sidecar=L.precision("precision.json"),
    log:
        L.log("precision-{precision}"),
    # the critical path first: every later job waits on it
    priority: 2
    params:
        settings=settings_param("precision"),
        tools=tools_param("precision"),
    run:
        run_stage("precision", wildcards, input, output, params, log)
