"""Setting a run up: the run flags, device and dtype, checks of the adapters and the data.

Everything here runs before the first training step, so that a bad flag, a missing
evaluation split or a target module the model lacks fails fast with a message. (What the
output folder allows, and resuming, live in `mlora.train.checkpoint`.)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mlora.config import LoraConfig
from mlora.model.adapted import MultiAdapterModel
from mlora.model.loading import default_device, default_dtype
from mlora.train.data import Prepared, TrainError, seed_of
from mlora.train.distributed import DEFAULT_TIMEOUT_S

logger = logging.getLogger("mlora.train")


@dataclass
class TrainOptions:
    """How to run a config (the command-line flags of ``launch.py run`` / ``train.py``).

    Attributes:
        base_model: hub id, local model folder or ``.gguf`` file.
        dtype: ``fp32`` | ``bf16`` | ``fp16`` for the frozen base; None: bf16 on a CUDA
            device that supports it, else fp32. Adapters and optimizer state are always fp32.
            The base runs in its own dtype; no autocast region is opened, because autocast
            would also cast the adapters' fp32 matmuls down (DESIGN.md section 5 keeps
            adapter math in fp32 and casts only its result to the base dtype). fp16 adds
            per-adapter dynamic loss scaling.
        quantize: None | ``4bit`` | ``8bit`` (bitsandbytes).
        stop_after_steps: stop after this many global steps as if interrupted (checkpoint
            written); for time-boxed runs and tests.
        progress: show the tqdm bar.
        fsdp: shard the frozen base over the processes of a torchrun launch (FSDP2
            ``fully_shard`` per decoder layer); ``parallelism: data`` only.
        dist_timeout: seconds any collective of a multi-process run waits for the others
            before the run stops with an error naming the rank.
    """

    base_model: str
    output_dir: Path = Path("output")
    dtype: str | None = None
    quantize: str | None = None
    device: str | None = None
    seed: int = 42
    resume: bool = False
    overwrite: bool = False
    gradient_checkpointing: bool = False
    attn_impl: str | None = None
    progress: bool = True
    stop_after_steps: int | None = None
    fsdp: bool = False
    dist_timeout: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)

    @classmethod
    def from_args(cls, args) -> TrainOptions:
        """From an argparse namespace carrying the run flags (unknown attributes ignored)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})


def resolve_device_dtype(options: TrainOptions) -> tuple[torch.device, torch.dtype]:
    """The device (default CUDA when available) and base dtype (default bf16 on CUDA, else fp32)."""
    device = default_device(options.device)
    return device, default_dtype(options.dtype, device)


def check_adapters(model: MultiAdapterModel, cfgs: list[LoraConfig], seed: int) -> None:
    """Add and remove every adapter once, so a missing target module fails before training."""
    for cfg in cfgs:
        try:
            model.add_adapter(cfg, seed=seed_of(cfg, seed))
        except NotImplementedError as err:
            raise TrainError(f"adapter {cfg.name!r}: {err}") from None
        model.remove_adapter(cfg.name)


def check_eval_data(cfgs: list[LoraConfig]) -> None:
    """Read one item of every evaluation split the run will score (at the end, and during
    training with ``evaluate_steps``), so a missing split fails before the first step rather
    than after the adapters have trained."""
    from mlora.data import is_benchmark, load_items, task_names, task_sources

    for cfg in cfgs:
        tasks = [(t, src) for t, src in task_sources(task_names(cfg.task_name), cfg.data) if is_benchmark(t)]
        if cfg.evaluate_steps and not tasks:
            logger.warning("%s: evaluate_steps has nothing to score (task %s has no benchmark split)", cfg.name,
                           cfg.task_name)
        for task, source in tasks:
            load_items(task, "eval", source, limit=1)


def log_prepared(name: str, prepared: Prepared, cutoff_len: int) -> None:
    logger.info("%s: %d examples, %d truncated to cutoff_len %d, %d dropped (no target token left)", name,
                prepared.num_raw, prepared.num_truncated, cutoff_len, prepared.num_dropped)
