# Phase 4 analysis: R-D points from every evaluation, BD-rate / BD-PSNR tables against the
# reference variant and the published anchors.


localrules:
    rd_points,
    bd_table,


rule rd_points:
    input:
        all_eval_csvs(),
    output:
        "results/rd/points.csv",
    log:
        "logs/rd_points/points.log",
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.rd points --eval-csv {input} --output {output} > {log} 2>&1"


rule bd_table:
    input:
        "results/rd/points.csv",
    output:
        "results/rd/bd_vs_{target}.csv",
    log:
        "logs/bd_table/{target}.log",
    params:
        against=bd_against,
        method=config["analysis"]["bd_method"],
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.rd bd --points {input} {params.against} --method {params.method} "
        "--output {output} > {log} 2>&1"
