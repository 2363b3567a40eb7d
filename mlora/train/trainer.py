"""Training many adapters over one frozen base: setup, the loop (`fit`), and `run_training`.

One global step of `fit`:

1. load waiting adapters until ``train_lora_candidate_num`` are active;
2. the dispatcher picks up to ``train_lora_simultaneously_num`` of them; each contributes its
   next micro-batch, laid out as contiguous rows of one padded batch;
3. one forward of the shared base over all rows (dropout seeded per global step);
4. each adapter's loss: summed token cross-entropy over its own loss-carrying tokens divided
   by the number of such tokens in its whole optimizer batch, plus the MixLoRA router loss.
   So an adapter's loss never depends on its neighbours, and the micro-batches of one batch
   add up to that batch's mean (batch 8 / micro 2 equals batch 8 / micro 8);
5. one backward of the sum (fp16: each adapter's loss times its own loss scale);
6. each adapter whose batch is complete clips and steps its own optimizer and scheduler; a
   non-finite loss or gradient skips that step, three in a row stop that adapter;
7. checkpoint when an adapter reaches a multiple of ``save_step`` or finishes; a finished
   adapter is saved to ``output_dir/<name>/`` and unloaded.

Ctrl-C (SIGINT) and SIGTERM (what Slurm, Kubernetes and systemd send before they kill a job)
finish the current step and write a resumable checkpoint; ``--resume`` continues from the
newest intact checkpoint and ends with the same weights as an uninterrupted run. Everything is
written through the run's `RunFolder`, which replaces only what this program created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlora.config import LoraConfig, RunConfig
from mlora.data import IGNORE_INDEX
from mlora.kernels.cross_entropy import token_cross_entropy
from mlora.model.adapted import MultiAdapterModel
from mlora.model.loading import load_base_model
from mlora.run_folder import RunFolder
from mlora.train import checkpoint as ckpt
from mlora.train import distributed, parallel
from mlora.train.data import (
    AdapterData,
    Position,
    Prepared,
    collate_mixed,
    micro_batches_per_epoch,
    mix_seed,
    read_examples,
    seed_of,
    step_seed,
    tokenize,
)
from mlora.train.dispatcher import Candidate, Dispatcher
from mlora.train.metrics import Progress, memory_gb
from mlora.train.setup import (
    TrainOptions,
    check_adapters,
    check_eval_data,
    log_prepared,
    resolve_device_dtype,
)
from mlora.train.state import AdapterRun

logger = logging.getLogger("mlora.train")

MAX_NAN_STREAK = 3  # consecutive non-finite steps after which an adapter is stopped


@dataclass
class AdapterSummary:
    """How one adapter's training ended.

    ``status``: ``finished`` (saved in `folder`), ``done-before`` (found finished on resume),
    ``failed`` (stopped; `message` says why), ``interrupted`` (state in the checkpoint),
    ``waiting`` (interrupted before it started). `steps` counts its optimizer steps.
    """

    name: str
    status: str
    folder: Path | None = None
    steps: int = 0
    final_loss: float | None = None
    metrics: Path | None = None
    message: str = ""


@dataclass
class TrainSummary:
    """What `run_training` did and where it put everything.

    `global_steps` counts the shared forward/backward passes (each serves up to
    ``train_lora_simultaneously_num`` adapters); each adapter's `steps` its optimizer steps.
    `signal` is the signal that stopped an interrupted run (SIGINT or SIGTERM), else None.
    `model` is the base model (adapters unloaded) and `tokenizer` its tokenizer, so that
    evaluation can reuse them instead of loading the base again.
    """

    output_dir: Path
    adapters: dict[str, AdapterSummary]
    interrupted: bool
    checkpoint: Path | None
    global_steps: int
    seconds: float
    tensorboard: Path | None = None
    signal: int | None = None
    model: MultiAdapterModel | None = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)

    def stop_status(self) -> int:
        """The exit status of a run stopped early: 128 + the signal, as shells report it (130
        for Ctrl-C, 143 for SIGTERM; 130 when stopped otherwise, e.g. ``stop_after_steps``)."""
        return 128 + int(self.signal if self.signal is not None else signal.SIGINT)

    def lines(self) -> list[str]:
        """A human-readable account, one line per item."""
        out = []
        for a in self.adapters.values():
            where = f" -> {a.folder}" if a.folder else ""
            loss = f", final loss {a.final_loss:.4f}" if a.final_loss is not None else ""
            note = f" ({a.message})" if a.message else ""
            out.append(f"{a.name}: {a.status}, {a.steps} optimizer step{'s' if a.steps != 1 else ''}{loss}{where}{note}")
            if a.metrics:
                out.append(f"  metrics: {a.metrics}")
        if self.tensorboard is not None:
            out.append(f"tensorboard: {self.tensorboard}")
        if self.checkpoint is not None:
            out.append(f"checkpoint: {self.checkpoint} (continue with --resume)")
        out.append(f"{self.global_steps} shared forward/backward step{'s' if self.global_steps != 1 else ''} over the "
                   f"base model in {self.seconds:.1f} s; output in {self.output_dir}")
        return out


@dataclass
class Run:
    """Everything `fit` works on: the model, the config, and the state of every adapter.

    `resume` says what the run started from; its ``restore`` set shrinks as each restored
    adapter is put back (`activate`). `parallel` spreads the steps over processes (one
    process: `parallel.Parallel`, which communicates nothing).
    """

    config: RunConfig
    options: TrainOptions
    folder: RunFolder
    resume: ckpt.Resume
    model: MultiAdapterModel
    tokenizer: object
    device: torch.device
    fp16: bool
    prepared: dict[str, Prepared]
    dispatcher: Dispatcher
    parallel: parallel.Parallel = field(default_factory=parallel.Parallel)
    active: dict[str, AdapterRun] = field(default_factory=dict)
    finished: dict[str, AdapterSummary] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    no_scoring: set[str] = field(default_factory=set)  # adapters whose evaluation failed
    stop_signal: int | None = None

    @property
    def seed(self) -> int:
        return self.resume.seed

    @property
    def run_id(self) -> str:
        return self.resume.run_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def cfg(self, name: str):
        return next(a for a in self.config.lora if a.name == name)


# ======================================================================= the training loop
def fit(run: Run, progress: Progress) -> bool:
    """Train until every adapter is done or a stop is requested (SIGINT, SIGTERM, ``stop_after_steps``).

    Returns True when stopped early (a resumable checkpoint has been written; `run.stop_signal`
    says which signal, if any, asked for it). Over several processes the hooks of
    `run.parallel` deal the data out and make gradients, flags and files agree (`mlora.train.parallel`).
    """
    config, options, par = run.config, run.options, run.parallel
    with _interrupt_guard(par.world is not None) as interrupt:
        while True:
            run.dispatcher.to_load(config.train_lora_candidate_num)
            for name in run.dispatcher.active:  # newly loaded, or restored from the checkpoint
                if name not in run.active:
                    run.active[name] = activate(run, name)
            stop, idle = par.agree_step(interrupt.signal, busy=bool(run.active))
            if idle:
                return False
            if stop is not None or (options.stop_after_steps is not None
                                    and run.dispatcher.step >= options.stop_after_steps):
                run.stop_signal = stop
                save_checkpoint(run)
                return True

            tic = time.perf_counter()
            chosen = choose_adapters(run)
            shares = {name: par.share(run.active[name]) for name in chosen}
            completing = [run.active[name] for name in chosen if shares[name].completes]
            tokens = sum(len(e.input_ids) for name, sh in shares.items() for pos in sh.positions
                         for e in run.active[name].examples_at(pos))  # every rank's micro-batches
            par.before_backward(completing)
            forward_backward(run, shares)
            par.after_backward(completing)

            checkpoint_due = False
            for name in chosen:
                ar = run.active[name]
                epoch = ar.position.epoch
                ar.position = shares[name].after
                if not shares[name].completes:
                    continue
                optimizer_step(ar, epoch)
                progress.adapter(name, ar.last_loss if ar.last_loss is not None else float("nan"), ar.lr())
                checkpoint_due |= config.save_step > 0 and ar.step % config.save_step == 0
                if ar.cfg.evaluate_steps and ar.step % ar.cfg.evaluate_steps == 0:
                    score_adapter(run, ar)
                if ar.nan_streak >= MAX_NAN_STREAK:
                    stop_adapter(run, ar, f"{MAX_NAN_STREAK} steps in a row had a non-finite loss or gradient "
                                 f"(last at step {ar.step}); lower lr, check the data, or use fp32/bf16")
                    progress.forget(name)
                elif ar.data.finished(ar.position):
                    finish_adapter(run, ar)
                    progress.forget(name)
                    # The queue changed: checkpoint so a resume rebuilds the same later batches.
                    checkpoint_due |= config.save_step > 0
            run.dispatcher.record(chosen)
            micro_batches = sum(len(sh.positions) for sh in shares.values())
            end = par.end_step(run, checkpoint_due, micro_batches, tokens, progress)
            elapsed = time.perf_counter() - tic
            progress.update(end.micro_batches, end.tokens / max(elapsed, 1e-9), memory_gb(run.device))
            if end.checkpoint_due and end.left:
                save_checkpoint(run)


def choose_adapters(run: Run) -> list[str]:
    """The adapters of the next step (the dispatcher's choice among the active ones), in row order."""
    if not run.active:
        return []  # adapter parallelism: this rank is done, the others are not
    candidates = []
    for name in run.dispatcher.active:
        examples = run.active[name].next_examples()
        candidates.append(Candidate(name, len(examples), max(len(e.input_ids) for e in examples)))
    return run.dispatcher.choose(candidates, run.config.train_lora_simultaneously_num, run.config.train_strategy)


def forward_backward(run: Run, shares: dict) -> None:
    """One forward of the shared base over this rank's micro-batch of each chosen adapter, the
    adapters' losses accumulated, one backward."""
    mine = {name: sh.mine for name, sh in shares.items() if sh.mine is not None}
    if not mine:
        if run.parallel.fsdp and shares:
            _idle_pass(run, shares)  # the sharded base's collectives need every rank's forward
        return
    batch = collate_mixed([(n, run.active[n].examples_at(pos), run.active[n].cfg.expand_side)
                           for n, pos in mine.items()], run.pad_id)
    labels = batch.labels.to(run.device)

    torch.manual_seed(step_seed(run.seed, run.dispatcher.step))
    # Each adapter draws its dropout masks and router jitter from its own stream, seeded by
    # its own data position: the same whichever adapters share the batch, and on resume.
    layout = dataclasses.replace(batch.layout, generators={n: adapter_generator(run.active[n], pos, run.device)
                                                           for n, pos in mine.items()})
    out = run.model(batch.input_ids.to(run.device), batch.attention_mask.to(run.device), layout)
    losses = token_losses(out.logits, labels)
    total = None
    for seg in layout.segments:
        ar = run.active[seg.name]
        rows = slice(seg.start, seg.end)
        ar.accum_tokens += int(batch.attention_mask[rows].sum())
        if ar.accum_bad:
            continue  # this batch's step is skipped anyway
        loss, aux = adapter_loss(ar, losses[rows], out.router_logits.get(seg.name), seg.end - seg.start)
        if not bool(torch.isfinite(loss + aux)):
            ar.accum_bad = True  # left out of the backward; its step will be skipped
            continue
        ar.accum_loss += loss.item()
        ar.accum_aux += aux.item()
        term = ar.scaler.scale(loss + aux)
        total = term if total is None else total + term
    if total is None and run.parallel.fsdp:
        total = _zero_term(out.logits)  # every rank runs backward through the sharded base
    if total is not None and total.requires_grad:
        total.backward()


def _idle_pass(run: Run, shares: dict) -> None:
    """A rank with no micro-batch in this step still runs a forward and backward through the
    sharded base (FSDP all-gathers its layers then, and every rank must take part): over the
    first chosen adapter's first micro-batch of the step, with a loss of exactly zero."""
    name, sh = next(iter(shares.items()))
    batch = collate_mixed([(name, run.active[name].examples_at(sh.positions[0]), run.active[name].cfg.expand_side)],
                          run.pad_id)
    layout = dataclasses.replace(batch.layout, generators={name: torch.Generator(device=run.device).manual_seed(0)})
    out = run.model(batch.input_ids.to(run.device), batch.attention_mask.to(run.device), layout)
    _zero_term(out.logits).backward()


def _zero_term(logits: torch.Tensor) -> torch.Tensor:
    # Zero times the finite logits: a backward through every layer that adds exactly 0 to each
    # gradient (a non-finite logit would turn 0 * x into NaN).
    return torch.where(torch.isfinite(logits), logits, 0).sum() * 0.0


def adapter_generator(ar: AdapterRun, pos: Position, device: torch.device) -> torch.Generator:
    """The random stream of one adapter's micro-batch at `pos`, a function of (adapter seed, data position)."""
    return torch.Generator(device=device).manual_seed(mix_seed(ar.seed, "dropout", pos.epoch, pos.batch, pos.micro))


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position of the whole batch, ``(B, T)`` fp32 (0 where no loss).

    Position t predicts token t + 1: the labels are shifted, not the logits, so the
    ``(B, T, V)`` logits are neither copied nor sliced per adapter (slicing them under autograd
    would give each adapter a full-size zero-filled gradient in backward).
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    vocab = logits.shape[-1]
    return token_cross_entropy(logits.reshape(-1, vocab), shifted.reshape(-1), IGNORE_INDEX).view(labels.shape)


def adapter_loss(ar: AdapterRun, token_loss: torch.Tensor, router_entries, rows: int):
    """One adapter's contribution from its rows of the batch.

    Args:
        token_loss: ``(b, T)`` this adapter's rows of `token_losses` (0 where no loss).
        router_entries: this adapter's MixLoRA router outputs (None for LoRA).
        rows: b, this micro-batch's rows.
    Returns:
        ``(loss, aux)`` fp32 scalars: the cross-entropy summed over the rows' target tokens
        divided by the target tokens of the whole optimizer batch, and the router loss
        weighted by the micro-batch's share of the batch's rows.
    """
    loss = token_loss.sum() / max(ar.data.batch_targets(ar.position), 1)
    aux = torch.zeros((), device=loss.device)
    if ar.cfg.is_moe and ar.cfg.router_loss and router_entries:
        from mlora.model.router import router_aux_loss

        share = rows / len(ar.data.batch_indices(ar.position))
        aux = router_aux_loss(ar.cfg, router_entries).float() * share
    return loss, aux


def optimizer_step(ar: AdapterRun, epoch: int) -> None:
    """Close the adapter's optimizer batch: step (or skip) its optimizer, advance its schedule, log."""
    params = list(ar.params.values())
    record = {"step": ar.step + 1, "epoch": epoch, "loss": ar.accum_loss, "aux_loss": ar.accum_aux, "lr": ar.lr(),
              "grad_norm": None, "tokens": ar.accum_tokens}
    skipped = None
    if ar.accum_bad:
        skipped = "nan_loss"
    else:
        ar.scaler.unscale_(ar.optimizer)
        max_norm = ar.cfg.max_grad_norm if ar.cfg.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            # With loss scaling an overflow is ordinary (back off, not a fault); without, a fault.
            skipped = "fp16_overflow" if ar.scaler.is_enabled() else "nan_grad"
        else:
            record["grad_norm"] = grad_norm
            ar.scaler.step(ar.optimizer)
        ar.scaler.update()  # backs the scale off after an overflow (a no-op without loss scaling)
    ar.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # A skipped step still advances the schedule (it follows the data); torch warns about that.
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step", category=UserWarning)
        ar.scheduler.step()
    ar.step += 1
    now = time.perf_counter()
    record["seconds"] = round(now - ar.clock, 6)
    ar.clock = now
    if skipped in ("nan_loss", "nan_grad"):
        ar.nan_streak += 1
        logger.warning("%s: step %d skipped: non-finite %s (%d in a row)", ar.name, ar.step,
                       "loss" if skipped == "nan_loss" else "gradient", ar.nan_streak)
    elif skipped is None:
        ar.nan_streak = 0
        ar.last_loss = ar.accum_loss
    if skipped:
        ar.metrics.event(ar.step, skipped, loss=ar.accum_loss, streak=ar.nan_streak, loss_scale=ar.scaler.get_scale())
    else:
        ar.metrics.step(record)
    ar.reset_accumulation()


def score_adapter(run: Run, ar: AdapterRun) -> None:
    """``evaluate_steps``: score the adapter on its benchmark tasks' evaluation split, log the accuracy.

    Scoring runs in eval mode without gradients and draws no random numbers, so it changes
    nothing the training computes. A failing evaluation is logged and turned off for this
    adapter; training goes on.
    """
    from mlora.evaluate import adapter_spec, evaluate

    spec = adapter_spec(ar.cfg)
    if spec is None or ar.name in run.no_scoring:
        return  # instruction data has no benchmark split to score
    try:
        results = evaluate(run.model, run.tokenizer, [spec], shard=run.parallel.scoring_shard())
    except Exception as err:  # noqa: BLE001 -- a scoring problem must not end the training run
        run.no_scoring.add(ar.name)
        logger.warning("%s: evaluation at step %d failed, no more evaluation during training: %s",
                       ar.name, ar.step, err)
        return
    for r in results.tasks:
        ar.metrics.event(ar.step, "eval", task=r.task, protocol=r.protocol, items=r.items, acc=r.acc,
                         acc_norm=r.acc_norm)
        logger.info("%s: step %d: %s %s accuracy %.4f (%d items)", ar.name, ar.step, r.task, r.protocol, r.acc,
                    r.items)


# ================================================================ adapters in and out
def activate(run: Run, name: str) -> AdapterRun:
    """Add adapter `name` to the model and build its training state (fresh or from the checkpoint)."""
    cfg = run.cfg(name)
    seed = seed_of(cfg, run.seed)
    restoring = name in run.resume.restore
    if restoring:
        state = ckpt.restore_adapter(run.model, run.resume, cfg)
    else:
        run.model.add_adapter(cfg, seed=seed)
    # A resumed adapter keeps its log up to the checkpoint; a fresh one starts a new log.
    metrics = run.parallel.metrics_log(run.folder, name, state["step"] if restoring else None)
    ar = AdapterRun.create(cfg, seed, run.prepared[name], run.model.adapter_parameters(name), run.fp16, metrics)
    if restoring:
        ar.load_state_dict(run.parallel.local_state(state))
        run.resume.restore.discard(name)
    run.parallel.activated(ar)
    logger.info("%s: training %d examples, %d optimizer steps (%s)%s", name, len(ar.data.examples),
                ar.data.total_steps, cfg.task_name, f", resumed at step {ar.step}" if restoring else "")
    return ar


def finish_adapter(run: Run, ar: AdapterRun) -> None:
    """Save a finished adapter to ``output_dir/<name>/`` and unload it."""
    info = {"run_id": run.run_id, "base_model": run.options.base_model, "seed": run.seed,
            "adapter_seed": ar.seed, "steps": ar.step,
            "epochs": ar.cfg.num_epochs, "examples": len(ar.data.examples),
            "truncated": ar.prepared.num_truncated, "final_loss": ar.last_loss}
    folder = run.parallel.write_final(run, ar.name, info)
    logger.info("%s: finished after %d steps (last loss %s); saved to %s", ar.name, ar.step,
                "n/a" if ar.last_loss is None else f"{ar.last_loss:.4f}", folder)
    run.finished[ar.name] = AdapterSummary(ar.name, "finished", folder, ar.step, ar.last_loss, ar.metrics.path)
    _unload(run, ar)


def stop_adapter(run: Run, ar: AdapterRun, message: str) -> None:
    """Stop a failing adapter (not saved as finished); the others go on."""
    logger.error("%s: stopped: %s", ar.name, message)
    ar.metrics.event(ar.step, "stopped", message=message)
    run.failed[ar.name] = message
    _unload(run, ar)


def _unload(run: Run, ar: AdapterRun) -> None:
    ar.metrics.close()
    run.parallel.unloaded(ar.name)
    run.model.remove_adapter(ar.name)
    run.dispatcher.retire(ar.name)
    del run.active[ar.name]


def save_checkpoint(run: Run) -> Path:
    """Snapshot every active adapter and the queue at the current global step."""
    state = {"format": 1, "run_id": run.run_id, "seed": run.seed, "global_step": run.dispatcher.step,
             "base_model": run.options.base_model, "dispatcher": run.dispatcher.state_dict(),
             "finished": sorted(run.finished), "failed": dict(run.failed),
             "positions": {name: dataclasses.asdict(ar.position) for name, ar in run.active.items()}}
    states = {name: ar.state_dict() for name, ar in run.active.items()}
    path = run.parallel.write_checkpoint(run, state, states)
    run.last_checkpoint = path
    logger.info("checkpoint: %s", path)
    return path


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# torchrun passes the Ctrl-C its terminal sent to every process on to them again: a second
# signal this soon after the first is that copy, not a request to abort.
RELAYED_SIGNAL_S = 2.0


@contextlib.contextmanager
def _interrupt_guard(launched: bool = False):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler preempting the job): finish the step and
    checkpoint; `signal` holds the first one received. A second signal aborts at once (under
    torchrun: one more than `RELAYED_SIGNAL_S` after the first; `launched`)."""

    class Flag:
        signal: int | None = None
        at: float = 0.0

    flag = Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(signum, frame):
        if flag.signal is not None:
            if launched and time.monotonic() - flag.at < RELAYED_SIGNAL_S:
                return
            raise KeyboardInterrupt
        flag.signal, flag.at = signum, time.monotonic()
        logger.warning("%s: finishing this step and saving a checkpoint (a second signal aborts without saving)",
                       signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_training(config: RunConfig, options: TrainOptions, folder: RunFolder | None = None,
                 world: distributed.World | None = None) -> TrainSummary:
    """Train every adapter of a `RunConfig`, save each to ``output_dir/<name>/``.

    The recipe: plan (what the output folder and ``--resume`` / ``--overwrite`` allow), data,
    model, then `fit`, then clean up and summarise. Problems found before training (outputs in
    the way, missing or empty data or evaluation splits, a base model that cannot be loaded, a
    target module the model lacks) raise an `MloraError` (`TrainError`, `FolderError`,
    `DataError`, `ModelLoadError`, `AdapterError`) before any step runs, and before
    ``--overwrite`` removes anything.

    Over several processes (`world`, from torchrun) every rank runs this same recipe; rank 0
    alone reads the folder's state (`plan_resume`, broadcast to the others) and writes, and a
    problem found on any rank before training stops all of them with one message.

    Args:
        folder: ``options.output_dir`` opened with `open_run_folder` by a caller that goes on
            using it (evaluation), or with `distributed.opened_folder` over several processes;
            None opens and locks it for this call.
        world: the process group torchrun started (`distributed.init_world`); None: one process.
    Returns:
        A `TrainSummary`; ``interrupted`` is True when stopped early with a checkpoint.
    """
    if folder is None:
        with distributed.opened_folder(options.output_dir, world) as opened:
            return run_training(config, options, opened, world)
    start = time.perf_counter()
    options = dataclasses.replace(options, device=distributed.rank_device(options.device, world))
    resume = distributed.on_leader(world, lambda: _plan(config, options, folder, world))
    todo = resume.todo(config)
    model, tokenizer, device, dtype, prepared = distributed.agree(
        world, lambda: _setup(config, options, todo, resume.seed, world))
    if options.overwrite and (world is None or world.leader):  # only now, with data, model and adapters checked
        _remove_earlier_outputs(config, folder)
    par = parallel.make_parallel(config, world, options.fsdp, resume, todo, prepared)
    run = Run(config, options, folder, resume, model, tokenizer, device, dtype == torch.float16, prepared,
              par.dispatcher(resume, todo), par, failed=dict(resume.failed))
    interrupted = _train(run, todo)
    if not interrupted and par.writes:
        ckpt.remove_checkpoints(folder)  # every adapter is done: the optimizer states are not needed
    distributed.barrier(world)  # what rank 0 wrote is complete before any rank reads it
    return _summary(run, interrupted, time.perf_counter() - start)


def _plan(config: RunConfig, options: TrainOptions, folder: RunFolder, world) -> ckpt.Resume:
    """What the flags and the output folder allow (`ckpt.plan_resume`), checked against the
    processes the run has (`parallel.check_options`, `parallel.check_resume`)."""
    parallel.check_options(config, options, world)
    resume = ckpt.plan_resume(config, options, folder, run_id=uuid.uuid4().hex)
    parallel.check_resume(resume, config.parallelism, world)
    return resume


def _setup(config: RunConfig, options: TrainOptions, todo: list[LoraConfig], seed: int, world):
    """Data, model, tokenized examples: ``(model, tokenizer, device, dtype, prepared)``."""
    raw = _setup_data(todo, seed)
    model, tokenizer, device, dtype = _setup_model(options, todo, seed, world)
    return model, tokenizer, device, dtype, _tokenize(todo, raw, tokenizer, config.cutoff_len)


def _setup_data(todo: list[LoraConfig], seed: int) -> dict[str, list]:
    """Every adapter's raw examples, and one item of every evaluation split the run will score:
    data problems surface before the (slow) model load."""
    # A multi-task mixture is shuffled by the run seed, or by the adapter's own `seed` when it
    # has one (its data order is then the adapter's alone, as a replica's must be).
    raw = {a.name: read_examples(a, seed if a.seed is None else a.seed) for a in todo}
    check_eval_data(todo)
    return raw


def _setup_model(options: TrainOptions, todo: list[LoraConfig], seed: int, world=None):
    """The frozen base as a `MultiAdapterModel`, every adapter test-injected once (target
    modules and ranks checked); returns ``(model, tokenizer, device, base dtype)``. With
    ``--fsdp`` the base is loaded on the CPU and sharded over the ranks onto `device`."""
    device, dtype = resolve_device_dtype(options)
    hf_model, tokenizer = load_base_model(options.base_model, dtype=dtype, quantize=options.quantize,
                                          device="cpu" if options.fsdp else device, attn_impl=options.attn_impl)
    model = MultiAdapterModel(hf_model)
    check_adapters(model, todo, seed)
    if options.fsdp:
        distributed.shard_base(hf_model, world, device)
    if options.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, tokenizer, device, dtype


def _tokenize(todo: list[LoraConfig], raw: dict[str, list], tokenizer, cutoff_len: int) -> dict[str, Prepared]:
    prepared = {}
    for a in todo:
        prepared[a.name] = tokenize(a, raw[a.name], tokenizer, cutoff_len)
        log_prepared(a.name, prepared[a.name], cutoff_len)
    return prepared


def _remove_earlier_outputs(config: RunConfig, folder: RunFolder) -> None:
    """``--overwrite``: the earlier run's checkpoints and this config's adapters, logs and
    TensorBoard events (only what mlora wrote; `plan_resume` refused anything else)."""
    ckpt.remove_checkpoints(folder)
    for a in config.lora:
        for path in folder.outputs_of(a.name):
            folder.remove(path)


def _train(run: Run, todo: list[LoraConfig]) -> bool:
    """`fit` with the progress bar, the RNG fork and the log redirection around it; returns
    whether the run stopped early."""
    total, initial = _progress_counts(run, todo)
    progress = Progress(total, initial, run.options.progress and run.parallel.writes)
    run.model.train()
    try:
        with _fork_rng(run.device), _redirect_logging(run.options.progress):
            return fit(run, progress)
    finally:
        progress.close()
        for ar in run.active.values():
            ar.metrics.close()
        run.parallel.close()
        run.model.eval()


def _summary(run: Run, interrupted: bool, seconds: float) -> TrainSummary:
    """How each adapter's training ended; unloads the adapters still active."""
    folder, summaries = run.folder, {}
    for a in run.config.lora:
        n = a.name
        if n in run.finished:
            summaries[n] = run.finished[n]
        elif n in run.failed:
            summaries[n] = AdapterSummary(n, "failed", metrics=folder.logs / f"{n}.jsonl", message=run.failed[n])
        elif n in run.active:
            ar = run.active[n]
            summaries[n] = AdapterSummary(n, "interrupted", steps=ar.step, final_loss=ar.last_loss,
                                          metrics=ar.metrics.path)
        elif n in run.resume.finished:
            info = ckpt.read_training_info(folder.adapter(n))
            summaries[n] = AdapterSummary(n, "done-before", folder.adapter(n), info.get("steps", 0),
                                          info.get("final_loss"))
        else:
            summaries[n] = AdapterSummary(n, "waiting")
    for name in list(run.active):
        run.model.remove_adapter(name)
    summaries = run.parallel.merge_summaries(summaries)  # adapter parallelism: each from its rank
    return TrainSummary(run.options.output_dir, summaries, interrupted, run.last_checkpoint if interrupted else None,
                        run.dispatcher.step, seconds, folder.tensorboard if folder.tensorboard.is_dir() else None,
                        run.stop_signal, run.model, run.tokenizer)


def _progress_counts(run: Run, todo: list[LoraConfig]) -> tuple[int, int]:
    """(total, already done) micro-batches over the adapters this run trains, for the bar."""
    total = initial = 0
    for a in todo:
        n = len(run.prepared[a.name].examples)
        total += a.num_epochs * micro_batches_per_epoch(n, a.batch_size, a.micro_batch_size)
        if a.name in run.resume.restore:
            data = AdapterData(run.prepared[a.name].examples, batch_size=a.batch_size,
                               micro_batch_size=a.micro_batch_size, num_epochs=a.num_epochs,
                               group_by_length=False, seed=0)
            initial += data.micro_batches_done(Position(**run.resume.positions[a.name]))
    return total, initial


@contextlib.contextmanager
def _fork_rng(device: torch.device):
    """Per-step seeding must not leak into the caller's global RNG."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def _redirect_logging(enabled: bool):
    if not enabled:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Log lines go above the bar instead of through it; only loggers that print to the console
    # are redirected (redirecting one without a handler would add one and print lines twice).
    consoles = [lg for lg in (logging.root, logging.getLogger("mlora"))
                if any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
                       for h in lg.handlers)]
    with logging_redirect_tqdm(loggers=consoles):
        yield
