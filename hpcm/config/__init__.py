"""Stage 0, configuration: the table of run keys (``run_config``), ablation presets, task names.

Every other stage reads its settings from here; nothing here imports another stage.
"""
