rule precision:
    input:
        unpack(calibration_input),
        onnx=f"{A}/{{model}}/simplify/model.onnx",
    output:
        onnx=f"{A}/{{model}}/precision/{{precision}}/model.onnx",
        sidecar=f"{A}/{{model}}/precision/{{precision}}/precision.json",
    params:
        config=slice_param("precision"),
        tools=tools_param("precision"),
    log:
        f"{A}/{{model}}/logs/precision-{{precision}}.log",
    run:
        from engineforge.stages import precision

        efrunner.run_stage(
            log[0],
            f"{wildcards.model}-precision-{wildcards.precision}",
            A,
            precision.run,
            wildcards.model,
            M(wildcards),
            wildcards.precision,
            Path(input.onnx),
            Path(output.onnx),
            Path(output.sidecar),
            Path("."),
        )
