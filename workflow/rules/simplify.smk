rule simplify:
    input:
        onnx=f"{A}/{{model}}/export/model.onnx",
    output:
        onnx=f"{A}/{{model}}/simplify/model.onnx",
        sidecar=f"{A}/{{model}}/simplify/simplify.json",
    log:
        f"{A}/{{model}}/logs/simplify.log",
    params:
        config=slice_param("simplify"),
        tools=tools_param("simplify"),
    run:
        efjobs.run(rule, wildcards, input, output, params, log, MODELS, A)
