rule build:
    input:
        unpack(flags_mode_input),
        onnx=f"{A}/{{model}}/precision/{{precision}}/model.onnx",
    output:
        engine=f"{A}/{{model}}/build/{{backend}}/{{precision}}/{{profile}}/engine.plan",
        sidecar=f"{A}/{{model}}/build/{{backend}}/{{precision}}/{{profile}}/build.json",
    log:
        f"{A}/{{model}}/logs/build-{{backend}}-{{precision}}-{{profile}}.log",
    wildcard_constraints:
        backend="tensorrt-rtx|tensorrt|trtexec",
    params:
        config=slice_param("build"),
        tools=tools_param("build"),
        timing_cache=f"{A}/_timing_cache",
    run:
        efjobs.run(rule, wildcards, input, output, params, log, MODELS, A)


# ONNX Runtime's "engine" is an optimized ONNX model: same body, another file name.
use rule build as build_onnxruntime with:
    output:
        engine=f"{A}/{{model}}/build/{{backend}}/{{precision}}/{{profile}}/engine.onnx",
        sidecar=f"{A}/{{model}}/build/{{backend}}/{{precision}}/{{profile}}/build.json",
    wildcard_constraints:
        backend="onnxruntime",
