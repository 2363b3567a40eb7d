"""Command line of mlora: ``gen``, ``run``, ``evaluate``, ``plot`` and ``avail`` (launch.py) and ``train.py CONFIG``.

Each subcommand is one small function taking the parsed arguments and returning an exit status:
0 done, 1 some adapter stopped during training, 2 bad input (config problems, bad flags, missing
data or model, files in the way; a one-line message, no traceback), 130 / 143 stopped by SIGINT
/ SIGTERM (during training a checkpoint was saved; continue with --resume).
This module imports only the standard library and ``mlora.config``, so a config is validated
before torch or a model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
from pathlib import Path
from typing import Literal, Optional, Sequence, get_args, get_origin, get_type_hints

from mlora.config import (
    DTYPE_NAMES,
    ConfigError,
    LoraConfig,
    MixLoraConfig,
    RunConfig,
    load_config,
    split_list,
    to_dict,
)
from mlora.errors import MloraError
from mlora.run_folder import atomic_write_text
from mlora.runtime import tune_cpu_allocator

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRAIN_FAILED = 1

DEFAULT_CONFIG = "mlora.json"


class UsageError(MloraError):
    """Bad command-line input the user can fix; printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------ helpers


def _bool(text: str) -> bool:
    """argparse type for booleans written as True/False, true/false or 1/0."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True or False (also true/false/1/0), got {text!r}")
    return value


def _list_of(typ, choices: Sequence[str] | None = None):
    """argparse type for a per-adapter override: one value, or a comma list of values to sweep
    (``8,16,32``), each converted by `typ` and checked against `choices`."""

    def parse(text: str) -> list:
        values = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                raise argparse.ArgumentTypeError(f"empty value in {text!r}; give one value or a comma list such as 8,16")
            try:
                value = typ(part)
            except (argparse.ArgumentTypeError, ValueError) as err:
                detail = str(err) if isinstance(err, argparse.ArgumentTypeError) else f"invalid value {part!r}"
                raise argparse.ArgumentTypeError(detail) from None
            if choices and value not in choices:
                raise argparse.ArgumentTypeError(f"invalid choice {part!r} (choose from {', '.join(choices)})")
            values.append(value)
        return values

    parse.__name__ = getattr(typ, "__name__", "value")  # argparse names the type in its messages
    return parse


def _print_config_error(err: ConfigError, what: str = "in the config") -> None:
    count = len(err.problems)
    print(f"error: {count} problem{'s' if count != 1 else ''} {what}:", file=sys.stderr)
    for line in str(err).splitlines():
        print(f"  {line}", file=sys.stderr)


def _describe_adapter(a: LoraConfig) -> str:
    kind = "DoRA" if a.use_dora else "LoRA"
    if isinstance(a, MixLoraConfig):
        kind = "MixDoRA" if a.use_dora else "MixLoRA"
        route = {
            "mixlora": f"top-{a.top_k} routing",
            "mixlora-switch": f"switch top-1 routing, capacity {a.expert_capacity}",
            "mixlora-dynamic": f"dynamic top-p {a.top_p} routing",
        }[a.routing_strategy]
        kind += f", {a.num_experts} experts, {route}"
    return f"{kind}, r={a.r}, alpha={a.lora_alpha:g}, lr={a.lr:g}"


# --------------------------------------------------------------------------------- subcommands

# gen's per-adapter overrides: (flag, config key, type, extra option strings m-LoRA users know).
_ADAPTER_OVERRIDES = [
    ("--r", "r", int, ()),
    ("--lora_alpha", "lora_alpha", float, ()),
    ("--lora_dropout", "lora_dropout", float, ()),
    ("--lr", "lr", float, ("--learning_rate",)),
    ("--batch_size", "batch_size", int, ()),
    ("--micro_batch_size", "micro_batch_size", int, ()),
    ("--evaluate_batch_size", "evaluate_batch_size", int, ()),
    ("--num_epochs", "num_epochs", int, ()),
    ("--scheduler_type", "scheduler_type", str, ("--lr_scheduler",)),  # choices come from the dataclass
    ("--warmup_steps", "warmup_steps", int, ()),
    ("--evaluate_steps", "evaluate_steps", int, ()),
    ("--loraplus_lr_ratio", "loraplus_lr_ratio", float, ()),
    ("--use_dora", "use_dora", _bool, ()),
    ("--use_rslora", "use_rslora", _bool, ()),
    ("--group_by_length", "group_by_length", _bool, ()),
    ("--protocol", "protocol", str, ()),
    ("--prompt", "prompt", str, ("--prompt_template",)),
]
_RUN_OVERRIDES = [
    ("--cutoff_len", "cutoff_len", int),
    ("--save_step", "save_step", int),
    ("--train_lora_candidate_num", "train_lora_candidate_num", int),
    ("--train_lora_simultaneously_num", "train_lora_simultaneously_num", int),
    ("--eval_lora_simultaneously_num", "eval_lora_simultaneously_num", int),
]


def cmd_gen(args: argparse.Namespace) -> int:
    """Write a fully resolved run config from a template and a list of tasks."""
    from mlora.gen import generate_config
    from mlora.sweep import format_value

    if args.append and args.overwrite:
        raise UsageError("give --append or --overwrite, not both")
    out = Path(args.file_name)
    if out.is_dir():
        raise UsageError(f"--file_name {out} is a folder; give the path of a .json file to write")
    if not out.parent.is_dir():
        raise UsageError(f"--file_name {out}: folder {out.parent} does not exist; create it first or choose "
                         "another path")
    if out.exists() and not (args.append or args.overwrite):
        raise UsageError(f"{out} already exists; pass --overwrite to replace it or --append to add adapters to it")
    if args.append and not out.exists():
        raise UsageError(f"cannot append: {out} does not exist; drop --append to create it")
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be a number of replicas >= 1, got {args.seeds}")
    if args.first_seed is not None and args.seeds is None:
        raise UsageError("--first_seed needs --seeds N (the number of replicas)")
    if args.first_seed is not None and args.first_seed < 0:
        raise UsageError(f"--first_seed must be a seed >= 0, got {args.first_seed}")
    base = load_config(out) if args.append else None
    given = {key: getattr(args, key) for _, key, _, _ in _ADAPTER_OVERRIDES if getattr(args, key) is not None}
    adapter_overrides = {key: values[0] for key, values in given.items() if len(values) == 1}
    grid = {key: values for key, values in given.items() if len(values) > 1}
    first = args.first_seed or 0
    seeds = None if args.seeds is None else list(range(first, first + args.seeds))
    run_overrides = {key: getattr(args, key) for _, key, _ in _RUN_OVERRIDES if getattr(args, key) is not None}
    tasks = [] if args.tasks is None else split_list(args.tasks)
    data_paths = None if args.data_path is None else split_list(args.data_path)
    try:
        cfg = generate_config(args.template, tasks, data_paths=data_paths,
                              multi_task=args.multi_task, adapter_name=args.adapter_name,
                              adapter_overrides=adapter_overrides, run_overrides=run_overrides, base=base,
                              grid=grid, seeds=seeds, source=str(out))
    except ConfigError as err:
        if err.source != str(out):
            raise  # the template or the file appended to: reported as that file's problems
        _print_config_error(err, "in the config gen would write (nothing was written)")
        return EXIT_BAD_INPUT
    atomic_write_text(out, json.dumps(to_dict(cfg), indent=4) + "\n")  # never a half-written config
    names = cfg.adapter_names
    shown = ", ".join(names if len(names) <= 10 else [*names[:3], "...", *names[-2:]])
    print(f"wrote {out}: {len(cfg.lora)} adapter{'s' if len(cfg.lora) != 1 else ''} ({shown})")
    if grid or seeds is not None:
        added = len(cfg.lora) - (len(base.lora) if base is not None else 0)
        axes = [f"{key} {','.join(map(format_value, values))}" for key, values in grid.items()]
        if seeds is not None:
            axes.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({','.join(map(str, seeds))})")
        print(f"sweep: {' x '.join(axes)}: {added} adapters, trained {cfg.train_lora_simultaneously_num} at a time "
              "over the shared base (--train_lora_simultaneously_num and --train_lora_candidate_num change it)")
    print(f"next: python launch.py run --config {out} --base_model <hub id | model folder | .gguf file>")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    """Redraw the charts of a run's output folder: accuracy per configuration (mean, spread over
    seeds, each replica) from its results, and the training loss curves from its metrics logs."""
    from mlora.plot import redraw

    for path in redraw(args.output_dir, stem=args.results):
        print(f"wrote {path}")
    return EXIT_OK


def cmd_avail(args: argparse.Namespace) -> int:
    """List the templates (with what each trains) and the task names gen accepts."""
    from mlora.gen import benchmark_tasks, read_template, template_names

    print("templates (python launch.py gen --template NAME):")
    for name in template_names():
        print(f"  {name:<16} {'; '.join(_describe_adapter(a) for a in read_template(name).lora)}")
    print("tasks (--tasks 'a;b;c'):")
    for task in benchmark_tasks():
        print(f"  {task}")
    print("  any other name of a data set (owner/name hub id, local json/jsonl/parquet file, or a name")
    print("  given --data_path) trains on instruction data ('casual' task, alpaca prompt)")
    return EXIT_OK


def _config_and_base_model(args: argparse.Namespace) -> Optional[RunConfig]:
    """The validated run config of `run` / `evaluate`, or None after printing every problem
    (config errors and a missing --base_model together)."""
    problems: Optional[ConfigError] = None
    try:
        cfg: Optional[RunConfig] = load_config(args.config)
    except ConfigError as err:
        problems, cfg = err, None
    if problems is not None:
        _print_config_error(problems)
    if not args.base_model:
        print("error: --base_model is required (a hub id, a local model folder or a .gguf file)", file=sys.stderr)
    return None if problems is not None or not args.base_model else cfg


def _torchrun_rank() -> int:
    """This process's rank under torchrun (0 without it); read before torch is imported."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Validate the config, then train every adapter in it, save them and say where they went.

    Exit status: 0 all adapters trained, 1 some adapter stopped (non-finite losses), 2 bad input
    found before training (config, flags, data, base model, target modules, existing outputs),
    130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM (a checkpoint was saved; continue with --resume).
    Under torchrun every process runs this; rank 0 alone prints, writes and reports problems.
    """
    leader = _torchrun_rank() == 0
    with contextlib.nullcontext() if leader else contextlib.redirect_stderr(io.StringIO()):
        cfg = _config_and_base_model(args)  # the same file on every rank: rank 0 reports
    if cfg is None:
        return EXIT_BAD_INPUT
    if leader:
        print(f"{args.config}: valid, {len(cfg.lora)} adapter(s):")
        for a in cfg.lora:
            print(f"  {a.name}: {a.task_name} ({_describe_adapter(a)})")
        sys.stdout.flush()

    # Imported here: validating a config must not pay for torch.
    from mlora.train import TrainOptions, console_logging, distributed

    options = TrainOptions.from_args(args)
    world = distributed.init_world(options.device, options.dist_timeout)
    console_logging(rank=None if world is None else world.rank)
    if world is None:
        return _train_and_evaluate(args, cfg, options, None)
    try:
        return _train_and_evaluate(args, cfg, options, world)
    except distributed.FollowerStop:
        return EXIT_BAD_INPUT  # rank 0 reported the problem
    except MloraError as err:
        if world.leader:
            raise
        print(f"error: rank {world.rank}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 -- name this rank; the launcher ends the others
        if distributed.peer_lost(err):
            message = distributed.lost_contact(world, err)
        else:
            import traceback

            traceback.print_exc()
            message = f"rank {world.rank}: {type(err).__name__}: {err}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_TRAIN_FAILED
    finally:
        distributed.close_world(world)


def _train_and_evaluate(args: argparse.Namespace, cfg: RunConfig, options, world) -> int:
    """`run` after validation: train in the output folder (rank 0 holds its lock), print the
    summary, score the finished adapters (each rank its share of the forwards)."""
    from mlora.evaluate import Shard, evaluate_trained
    from mlora.train import distributed, run_training

    leader = world is None or world.leader
    with distributed.opened_folder(options.output_dir, world) as folder:  # one command in the folder at a time
        summary = run_training(cfg, options, folder, world)
        if leader:
            for line in summary.lines():
                print(line)
        if summary.interrupted:
            return summary.stop_status()
        failed = [a.name for a in summary.adapters.values() if a.status == "failed"]
        status = EXIT_TRAIN_FAILED if failed else EXIT_OK
        shard = None if world is None else Shard(world.rank, world.size, lockstep=options.fsdp)
        try:
            results = evaluate_trained(summary, cfg, args.base_model, folder=folder, shard=shard, charts=True)
            if results is None and leader:  # nothing scored (instruction data): the loss curves alone
                from mlora.evaluate.replicas import group_replicas
                from mlora.plot import draw_charts_or_say_why

                groups = [(c.label, c.adapters) for c in group_replicas(cfg.lora)]
                draw_charts_or_say_why(folder, results=None, adapters=cfg.adapter_names, groups=groups)
        except MloraError as err:
            if leader:
                print(f"error: evaluation: {err} (the trained adapters are saved in {summary.output_dir}; once this "
                      "is fixed, score them with `python launch.py evaluate`)", file=sys.stderr)  # fmt: skip
            return status or EXIT_BAD_INPUT
    return status


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score saved adapters (or, with --adapter base, the bare base model) on their benchmark tasks,
    print the table and save it as JSON and CSV into --output_dir."""
    cfg = _config_and_base_model(args)
    if cfg is None:
        return EXIT_BAD_INPUT
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a positive number of items per task, got {args.limit}")

    from mlora.evaluate import evaluate_saved, plan_evaluation
    from mlora.run_folder import open_run_folder

    adapters = [args.adapter] if args.adapter else None
    plan_evaluation(cfg, args.output_dir, adapters)  # a wrong --output_dir fails before anything is written
    with open_run_folder(args.output_dir) as folder:
        evaluate_saved(args.base_model, cfg, args.output_dir, adapters=adapters,
                       protocol=args.protocol, limit=args.limit, dtype=args.dtype, quantize=args.quantize,
                       device=args.device, folder=folder, charts=True)  # fmt: skip
    return EXIT_OK


# ------------------------------------------------------------------------------------ parsers


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Train a LoRA and a MixLoRA adapter together on built-in sample data over a real pretrained
    model (SmolLM2-135M-Instruct by default), score them and the base model, print one table."""
    import logging

    from mlora.quickstart import run_quickstart

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run_quickstart(args)


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold a saved LoRA or DoRA adapter into a copy of its base weights and save a plain
    transformers model (and tokenizer) that needs no mlora to load."""
    from mlora.io import AdapterFileError, load_adapter, merged_model, read_adapter_config
    from mlora.model.adapted import MultiAdapterModel
    from mlora.model.loading import load_base_model

    cfg, stored = read_adapter_config(args.adapter)
    base = args.base_model or stored
    if not base:
        raise AdapterFileError(f"{args.adapter}: adapter_config.json names no base model; pass --base_model")
    if cfg.is_moe:
        raise AdapterFileError(f"{args.adapter} is a MixLoRA adapter: routed experts cannot be folded into dense "
                               "weights; load it with MixLoraModelForCausalLM.from_pretrained instead")
    out = _merge_target(Path(args.output_dir), base, args.overwrite)  # before the (slow) model load
    model, tokenizer = load_base_model(base, dtype=args.dtype, device="cpu")
    adapted = MultiAdapterModel(model)
    load_adapter(adapted, args.adapter, cfg)
    merged = merged_model(adapted, cfg.name)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged {args.adapter} into {base}: {out}")
    return EXIT_OK


def _merge_target(out: Path, base: str, overwrite: bool) -> Path:
    """Check `merge`'s output folder: never the base model's own folder (its weights would be
    replaced by the merged ones), and an existing non-empty folder only with --overwrite."""
    base_path = Path(base).expanduser()
    base_dir = base_path.parent if base_path.is_file() else base_path
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file; give a folder for the merged model")
    if base_dir.is_dir() and out.resolve() == base_dir.resolve():
        raise UsageError(f"--output_dir {out} is the base model's own folder: merging there would replace its "
                         "weights; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--output_dir {out} is not empty; choose an empty or new folder, or pass --overwrite to "
                         "write the merged model's files into it (files of the same name are replaced)")
    return out


def _help_of(key: str) -> str:
    fields = {f.name: f for f in dataclasses.fields(MixLoraConfig)}
    fields.update({f.name: f for f in dataclasses.fields(RunConfig)})
    return fields[key].metadata["help"]


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags shared by `launch.py run` and `train.py`."""
    p.add_argument("--base_model", help="Base model: hub id, local model folder, or .gguf file (required).")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="Compute dtype of the frozen base model "
                   "(default: bf16 on a CUDA GPU that supports it, else fp32).")  # fmt: skip
    p.add_argument("--quantize", choices=["4bit", "8bit"], help="Load the base model quantized with bitsandbytes.")
    p.add_argument("--device", help="Device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu).")
    p.add_argument("--output_dir", default="./output", help="Where adapters, checkpoints and results go (default: ./output).")
    p.add_argument("--seed", type=int, default=42, help="Random seed (default: 42).")
    p.add_argument("--resume", action="store_true", help="Resume each adapter from its latest checkpoint in --output_dir.")
    p.add_argument("--overwrite", action="store_true", help="Replace existing adapter folders in --output_dir.")
    p.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    p.add_argument("--attn_impl", help="Attention implementation: eager, sdpa or flash_attention_2 (default: the model's).")
    p.add_argument("--fsdp", action="store_true", help="Under torchrun: shard the frozen base over the processes "
                   "(FSDP2, one unit per decoder layer); parallelism 'data' only.")  # fmt: skip
    p.add_argument("--dist_timeout", type=float, metavar="SECONDS",
                   help="Under torchrun: how long a process waits for the others in any collective before the run "
                   "stops with an error naming it (default: 30 minutes).")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The `launch.py` parser with its gen, run and avail subcommands."""
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Fine-tune many LoRA, DoRA, MixLoRA and MixDoRA adapters at once over one frozen base model.",
        epilog="example: python launch.py gen --template mixlora --tasks 'arc-e;boolq' && "
        "python launch.py run --base_model meta-llama/Llama-2-7b-hf",
    )
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{quickstart,gen,run,evaluate,plot,merge,avail}")

    quick = sub.add_parser("quickstart", help="the whole framework on a small real model, in minutes",
                           description=cmd_quickstart.__doc__)  # fmt: skip
    quick.add_argument("--base_model", help="Use this model instead of SmolLM2-135M-Instruct (hub id, folder or .gguf).")
    quick.add_argument("--output_dir", default="./output/quickstart",
                       help="Where data, config, adapters, logs and results go (default: ./output/quickstart).")  # fmt: skip
    quick.add_argument("--dtype", choices=DTYPE_NAMES, help="Compute dtype of the base model "
                       "(default: bf16 on a CUDA GPU that supports it, else fp32).")  # fmt: skip
    quick.add_argument("--device", help="Device, e.g. cpu, cuda (default: cuda when available, else cpu).")
    quick.add_argument("--seed", type=int, default=42, help="Random seed (default: 42).")
    quick.add_argument("--no_progress", action="store_true", help="No progress bars (for logs).")
    quick.set_defaults(func=cmd_quickstart)

    gen = sub.add_parser("gen", help="write a run config from a template", description=cmd_gen.__doc__)
    gen.add_argument("--template", required=True, help="Template name (see `avail`) or a run-config .json path.")
    gen.add_argument("--tasks", required=True, help="Task names joined by ';' (benchmarks, or data sets for instruction tuning).")
    gen.add_argument("--file_name", default=DEFAULT_CONFIG, help=f"Output config file (default: {DEFAULT_CONFIG}).")
    gen.add_argument("--multi_task", type=_bool, nargs="?", const=True, default=False,
                     help="One adapter trained on all the tasks instead of one per task (default: False).")  # fmt: skip
    gen.add_argument("--adapter_name", help="Name stem: adapters are named STEM_i (default: the task name, or "
                     "'multi_task' with --multi_task).")  # fmt: skip
    gen.add_argument("--data_path", help="Local data source per task, joined by ';' in --tasks order.")
    gen.add_argument("--overwrite", type=_bool, nargs="?", const=True, default=False, help="Replace an existing --file_name.")
    gen.add_argument("--append", type=_bool, nargs="?", const=True, default=False,
                     help="Add the new adapters to an existing --file_name, keeping its run settings.")  # fmt: skip
    for flag, key, typ in _RUN_OVERRIDES:
        gen.add_argument(flag, dest=key, type=typ, help=f"Run setting: {_help_of(key)} Default: the template's.")
    hints = get_type_hints(MixLoraConfig)
    for flag, key, typ, aliases in _ADAPTER_OVERRIDES:
        choices = get_args(hints[key]) if get_origin(hints[key]) is Literal else None
        metavar = "BOOL[,BOOL]" if typ is _bool else ("NAME[,NAME]" if choices else f"{key.upper()}[,...]")
        one_of = f" One of: {', '.join(choices)}." if choices else ""
        gen.add_argument(flag, *aliases, dest=key, type=_list_of(typ, choices), metavar=metavar,
                         help=f"Per adapter: {_help_of(key)}{one_of} Default: the template's. A comma list "
                         "sweeps it.")  # fmt: skip
    gen.add_argument("--seeds", type=int, metavar="N", help="Sweep replicas: every adapter N times, each with its "
                     "own seed key (initial weights, dropout, data order) and named ..._s<seed>.")  # fmt: skip
    gen.add_argument("--first_seed", type=int, metavar="S", help="With --seeds: the seeds are S..S+N-1 (default 0; "
                     "add replicas to a sweep later with --append --first_seed N).")  # fmt: skip
    gen.set_defaults(func=cmd_gen)

    run = sub.add_parser("run", help="validate a run config, then train and evaluate", description=cmd_run.__doc__)
    run.add_argument("--config", default=DEFAULT_CONFIG, help=f"Run config file (default: {DEFAULT_CONFIG}).")
    _add_run_flags(run)
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("evaluate", help="score saved adapters on their benchmark tasks",
                        description=cmd_evaluate.__doc__)  # fmt: skip
    ev.add_argument("--config", default=DEFAULT_CONFIG,
                    help=f"Run config the adapters were trained from (default: {DEFAULT_CONFIG}).")  # fmt: skip
    ev.add_argument("--base_model", help="Base model: hub id, local model folder, or .gguf file (required).")
    ev.add_argument("--protocol", choices=get_args(get_type_hints(LoraConfig)["protocol"]),
                    help="Scoring protocol for every adapter (default: each adapter's own `protocol`).")  # fmt: skip
    ev.add_argument("--adapter", metavar="NAME", help="Score only this adapter of the config; 'base' scores the bare "
                    "base model on the tasks of the config's adapters (default: every adapter with a benchmark "
                    "task).")  # fmt: skip
    ev.add_argument("--limit", type=int, metavar="N", help="Score only the first N items of each task.")
    ev.add_argument("--output_dir", default="./output", help="Where the adapters were saved (output_dir/<name>/) "
                    "and where the results go (default: ./output).")  # fmt: skip
    ev.add_argument("--dtype", choices=DTYPE_NAMES, help="Compute dtype of the base model "
                    "(default: bf16 on a CUDA GPU that supports it, else fp32).")  # fmt: skip
    ev.add_argument("--quantize", choices=["4bit", "8bit"], help="Load the base model quantized with bitsandbytes.")
    ev.add_argument("--device", help="Device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu).")
    ev.set_defaults(func=cmd_evaluate)

    merge = sub.add_parser("merge", help="fold a LoRA/DoRA adapter into its base and save a plain model",
                           description=cmd_merge.__doc__)  # fmt: skip
    merge.add_argument("--adapter", required=True, help="Saved adapter folder (output_dir/<name>).")
    merge.add_argument("--output_dir", required=True, help="Where the merged transformers model is written.")
    merge.add_argument("--base_model", help="Base model (default: the one named in the adapter config).")
    merge.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                       help="dtype of the merged weights (default: fp32).")  # fmt: skip
    merge.add_argument("--overwrite", action="store_true",
                       help="Write into a non-empty --output_dir (never allowed: the base model's own folder).")
    merge.set_defaults(func=cmd_merge)

    plot = sub.add_parser("plot", help="redraw the accuracy and loss charts of an output folder",
                          description=cmd_plot.__doc__)  # fmt: skip
    plot.add_argument("output_dir", help="The --output_dir of a run.")
    plot.add_argument("--results", default="eval_results", metavar="STEM",
                      help="Which results in OUTPUT_DIR/_mlora to chart (default: eval_results, those of `run`).")
    plot.set_defaults(func=cmd_plot)

    avail = sub.add_parser("avail", help="list templates and tasks", description=cmd_avail.__doc__)
    avail.set_defaults(func=cmd_avail)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    tune_cpu_allocator()
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`launch.py avail | head`): stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except ConfigError as err:
        _print_config_error(err)
    except MloraError as err:
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:  # a file or folder the command needs: name it, no traceback
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
    except KeyboardInterrupt:  # outside training (loading, scoring): nothing to save
        print("interrupted", file=sys.stderr)
        return 130
    return EXIT_BAD_INPUT


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of launch.py (and the `mlora` console script); returns the exit status."""
    return _dispatch(build_parser().parse_args(argv))


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of train.py: `train.py CONFIG --base_model X`, the same as `launch.py run`."""
    parser = argparse.ArgumentParser(prog="train.py", description="Train and evaluate the adapters of one run config "
                                     "(the same as `launch.py run --config CONFIG`).")  # fmt: skip
    parser.add_argument("config", help="Run config file (write one with `launch.py gen`).")
    _add_run_flags(parser)
    parser.set_defaults(func=cmd_run)
    return _dispatch(parser.parse_args(argv))
