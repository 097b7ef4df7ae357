rule simplify:
    input:
        onnx=f"{A}/{{model}}/export/model.onnx",
    output:
        onnx=f"{A}/{{model}}/simplify/model.onnx",
        sidecar=f"{A}/{{model}}/simplify/simplify.json",
    params:
        config=slice_param("simplify"),
        tools=tools_param("simplify"),
    log:
        f"{A}/{{model}}/logs/simplify.log",
    run:
        from engineforge.stages import simplify

        efrunner.run_stage(
            log[0],
            f"{wildcards.model}-simplify",
            A,
            simplify.run,
            wildcards.model,
            M(wildcards),
            Path(input.onnx),
            Path(output.onnx),
            Path(output.sidecar),
        )
