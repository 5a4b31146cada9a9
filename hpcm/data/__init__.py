"""Stage 1, data: training/validation images and crops (``images``), the registered evaluation
datasets with their preparation and checksums (``datasets``), and the ``hpcm data`` command
(``commands``).

    hpcm data export-samples --output DIR     # the embedded sample photos as PNG folders
    hpcm data prepare kodak --source DIR --output DIR
"""
