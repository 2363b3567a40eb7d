"""Atomic checkpoints of a run and the final adapter folders.

Layout under ``output_dir``::

    <name>/                        final adapter (PEFT / MixLoRA files + mlora_training.json)
    checkpoints/step-00000012/     one consistent snapshot of the run after global step 12
        run_state.json             dispatcher queue, finished/failed adapters, seed, run id
        <name>/                    per active adapter: its adapter files (loadable as an
            trainer_state.pt       adapter) + optimizer, scheduler, loss scale, data position,
                                   partial gradients of an unfinished accumulation
    logs/<name>.jsonl              metrics

A checkpoint snapshots every active adapter at the same global step, not each adapter on its
own: the adapters of one step share a padded batch, so only a consistent cut lets a resumed
run rebuild exactly the same batches (and so end with bit-identical weights). Everything is
written into a temporary folder next to the target and renamed into place, so a kill leaves
either the previous complete folder or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from mlora.io import save_adapter

CHECKPOINTS = "checkpoints"
RUN_STATE = "run_state.json"
TRAINER_STATE = "trainer_state.pt"
TRAINING_INFO = "mlora_training.json"
KEEP_CHECKPOINTS = 2


@contextlib.contextmanager
def atomic_folder(target: Path):
    """Yield a temporary folder beside `target`; on success it replaces `target` by renames.

    On an exception the temporary folder is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(global step, folder)``, oldest first."""
    found = []
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith("step-") and (path / RUN_STATE).is_file():
                with contextlib.suppress(ValueError):
                    found.append((int(path.name[5:]), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    steps = checkpoint_steps(output_dir)
    return steps[-1][1] if steps else None


def write_checkpoint(output_dir: Path, step: int, run_state: dict, model, states: dict[str, dict],
                     base_model: str | None) -> Path:
    """Write one run checkpoint atomically and keep only the latest `KEEP_CHECKPOINTS`.

    Args:
        step: global steps done; names the folder.
        run_state: JSON-ready run state (dispatcher, finished, failed, seed, ...).
        model: the `MultiAdapterModel` holding every adapter in `states`.
        states: adapter name -> its trainer state (tensors and plain values; see `AdapterRun`).
    """
    target = checkpoint_dir(output_dir) / f"step-{step:08d}"
    with atomic_folder(target) as tmp:
        for name, state in states.items():
            save_adapter(model, name, tmp / name, base_model)
            torch.save(state, tmp / name / TRAINER_STATE)
        # Written last: a folder is a checkpoint only once its run state is in it.
        (tmp / RUN_STATE).write_text(json.dumps(run_state, indent=2) + "\n", encoding="utf-8")
    for _, old in checkpoint_steps(output_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_run_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / RUN_STATE).read_text(encoding="utf-8"))


def read_trainer_state(checkpoint: Path, name: str) -> dict:
    """The trainer state of adapter `name` in `checkpoint` (tensors on CPU)."""
    return torch.load(Path(checkpoint) / name / TRAINER_STATE, map_location="cpu", weights_only=True)


def remove_checkpoints(output_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir(output_dir), ignore_errors=True)


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def is_finished_adapter(folder: Path) -> bool:
    """True when `folder` holds a saved adapter (its config file is written with the weights)."""
    return (Path(folder) / "adapter_config.json").is_file()


def write_final_adapter(output_dir: Path, model, name: str, base_model: str | None, info: dict) -> Path:
    """Save adapter `name` to ``output_dir/<name>/`` atomically, with `info` as `TRAINING_INFO`."""
    target = Path(output_dir) / name
    with atomic_folder(target) as tmp:
        save_adapter(model, name, tmp, base_model)
        (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return target


def read_training_info(folder: Path) -> dict:
    path = Path(folder) / TRAINING_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
