"""Training: the dispatcher, the loop, checkpoints and metrics.

Public entry points:

    run_training(run_config, options: TrainOptions) -> TrainSummary
    TrainOptions                 the run flags (base model, dtype, output_dir, resume, ...)
    TrainError                   a problem the user must fix; printed without a traceback
"""

from mlora.train.data import TrainError
from mlora.train.trainer import AdapterSummary, TrainOptions, TrainSummary, run_training

__all__ = ["AdapterSummary", "TrainError", "TrainOptions", "TrainSummary", "run_training"]
