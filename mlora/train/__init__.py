"""Training: the dispatcher, the loop, checkpoints and metrics.

Public entry points:

    run_training(run_config, options: TrainOptions) -> TrainSummary
    TrainOptions                 the run flags (base model, dtype, output_dir, resume, ...)
    TrainError                   a problem the user must fix; printed without a traceback
    console_logging()            show the trainer's progress messages on stderr
"""

from mlora.train.data import TrainError
from mlora.train.metrics import console_logging
from mlora.train.trainer import AdapterSummary, TrainOptions, TrainSummary, run_training

__all__ = ["AdapterSummary", "TrainError", "TrainOptions", "TrainSummary", "console_logging", "run_training"]
