rule precision:
    input:
        unpack(calibration_input),
        onnx=L.simplify("model.onnx"),
    output:
        onnx=L.precision("model.onnx"),
        sidecar=L.precision("precision.json"),
    log:
        L.log("precision-{precision}"),
    wildcard_constraints:
        precision="|".join(efsettings.PRECISIONS),
    # the critical path first: every later job waits on it
    priority: 2
    resources:
        **job_resources("precision"),
    params:
        settings=settings_param("precision"),
        tools=tools_param("precision"),
    run:
        run_stage("precision", wildcards, input, output, params, log)


# <p>-repaired: the plain variant re-made with its localised nodes kept in high precision.
rule repair:
    input:
        unpack(calibration_input),
        onnx=L.simplify("model.onnx"),
        variant=plain_of(lambda m, p: L.precision("model.onnx", m, p)),
        localise=plain_of(L.localise),
        reference=L.export("reference.npz"),
    output:
        onnx=L.precision("model.onnx"),
        sidecar=L.precision("precision.json"),
    log:
        L.log("repair-{precision}"),
    wildcard_constraints:
        precision="|".join(v for v in efsettings.VARIANTS if efsettings.is_repaired(v)),
    resources:
        **job_resources("repair"),
    params:
        settings=settings_param("repair"),
        tools=tools_param("repair"),
    run:
        run_stage("repair", wildcards, input, output, params, log)


# int8 as ONNX Runtime's CPU kernels run it fastest (its own quantize_static), for the
# backends that declare it (Backend.quantizers); the TensorRT ones keep ModelOpt's graph.
# int8-repaired: the same, with the nodes the repair record keeps in high precision.
rule ort_quantize:
    input:
        unpack(calibration_input),
        unpack(repair_record_input),
        onnx=L.simplify("model.onnx"),
    output:
        onnx=L.quantized("model.onnx", "onnxruntime"),
        sidecar=L.quantized("precision.json", "onnxruntime"),
    log:
        L.log("precision-{precision}-onnxruntime"),
    wildcard_constraints:
        precision="int8|int8-repaired",
    priority: 2
    resources:
        **job_resources("ort_quantize"),
    params:
        settings=settings_param("ort_quantize"),
        tools=tools_param("ort_quantize"),
    run:
        run_stage("ort_quantize", wildcards, input, output, params, log)
