# One build rule per registered backend (its engine file name is its own); everything
# about a backend comes from its module's self-description.
for _backend in efbackends.names():

    rule:
        name:
            f"build_{_backend.replace('-', '_')}"
        input:
            profile_checks,  # order only: not in the build's fingerprint
            unpack(build_input(_backend)),
        output:
            engine=L.engine(_backend),
            sidecar=L.build(_backend),
        log:
            L.log(f"build-{_backend}-{{precision}}-{{profile}}"),
        resources:
            **job_resources("build", _backend),
        params:
            backend=_backend,
            settings=settings_param("build", backend=_backend),
            tools=tools_param("build", _backend),
        run:
            run_stage("build", wildcards, input, output, params, log)
