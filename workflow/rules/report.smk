# Figures for the HTML report (`snakemake --report results/report.html`): R-D curves with the
# anchors, the BD forest plots, the quality difference to the reference, training curves, task
# weights, Phase-3 scale contributions, gamma schedules; and the report's first page (the answer,
# included by workflow/report/workflow.rst). The file names depend on the runs and datasets, so
# the figures are directory outputs that the report lists by pattern.


localrules:
    plot_rd,
    plot_forest,
    plot_delta,
    report_answer,
    plot_runs,
    plot_gammas,


rule plot_rd:
    input:
        points="results/rd/points.csv",
        measured=STUDY.anchor_csvs(),
    output:
        report(
            directory("results/plots/rd"),
            patterns=["{name}.png"],
            caption="../report/plot_rd.rst",
            category="R-D curves",
        ),
    log:
        "logs/plot_rd/plots.log",
    params:
        anchors=STUDY.anchor_names(),
        reference=config["analysis"]["reference"],
        # the config's variant order fixes each variant's colour in every figure (the control
        # rows, when configured, last)
        variants=rd_variants(),
        metric=STUDY.metric,
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.analysis.plots rd --points {input.points} --anchors {params.anchors} "
        "--measured {input.measured} "
        "--reference {params.reference} --metric {params.metric} "
        "--variants {params.variants} --output-dir {output} > {log} 2>&1"



rule plot_forest:
    input:
        summary=f"{TABLES_DIR}/summary.csv",
        grids=[f"{TABLES_DIR}/{grid}.csv" for grid in config["grids"]],
        images="results/rd/images.csv",
        analysis="results/configs/analysis.yaml",
    output:
        report(
            directory("results/plots/forest"),
            patterns=["{name}.png"],
            caption="../report/plot_forest.rst",
            category="BD forest plots",
        ),
    log:
        "logs/plot_forest/plots.log",
    params:
        variants=list(config["variants"]),
    conda:
        "../../envs/hpcm.yaml"
    shell:
        # every number from the tables (summary.csv, the Phase 2 grid tables); the per-seed marks
        # from the per-image table
        "python -m hpcm.analysis.forest --summary {input.summary} --config {input.analysis} "
        "--variants {params.variants} --grid-table {input.grids} --images {input.images} "
        "--output-dir {output} > {log} 2>&1"


rule plot_delta:
    input:
        points="results/rd/points.csv",
        images="results/rd/images.csv",
        analysis="results/configs/analysis.yaml",
    output:
        report(
            directory("results/plots/delta"),
            patterns=["{name}.png"],
            caption="../report/plot_delta.rst",
            category="R-D curves",
        ),
    log:
        "logs/plot_delta/plots.log",
    params:
        variants=list(config["variants"]),
        grids=list(config["grids"]),
    conda:
        "../../envs/hpcm.yaml"
    shell:
        # the band: the tables' bootstrap (1000 resamples of the test images, seed 0)
        "python -m hpcm.analysis.delta --points {input.points} --config {input.analysis} "
        "--variants {params.variants} --grids {params.grids} --images {input.images} "
        "--resamples 1000 --bootstrap-seed 0 --output-dir {output} > {log} 2>&1"


rule report_answer:
    input:
        summary=f"{TABLES_DIR}/summary.csv",
        images="results/rd/images.csv",
        analysis="results/configs/analysis.yaml",
        runs=STUDY.done_markers(),
    output:
        # a report item too, so that workflow.rst includes it only once it exists
        report("results/report/answer.rst", caption="../report/answer.rst", category="Tables"),
    log:
        "logs/report_answer/answer.log",
    params:
        runs=runs_root,
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.analysis.answer --summary {input.summary} --config {input.analysis} "
        "--runs {params.runs} --images {input.images} --output {output} > {log} 2>&1"

rule plot_runs:
    input:
        runs=STUDY.done_markers(),
    output:
        report(
            directory("results/plots/runs"),
            patterns=["{name}.png"],
            caption="../report/plot_runs.rst",
            category="Training",
        ),
    log:
        "logs/plot_runs/plots.log",
    params:
        runs=runs_root,
        variants=list(STUDY.variants),
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.analysis.plots runs --runs {params.runs} --variants {params.variants} "
        "--output-dir {output} > {log} 2>&1"


rule plot_gammas:
    output:
        png=report(
            "results/plots/gamma_schedules.png",
            caption="../report/plot_gammas.rst",
            category="Gamma schedules",
        ),
        pdf="results/plots/gamma_schedules.pdf",
    log:
        "logs/plot_gammas/plots.log",
    params:
        outdir=parent_of_png,
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.analysis.plots gammas --output-dir {params.outdir} > {log} 2>&1"
