# The baseline gate, for models with `gate:`: this run's drift matrix against an earlier one
# (stages/gate.py). Its gate.json is an input of the model's track job; `strict: true` adds
# gate.ok to the targets, whose job fails the run on a regression.
from engineforge.stages import gate as efgate


rule gate:
    input:
        # the drift matrix, and the baseline where it is a file (a new one reruns the gate)
        unpack(
            lambda w: efgate.rule_inputs(
                MODELS[w.model], w.model, L.drift("json", w.model), A
            )
        ),
    output:
        json=L.gate("gate.json"),
    log:
        L.log("gate"),
    resources:
        **job_resources("gate"),
    params:
        settings=settings_param("gate", experiment=EF["experiment"]),
        # the run an MLflow alias or tag resolves to now: when it moves, the gate reruns
        baseline_run=lambda w: efgate.baseline_identity(
            MODELS[w.model], w.model, EF["experiment"]
        ),
    run:
        run_stage("gate", wildcards, input, output, params, log)


rule gate_strict:
    input:
        gate=L.gate("gate.json"),
    output:
        ok=L.gate("gate.ok"),
    log:
        L.log("gate-strict"),
    resources:
        **job_resources("gate"),
    run:
        run_stage("gate", wildcards, input, output, params, log)
