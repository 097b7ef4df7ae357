# Benches take every core so that no other job skews their timings.


rule bench:
    input:
        engine=lambda w: engine_path(w.model, w.backend, w.precision, w.profile),
        build=f"{A}/{{model}}/build/{{backend}}/{{precision}}/{{profile}}/build.json",
    output:
        f"{A}/{{model}}/bench/{{backend}}/{{precision}}/{{profile}}.json",
    params:
        config=slice_param("bench"),
        tools=tools_param("bench"),
    threads: workflow.cores
    log:
        f"{A}/{{model}}/logs/bench-{{backend}}-{{precision}}-{{profile}}.log",
    run:
        from engineforge.stages import bench

        efrunner.run_stage(
            log[0],
            f"{wildcards.model}-bench-{wildcards.backend}-{wildcards.precision}-{wildcards.profile}",
            A,
            bench.run,
            wildcards.model,
            M(wildcards),
            wildcards.backend,
            wildcards.precision,
            wildcards.profile,
            Path(input.engine),
            Path(input.build),
            Path(output[0]),
            Path(output[0]).parent,
        )


rule bench_pytorch:
    input:
        unpack(checkpoint_file),
    output:
        f"{A}/{{model}}/bench/pytorch/{{profile}}.json",
    params:
        config=lambda w: canonical_json(
            efconfig.stage_slice(MODELS[w.model], "baseline", profile=w.profile)
        ),
        checkpoint=lambda w: canonical_json(MODELS[w.model]["checkpoint"]),
        tools=tools_param("baseline"),
    threads: workflow.cores
    log:
        f"{A}/{{model}}/logs/bench-pytorch-{{profile}}.log",
    run:
        from engineforge.stages import bench

        efrunner.run_stage(
            log[0],
            f"{wildcards.model}-bench-pytorch-{wildcards.profile}",
            A,
            bench.run_baseline,
            wildcards.model,
            M(wildcards),
            wildcards.profile,
            Path(output[0]),
            Path("."),
        )
