"""Stage 3, training: ``python -m hpcm.train`` trains one resumable (variant, lambda) run.

``loop`` wires model, optimizer, data and loss into the training loop; ``losses`` (R-D loss and the
5-task decompositions), ``schedules`` (lr and gamma), ``checkpoints`` (atomic, resumable state,
snapshots), ``ema`` (moving average of the weights) and ``logs`` (metrics.csv, wandb) are its parts.
"""
