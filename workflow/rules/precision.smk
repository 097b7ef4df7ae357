rule precision:
    input:
        unpack(calibration_input),
        onnx=f"{A}/{{model}}/simplify/model.onnx",
    output:
        onnx=f"{A}/{{model}}/precision/{{precision}}/model.onnx",
        sidecar=f"{A}/{{model}}/precision/{{precision}}/precision.json",
    log:
        f"{A}/{{model}}/logs/precision-{{precision}}.log",
    params:
        config=slice_param("precision"),
        tools=tools_param("precision"),
    run:
        efjobs.run(rule, wildcards, input, output, params, log, MODELS, A)
