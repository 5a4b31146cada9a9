# Figures for the HTML report (`snakemake --report results/report.html`): R-D curves with the
# anchors, training curves, task weights, Phase-3 scale contributions, gamma schedules. The file
# names depend on the runs (one task-weight figure per balanced run), so the per-run figures are
# directory outputs that the report lists by pattern.


localrules:
    plot_rd,
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
        # the config's variant order fixes each variant's colour in every figure
        variants=list(STUDY.variants),
        metric=STUDY.metric,
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.plots rd --points {input.points} --anchors {params.anchors} "
        "--measured {input.measured} "
        "--reference {params.reference} --metric {params.metric} "
        "--variants {params.variants} --output-dir {output} > {log} 2>&1"


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
        "python -m hpcm.plots runs --runs {params.runs} --variants {params.variants} "
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
        "python -m hpcm.plots gammas --output-dir {params.outdir} > {log} 2>&1"
