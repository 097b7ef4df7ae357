# Benches take every core so that no other job skews their timings.


rule bench:
    input:
        engine=lambda w: engine_path(w.model, w.backend, w.precision, w.profile),
        build=f"{A}/{{model}}/build/{{backend}}/{{precision}}/{{profile}}/build.json",
    output:
        f"{A}/{{model}}/bench/{{backend}}/{{precision}}/{{profile}}.json",
    log:
        f"{A}/{{model}}/logs/bench-{{backend}}-{{precision}}-{{profile}}.log",
    threads: workflow.cores
    params:
        config=slice_param("bench"),
        tools=tools_param("bench"),
    run:
        efjobs.run(rule, wildcards, input, output, params, log, MODELS, A)


rule bench_pytorch:
    input:
        unpack(checkpoint_file),
    output:
        f"{A}/{{model}}/bench/pytorch/{{profile}}.json",
    log:
        f"{A}/{{model}}/logs/bench-pytorch-{{profile}}.log",
    threads: workflow.cores
    params:
        config=lambda w: canonical_json(
            efconfig.stage_slice(MODELS[w.model], "baseline", profile=w.profile)
        ),
        checkpoint=lambda w: canonical_json(MODELS[w.model]["checkpoint"]),
        tools=tools_param("baseline"),
    run:
        efjobs.run(rule, wildcards, input, output, params, log, MODELS, A)
