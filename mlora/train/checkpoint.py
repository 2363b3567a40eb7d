"""Checkpoints of a run and the final adapter folders, in a `RunFolder`.

Layout (see `mlora.run_folder`)::

    <root>/<name>/                          final adapter (PEFT / MixLoRA files + mlora_training.json)
    <root>/_mlora/checkpoints/step-00000012/  one consistent snapshot after global step 12
        run_state.json                      dispatcher queue, finished/failed adapters, seed, run id
        <name>/                             per active adapter: its adapter files (loadable as an
            trainer_state.pt                adapter) + optimizer, scheduler, loss scale, data
                                            position, partial gradients of an unfinished accumulation
        manifest.json                       size and SHA-256 of every file above; written last

A checkpoint snapshots every active adapter at the same global step, not each adapter on its
own: the adapters of one step share a padded batch, so only a consistent cut lets a resumed
run rebuild exactly the same batches (and so end with bit-identical weights). Each is written
into a temporary folder and renamed into place, and its manifest is written last: a folder
whose files do not match its manifest (truncated, edited, missing, or no manifest at all) is
damaged, and `--resume` falls back to the newest intact one (`KEEP_CHECKPOINTS` are kept).

Resuming lives here, in one place: `plan_resume` checks the output folder against the flags and
reads what an earlier run left (the newest intact checkpoint, the adapters it finished or
stopped), and `restore_adapter` puts one adapter back as the checkpoint holds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mlora.io import save_adapter
from mlora.run_folder import RunFolder
from mlora.train.data import TrainError

if TYPE_CHECKING:
    from mlora.config import LoraConfig, RunConfig
    from mlora.model.adapted import MultiAdapterModel
    from mlora.train.setup import TrainOptions

logger = logging.getLogger("mlora.train")

RUN_STATE = "run_state.json"
TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_MANIFEST = "manifest.json"
TRAINING_INFO = "mlora_training.json"
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder; `problem` says why it is damaged (None: intact)."""

    step: int
    path: Path
    problem: str | None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / CHECKPOINT_MANIFEST)


def _write_manifest(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(folder)}
    (folder / CHECKPOINT_MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n",
                                              encoding="utf-8")


def verify(folder: Path) -> str | None:
    """What is wrong with checkpoint `folder` (None when every file matches its manifest)."""
    try:
        doc = json.loads((folder / CHECKPOINT_MANIFEST).read_text(encoding="utf-8"))
        expected = doc["files"]
        if not isinstance(expected, dict):
            raise TypeError
    except FileNotFoundError:
        return f"no {CHECKPOINT_MANIFEST} (the checkpoint was not finished)"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{CHECKPOINT_MANIFEST} is damaged"
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    for rel, meta in expected.items():
        path = present.get(rel)
        if path is None:
            return f"{rel} is missing"
        if path.stat().st_size != meta.get("size"):
            return f"{rel} has {path.stat().st_size} bytes, {meta.get('size')} were written"
        if _sha256(path) != meta.get("sha256"):
            return f"{rel} differs from what was written (checksum)"
    extra = sorted(set(present) - set(expected))
    if extra:
        return f"{extra[0]} was not part of the checkpoint"
    if RUN_STATE not in expected:
        return f"{RUN_STATE} is missing"
    return None


def checkpoints(folder: RunFolder) -> list[Checkpoint]:
    """Every checkpoint folder of the run (intact or damaged), oldest first. One that is not as
    this program wrote it (per the run manifest) counts as damaged and is never deleted."""
    found = []
    if folder.checkpoints.is_dir():
        for path in folder.checkpoints.iterdir():
            if path.is_dir() and path.name.startswith("step-") and path.name[5:].isdigit():
                found.append((int(path.name[5:]), path))
    return [Checkpoint(step, path, verify(path) if folder.owns(path) else "changed since mlora wrote it")
            for step, path in sorted(found)]


def latest_intact(folder: RunFolder) -> Path | None:
    """The newest intact checkpoint; each newer damaged one is reported as it is skipped.

    Raises `TrainError` when checkpoints exist but none is intact."""
    found = checkpoints(folder)
    for cp in reversed(found):
        if cp.problem is None:
            return cp.path
        logger.warning("checkpoint %s is damaged (%s); trying the one before it", cp.path, cp.problem)
    if found:
        raise TrainError(f"no intact checkpoint in {folder.checkpoints} ("
                         + "; ".join(f"{cp.path.name}: {cp.problem}" for cp in found)
                         + "); start over with --overwrite")
    return None


def checkpoint_dir(folder: RunFolder, step: int) -> Path:
    """Where the checkpoint after global step `step` goes."""
    return folder.checkpoints / f"step-{step:08d}"


def _write_adapter_files(model, name: str, target: Path, base_model: str | None,
                         files: dict[str, dict[str, bytes]] | None) -> None:
    """Adapter `name` into `target`: saved from `model`, or, for an adapter another process
    trained (``files[name]``: relative path -> contents), its files as that process wrote them."""
    if files is None or name not in files:
        save_adapter(model, name, target, base_model)
        return
    for rel, data in files[name].items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)


def write_checkpoint(folder: RunFolder, step: int, run_state: dict, model, states: dict[str, dict],
                     base_model: str | None, files: dict[str, dict[str, bytes]] | None = None) -> Path:
    """Write one run checkpoint atomically and keep only the latest `KEEP_CHECKPOINTS` intact ones.

    Args:
        step: global steps done; names the folder.
        run_state: JSON-ready run state (dispatcher, finished, failed, seed, ...).
        model: the `MultiAdapterModel` holding every adapter in `states` not in `files`.
        states: adapter name -> its trainer state (tensors and plain values; see `AdapterRun`).
        files: adapter name -> its adapter files (relative path -> bytes) for adapters that
            live in another process (``parallelism: adapter``).
    """
    target = checkpoint_dir(folder, step)
    with folder.replace_dir(target) as tmp:
        for name, state in states.items():
            _write_adapter_files(model, name, tmp / name, base_model, files)
            torch.save(state, tmp / name / TRAINER_STATE)
        (tmp / RUN_STATE).write_text(json.dumps(run_state, indent=2) + "\n", encoding="utf-8")
        _write_manifest(tmp)  # last: a checkpoint is intact only once its manifest is in it
    found = checkpoints(folder)
    kept = [cp.step for cp in found if cp.problem is None][-KEEP_CHECKPOINTS:]
    for cp in found:
        if cp.step < kept[0] and folder.owns(cp.path):  # older than every kept intact one: never needed again
            folder.remove(cp.path)
    return target


def remove_checkpoints(folder: RunFolder) -> None:
    """Delete the run's checkpoints (only folders this program wrote)."""
    for cp in checkpoints(folder):
        if folder.owns(cp.path):
            folder.remove(cp.path)


def read_run_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((Path(checkpoint) / RUN_STATE).read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise TypeError
        return state
    except (OSError, ValueError, TypeError) as err:
        raise TrainError(f"{Path(checkpoint) / RUN_STATE} cannot be read ({err}); start over with --overwrite") from None


def read_trainer_state(checkpoint: Path, name: str) -> dict:
    """The trainer state of adapter `name` in `checkpoint` (tensors on CPU)."""
    path = Path(checkpoint) / name / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- a damaged pickle surfaces as many types
        raise TrainError(f"{path} cannot be read ({type(err).__name__}: {err}); "
                         "start over with --overwrite") from None


def is_finished_adapter(folder: RunFolder, name: str) -> bool:
    """True when the run saved adapter `name` (a folder of its own with its config file)."""
    path = folder.adapter(name)
    return (path / "adapter_config.json").is_file() and folder.owns(path)


def write_final_adapter(folder: RunFolder, model, name: str, base_model: str | None, info: dict,
                        files: dict[str, bytes] | None = None) -> Path:
    """Save adapter `name` to ``<root>/<name>/`` atomically, with `info` as `TRAINING_INFO`;
    `files` (relative path -> bytes) instead of `model` for an adapter trained in another process."""
    target = folder.adapter(name)
    with folder.replace_dir(target) as tmp:
        _write_adapter_files(model, name, tmp, base_model, None if files is None else {name: files})
        (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return target


def read_training_info(folder: Path) -> dict:
    path = Path(folder) / TRAINING_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}


# ====================================================================== resuming a run
@dataclass
class Resume:
    """What a run starts from: nothing (a fresh run), or what an earlier run left in the folder.

    Attributes:
        checkpoint: the newest intact checkpoint, or None (nothing to restore).
        seed: the run seed (the checkpoint's wins over ``--seed``).
        run_id: the run's id (a new one for a fresh run).
        restore: adapters active in the checkpoint; they continue mid-training.
        finished: adapters saved by the earlier run; not trained again.
        failed: adapters the earlier run stopped (name -> why); not trained again.
        positions: each restored adapter's data position (for the progress bar).
        dispatcher: the checkpoint's dispatcher state (None for a fresh run).
        distributed: how the checkpoint's run was spread over processes (``parallelism``,
            ``world_size``, per-rank state; `mlora.train.parallel`); None for one process.
    """

    checkpoint: Path | None
    seed: int
    run_id: str
    restore: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    positions: dict[str, dict] = field(default_factory=dict)
    dispatcher: dict | None = None
    distributed: dict | None = None

    def todo(self, config: RunConfig) -> list[LoraConfig]:
        """The adapters of `config` this run trains (restored ones included), in config order."""
        return [a for a in config.lora if a.name not in self.finished and a.name not in self.failed]


def plan_resume(config: RunConfig, options: TrainOptions, folder: RunFolder, run_id: str) -> Resume:
    """Check the output folder against the flags, then read what a ``--resume`` continues from.

    Raises:
        FolderError: a path the run would write (an adapter's folder, log or TensorBoard
            events) exists and was not written by mlora: it is never replaced, whatever the flags.
        TrainError: finished adapters or an unfinished run would be replaced without
            ``--overwrite``; ``--resume`` finds only damaged checkpoints, or a checkpoint that
            trains adapters the config no longer lists.
    """
    if options.resume and options.overwrite:
        raise TrainError("give --resume (continue the run in --output_dir) or --overwrite (start over), not both")
    outputs = [path for a in config.lora for path in folder.outputs_of(a.name)]
    for path in outputs:
        folder.check_replaceable(path)
    if options.overwrite:
        return Resume(None, options.seed, run_id)
    if not options.resume:
        found = checkpoints(folder)
        if found:
            raise TrainError(f"{folder.root} holds a checkpoint of an unfinished run ({found[-1].path}); pass "
                             "--resume to continue it, --overwrite to start over, or choose another --output_dir")
        taken = [str(path) for path in outputs if path.exists()]
        if taken:
            raise TrainError(f"{folder.root} already holds {', '.join(taken)} from an earlier run; pass --overwrite "
                             "to replace them, --resume to train only the adapters not finished yet, or choose "
                             "another --output_dir")
        return Resume(None, options.seed, run_id)

    saved = {a.name for a in config.lora if is_finished_adapter(folder, a.name)}
    checkpoint = latest_intact(folder)
    if checkpoint is None:
        logger.info("no checkpoint in %s: training what is not finished from the beginning", folder.root)
        return Resume(None, options.seed, run_id, finished=saved)
    state = read_run_state(checkpoint)
    if state["seed"] != options.seed:
        logger.warning("resuming with the run's seed %d (--seed %d ignored)", state["seed"], options.seed)
    if state["base_model"] != options.base_model:
        logger.warning("the run was started on base model %s; resuming on %s", state["base_model"], options.base_model)
    restore = set(state["dispatcher"]["active"])
    missing = sorted(restore - {a.name for a in config.lora})
    if missing:
        raise TrainError(f"the checkpoint {checkpoint} trains adapter(s) {', '.join(missing)} that the config no "
                         "longer lists; resume with the config the run was started with")
    logger.info("resuming from %s (global step %d)", checkpoint, state["dispatcher"]["step"])
    return Resume(checkpoint, state["seed"], state["run_id"], restore, (saved | set(state["finished"])) - restore,
                  dict(state["failed"]), state["positions"], state["dispatcher"], state.get("distributed"))


def restore_adapter(model: MultiAdapterModel, resume: Resume, cfg: LoraConfig) -> dict:
    """Load adapter `cfg.name` from the checkpoint into `model`; returns its trainer state
    (for `AdapterRun.load_state_dict`)."""
    from mlora.io import load_adapter

    state = read_trainer_state(resume.checkpoint, cfg.name)
    load_adapter(model, resume.checkpoint / cfg.name, cfg)
    return state
