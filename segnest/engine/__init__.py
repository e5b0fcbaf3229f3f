"""The training engine: what every task's training shares, knowing nothing of any task.

``fit(task, cfg)`` (trainer.py) assembles a run once for every task: the process set-up
(process.py), the work folder and its lock (workdir.py), a :class:`RunState` that saves and
restores everything the run needs to continue (state.py, rng.py), the writer (writer.py)
and one loop (loop.py) that steps, logs, validates, saves and stops. A task
(:class:`segnest.engine.task.Task`, in ``segnest/tasks/<task>/``) says only what differs:
its data, model, parameter groups, step, validation (and the metric that decides
``best.pt``), checkpoint record and summary. optim.py and schedule.py hold the parameter
groups and schedules tasks choose from.

Exact resume: the sample order of an epoch is a function of (seed, epoch), a sample's
augmentation a function of (seed, epoch, index) (:mod:`segnest.data.sampling`), and every
rank's random generators are stored in each checkpoint, captured before validation and
restored after it, so validating never changes what the run draws next. A run stopped at any
iteration and resumed ends with the weights of one that never stopped.

Checkpoints in the work folder: ``last.pt`` at every validation, every
``--checkpoint-interval`` iterations and when the run is asked to stop; ``best.pt`` when the
validation metric improves; with ``--keep-checkpoints K`` the K newest periodic ones are
also kept as ``iter_<N>.pt``. Weights that are not finite are never written.

The work folder belongs to one run (:func:`run_folder`): it is locked while the run lives,
a new run refuses a folder that holds an earlier run's checkpoints (``--resume`` continues
it, ``--overwrite`` replaces it), and what the console shows is also appended to
``train.log`` / ``pretrain.log`` there. TensorBoard events go to ``tb/train`` /
``tb/pretrain`` in it (:mod:`segnest.inference.tensorboard`).

What ``--resume`` takes from the checkpoint and what from the command line: state.py.

Exit codes of an interrupted run (:data:`segnest.errors.STOP_EXIT_CODES`): 130 after
Ctrl-C (SIGINT), 143 after SIGTERM (SLURM, Kubernetes); both save ``last.pt`` first.
"""
