"""Stage 5, analysis: R-D points (``points``), Bjøntegaard deltas (``bd``), published anchors
(``anchors``), the R-D command (``rd``), ablation tables (``tables``) and figures (``plots``).

Imports run one way: points <- bd <- anchors <- rd, tables, plots.
"""
