# Phase 4 analysis: R-D points from every evaluation, then every table (BD-rate / BD-PSNR against
# the reference variant and the published anchors, expected gains, the ablation studies, the
# optimizer overhead, with bootstrap intervals over the test images) from measured files only.


localrules:
    rd_points,
    analysis_config,
    tables,
    phase2_grid,
    summary,


rule rd_points:
    input:
        STUDY.eval_csvs(),
    output:
        points="results/rd/points.csv",
        # per image (and training seed): what the tables' bootstrap intervals resample
        images="results/rd/images.csv",
    log:
        "logs/rd_points/points.log",
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.analysis.rd points --eval-csv {input} --output {output.points} "
        "--images {output.images} > {log} 2>&1"


rule analysis_config:
    output:
        "results/configs/analysis.yaml",
    log:
        "logs/analysis_config/analysis.log",
    params:
        analysis=table_analysis(),  # common.smk: seeds, quality axis, measured anchors, notes
    run:
        write_yaml(output[0], {"analysis": params.analysis}, log[0])


rule tables:
    input:
        points="results/rd/points.csv",
        images="results/rd/images.csv",
        analysis="results/configs/analysis.yaml",
        runs=STUDY.done_markers(),
        measured=STUDY.anchor_csvs(),  # codec anchors measured by rule anchor (anchors.smk)
    output:
        table_outputs(),
    log:
        "logs/tables/tables.log",
    params:
        runs=runs_root,
        benchmarks=TRAIN_BENCHMARKS_DIR,
        outdir=tables_dir,
    conda:
        "../../envs/hpcm.yaml"
    shell:
        # the BD method, reference, anchors and studies all come from the analysis YAML; every BD
        # gets its 95 % paired-bootstrap interval over the test images (1000 resamples, seed 0)
        "python -m hpcm.analysis.tables --points {input.points} --runs {params.runs} --config {input.analysis} "
        "--benchmarks {params.benchmarks} --images {input.images} --resamples 1000 "
        "--bootstrap-seed 0 --measured {input.measured} --output-dir {params.outdir} > {log} 2>&1"


# The Phase 2 search (one table + heatmap per grid) and the paper-style summary table
# (helpers in common.smk).


rule phase2_grid:
    input:
        points="results/rd/points.csv",
        runs=grid_done_markers,
        evals=STUDY.eval_csvs(),
        analysis="results/configs/analysis.yaml",
    output:
        table=multiext(f"{TABLES_DIR}/{{grid}}", ".csv", ".md", ".tex"),
        png="results/plots/{grid}.png",
        pdf="results/plots/{grid}.pdf",
    wildcard_constraints:
        grid=alternatives(config["grids"]),
    log:
        "logs/phase2_grid/{grid}.log",
    params:
        runs=runs_root,
        include=lambda wildcards: grid_includes(wildcards.grid),
        reference=config["analysis"]["reference"],
        method=config["analysis"]["bd_method"],
        metric=STUDY.metric,
        evals=eval_csv_option,
        outdir=tables_dir,
        plotdir=parent_of_png,
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.analysis.phase2 --points {input.points} --runs {params.runs} --grid {wildcards.grid} "
        "--include {params.include} --reference {params.reference} --method {params.method} --metric {params.metric} "
        "{params.evals} "
        "--output-dir {params.outdir} --plots-dir {params.plotdir} --config {input.analysis} "
        "> {log} 2>&1"


rule summary:
    input:
        points="results/rd/points.csv",
        analysis="results/configs/analysis.yaml",
        runs=STUDY.done_markers(),
        evals=STUDY.eval_csvs(),
    output:
        csv=f"{TABLES_DIR}/summary.csv",
        md=f"{TABLES_DIR}/summary.md",
        tex=f"{TABLES_DIR}/summary.tex",
    log:
        "logs/summary/summary.log",
    params:
        runs=runs_root,
        # the named variants (every phase and ablation); grid points have their own table
        variants=rd_variants(),
        evals=eval_csv_option,
        outdir=tables_dir,
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.analysis.summary --points {input.points} --runs {params.runs} --config {input.analysis} "
        "--variants {params.variants} {params.evals} --output-dir {params.outdir} > {log} 2>&1"


# Convergence (`convergence`): BD-rate vs the reference at the same step, at every snapshot (fixed
# image subset) and at the end (every image), with intervals over seeds and images.
if STUDY.convergence_steps():

    localrules:
        convergence,

    rule convergence:
        input:
            snapshots=STUDY.all_snapshot_csvs(),
            final=STUDY.final_csvs(config["convergence"]["dataset"]),
        output:
            table=multiext(f"{TABLES_DIR}/convergence", ".csv", ".md", ".tex"),
            png="results/plots/convergence.png",
            pdf="results/plots/convergence.pdf",
        log:
            "logs/convergence/convergence.log",
        params:
            final_step=config["training"]["steps"],
            reference=config["analysis"]["reference"],
            method=config["analysis"]["bd_method"],
            metric=STUDY.metric,
            outdir=tables_dir,
        conda:
            "../../envs/hpcm.yaml"
        shell:
            "python -m hpcm.analysis.convergence --snapshots {input.snapshots} --final {input.final} "
            "--final-step {params.final_step} --reference {params.reference} --method {params.method} "
            "--metric {params.metric} --output-dir {params.outdir} --plot {output.png} > {log} 2>&1"
