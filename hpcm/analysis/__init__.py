"""Stage 5, analysis: R-D points (``points``), Bjøntegaard deltas (``bd``), published anchors
(``anchors``), the R-D command (``rd``), ablation tables (``tables``) and figures (``plots``),
model complexity (``complexity``), the Phase 2 search (``phase2``) and the summary table (``summary``).

Imports run one way: points <- bd <- anchors <- rd, tables, plots <- phase2, summary.
"""
