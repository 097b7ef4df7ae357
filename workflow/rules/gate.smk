# The baseline gate, for models with `gate:`: this run's drift matrix against an earlier one
# (stages/gate.py). Its gate.json is an input of the model's track job; `strict: true` adds
# gate.ok to the targets, whose job fails the run on a regression.
from engineforge.stages import gate as efgate


def gate_input(w):
    """The drift matrix, and the baseline file where the source is one (a new baseline file
    reruns the gate; MLflow sources are read when the gate runs)."""
    source = efgate.source_of(MODELS[w.model]["gate"], w.model)
    path = efgate.local_file(source, A)
    found = {"baseline": str(path)} if path and path.is_file() else {}
    return {"drift": L.drift("json", w.model)} | found


rule gate:
    input:
        unpack(gate_input),
    output:
        json=L.gate("gate.json"),
    log:
        L.log("gate"),
    params:
        settings=settings_param("gate", experiment=EF["experiment"]),
    run:
        run_stage("gate", wildcards, input, output, params, log)


rule gate_strict:
    input:
        gate=L.gate("gate.json"),
    output:
        ok=L.gate("gate.ok"),
    log:
        L.log("gate-strict"),
    run:
        run_stage("gate", wildcards, input, output, params, log)
