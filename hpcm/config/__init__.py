"""Stage 0, configuration: the table of run keys (``run_config``), ablation presets, task names,
and study configs resolved into runs, paths and run YAMLs (``study``, used by the workflow).

Every other stage reads its settings from here; nothing here imports another stage.
"""
