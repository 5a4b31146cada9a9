"""Stage 1, data: training/validation images and crops (``images``), Kodak / CLIC preparation (``datasets``).

    python -m hpcm.data export-samples --output DIR     # the embedded sample photos as PNG folders
    python -m hpcm.datasets prepare kodak --source DIR --output DIR
"""
