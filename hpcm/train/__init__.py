"""Stage 3, training: ``python -m hpcm.train`` trains one resumable (variant, lambda) run.

``loop`` wires model, optimizer, data and loss into the training loop (``Run.train_step`` is one
step, from batch to optimizer); ``losses`` (R-D loss and the 5-task decompositions), ``schedules``
(lr and gamma), ``checkpoints`` (atomic, resumable state, resume checks, snapshots), ``lock`` (one
writer per run folder), ``interrupt`` (SIGTERM / SIGINT), ``distributed`` (torchrun processes),
``phase4`` (context-aware fine-tuning), ``ema`` (moving average of the weights) and ``logs``
(metrics.csv, wandb, run.yaml) are its parts.
"""
