# Phase 4 analysis: R-D points from every evaluation, then every table (BD-rate / BD-PSNR against
# the reference variant and the published anchors, expected gains, the ablation studies, the
# optimizer overhead, with bootstrap intervals over the test images) from measured files only.


localrules:
    rd_points,
    analysis_config,
    tables,


rule rd_points:
    input:
        all_eval_csvs(),
    output:
        points="results/rd/points.csv",
        # per image (and training seed): what the tables' bootstrap intervals resample
        images="results/rd/images.csv",
    log:
        "logs/rd_points/points.log",
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.rd points --eval-csv {input} --output {output.points} "
        "--images {output.images} > {log} 2>&1"


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
        images="results/rd/images.csv",
        analysis="results/configs/analysis.yaml",
        runs=all_done_markers(),
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
        "python -m hpcm.tables --points {input.points} --runs {params.runs} --config {input.analysis} "
        "--benchmarks {params.benchmarks} --images {input.images} --resamples 1000 "
        "--bootstrap-seed 0 --output-dir {params.outdir} > {log} 2>&1"
