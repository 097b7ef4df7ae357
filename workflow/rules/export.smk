rule export:
    input:
        unpack(checkpoint_inputs),
    output:
        onnx=f"{A}/{{model}}/export/model.onnx",
        reference=f"{A}/{{model}}/export/reference.npz",
        sidecar=f"{A}/{{model}}/export/export.json",
    params:
        config=slice_param("export"),
        tools=tools_param("export"),
    log:
        f"{A}/{{model}}/logs/export.log",
    run:
        from engineforge.stages import export

        efrunner.run_stage(
            log[0],
            f"{wildcards.model}-export",
            A,
            export.run,
            wildcards.model,
            M(wildcards),
            Path(output.onnx),
            Path(output.reference),
            Path(output.sidecar),
            Path("."),
        )
