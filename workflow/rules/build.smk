rule build:
    input:
        unpack(flags_mode_input),
        onnx=f"{A}/{{model}}/precision/{{precision}}/model.onnx",
    output:
        engine=f"{A}/{{model}}/build/{{backend}}/{{precision}}/{{profile}}/engine.plan",
        sidecar=f"{A}/{{model}}/build/{{backend}}/{{precision}}/{{profile}}/build.json",
    wildcard_constraints:
        backend="tensorrt-rtx|tensorrt|trtexec",
    params:
        config=slice_param("build"),
        tools=tools_param("build"),
        timing_cache=f"{A}/_timing_cache",
    log:
        f"{A}/{{model}}/logs/build-{{backend}}-{{precision}}-{{profile}}.log",
    run:
        from engineforge.stages import build

        efrunner.run_stage(
            log[0],
            f"{wildcards.model}-build-{wildcards.backend}-{wildcards.precision}-{wildcards.profile}",
            A,
            build.run,
            wildcards.model,
            M(wildcards),
            wildcards.backend,
            wildcards.precision,
            wildcards.profile,
            Path(input.onnx),
            Path(output.engine),
            Path(output.sidecar),
            Path(output.engine).parent,
            fp32_onnx=Path(input.fp32) if "fp32" in input.keys() else None,
            timing_cache_dir=Path(params.timing_cache),
        )


# ONNX Runtime's "engine" is an optimized ONNX model: same body, another file name.
use rule build as build_onnxruntime with:
    output:
        engine=f"{A}/{{model}}/build/{{backend}}/{{precision}}/{{profile}}/engine.onnx",
        sidecar=f"{A}/{{model}}/build/{{backend}}/{{precision}}/{{profile}}/build.json",
    wildcard_constraints:
        backend="onnxruntime",
