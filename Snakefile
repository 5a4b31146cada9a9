# HPCM x Balanced R-D: every variant x lambda -> training -> real-bitstream evaluation -> R-D points,
# BD-rate tables, ablation tables and plots. Run from the repository root:
#
#   snakemake --cores 2                                                  # the embedded demo (config.yaml)
#   snakemake --configfile workflow/configs/paper.yaml --profile profiles/slurm   # the paper study
#
# The grid lives in the config (see workflow/schemas/config.schema.yaml and docs/workflow.md);
# every rule calls one thin module of the `hpcm` package.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default applies only when no --configfile is given: Snakemake would otherwise merge
# the two (a study config would inherit the demo's variants and datasets).
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/anchor_functions.smk"
include: "workflow/rules/anchors.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/report.smk"


onstart:
    warn_if_gpus_unlimited()


rule all:
    default_target: True
    input:
        final_outputs(),
