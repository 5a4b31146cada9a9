# Phase 4 analysis: R-D points from every evaluation, then every table (BD-rate / BD-PSNR against
# the reference variant and the published anchors, expected gains, the ablation studies, the
# optimizer overhead) from measured files only.


localrules:
    rd_points,
    analysis_config,
    tables,


rule rd_points:
    input:
        STUDY.eval_csvs(),
    output:
        points="results/rd/points.csv",
    log:
        "logs/rd_points/points.log",
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.rd points --eval-csv {input} --output {output.points} > {log} 2>&1"


rule analysis_config:
    output:
        "results/configs/analysis.yaml",
    log:
        "logs/analysis_config/analysis.log",
    params:
        analysis=config["analysis"],
    run:
        write_yaml(output[0], {"analysis": params.analysis}, log[0])


rule tables:
    input:
        points="results/rd/points.csv",
        analysis="results/configs/analysis.yaml",
        runs=STUDY.done_markers(),
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
        # the BD method, reference, anchors and studies all come from the analysis YAML
        "python -m hpcm.tables --points {input.points} --runs {params.runs} --config {input.analysis} "
        "--benchmarks {params.benchmarks} --output-dir {params.outdir} > {log} 2>&1"
