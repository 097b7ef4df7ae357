rule export:
    input:
        unpack(checkpoint_inputs),
    output:
        onnx=f"{A}/{{model}}/export/model.onnx",
        reference=f"{A}/{{model}}/export/reference.npz",
        sidecar=f"{A}/{{model}}/export/export.json",
    log:
        f"{A}/{{model}}/logs/export.log",
    params:
        config=slice_param("export"),
        tools=tools_param("export"),
    run:
        efjobs.run(rule, wildcards, input, output, params, log, MODELS, A)
