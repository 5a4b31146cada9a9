"""Stage 5, analysis: R-D points (``points``), Bjøntegaard deltas (``bd``), published anchors
(``anchors``), the R-D command (``rd``), ablation tables (``tables``) and figures (``plots``),
model complexity (``complexity``), the Phase 2 search (``phase2``), the summary table (``summary``),
measured codec anchors (``measured``) and the paper-table reproduction (``reproduce``).

Imports run one way: points <- bd <- bootstrap <- measured <- anchors <- rd, tables, plots,
reproduce <- phase2, summary.
"""
