"""The run machinery around the objectives' steps, one concern per module, below the objectives (it imports
none of them): :class:`~selfsup3d.objectives.PretrainObjective` combines it, so an objective's own file holds only
its heads, its losses and its ``step``.

* :mod:`~selfsup3d.objectives.run.recipe`: the recipe arguments of a run (schedule, betas, layer decay, guards,
  ``compile``, moving average, fine-tuning source), checked once; components of a multi-task run refuse them;
* :mod:`~selfsup3d.objectives.run.optimizer`: AdamW parameter groups and the warm-up + cosine schedule;
* :mod:`~selfsup3d.objectives.run.guards`: steps skipped for a non-finite loss or a spiking gradient norm;
* :mod:`~selfsup3d.objectives.run.moving_average`: the moving average of the encoder (``ema_decay``) and of
  moving-average teachers;
* :mod:`~selfsup3d.objectives.run.resume`: per-batch seeding and the run state saved beside the weights (exact
  resume), frozen teachers left out of checkpoints, checkpoint keys checked before loading;
* :mod:`~selfsup3d.objectives.run.hparams`: constructor arguments saved as plain data.
"""
