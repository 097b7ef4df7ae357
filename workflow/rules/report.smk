# The report (engineforge/stages/report.py): per model, figures and the model's page (inputs
# of its track job, which logs them to the model's MLflow parent run) and a section; then
# artifacts/report.html from every section. report(...) puts them in `snakemake --report`.


rule report_model:
    input:
        lambda w: files_of(
            {
                k: v
                for k, v in model_outputs(w.model).items()
                if k not in ("engine", "report")
            }
        ),
    output:
        heatmap=report(
            L.report("drift_heatmap.png"),
            category="{model}",
            labels={"model": "{model}", "figure": "drift heatmap"},
        ),
        histograms=report(
            L.report("error_histograms.png"),
            category="{model}",
            labels={"model": "{model}", "figure": "error histograms"},
        ),
        latency=report(
            L.report("latency.png"),
            category="{model}",
            labels={"model": "{model}", "figure": "latency and speedup"},
        ),
        html=L.report("report.html"),
        section=L.report("section.html"),
    log:
        L.log("report"),
    resources:
        **job_resources("report"),
    params:
        settings=lambda w: Canonical(report_settings(w.model)),
        tools=tools_param("report"),
    run:
        run_stage("report", wildcards, input, output, params, log)


rule report_html:
    input:
        [L.report("section.html", m) for m in MODELS],
    output:
        html=report(
            L.report_html(),
            category="engineforge",
            labels={"figure": "the whole report (self-contained HTML)"},
        ),
    log:
        f"{A}/logs/report.log",
    resources:
        **job_resources("report"),
    params:
        settings=lambda w: Canonical(report_settings()),
        tools=tools_param("report"),
    run:
        run_stage("report", wildcards, input, output, params, log)
