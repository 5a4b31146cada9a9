"""HPCM x Balanced R-D: an experiment pipeline for learned image compression.

The package holds one thin module per pipeline stage (models, optimizers, losses, training,
evaluation, R-D analysis, tables, plots); the Snakemake DAG at the repository root calls them.
"""

__version__ = "0.1.0"
