# Benches take every core so that no other job skews their timings.


rule bench:
    input:
        engine=engine_of,
        build=L.build(),
    output:
        sidecar=L.bench(),
    log:
        L.log("bench-{backend}-{precision}-{profile}"),
    threads: workflow.cores
    resources:
        **job_resources("bench"),
    params:
        settings=settings_param("bench"),
        tools=tools_param("bench"),
    run:
        run_stage("bench", wildcards, input, output, params, log)


rule bench_pytorch:
    input:
        unpack(checkpoint_input),
    output:
        sidecar=L.baseline(),
    log:
        L.log("bench-pytorch-{profile}"),
    threads: workflow.cores
    resources:
        **job_resources("baseline"),
    params:
        settings=settings_param("baseline"),
        tools=tools_param("baseline"),
    run:
        run_stage("baseline", wildcards, input, output, params, log)
