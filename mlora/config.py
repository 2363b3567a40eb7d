"""Typed run configuration: dataclasses plus strict validation that reports every problem at once.

A run config is JSON with run-level keys and a ``lora`` list of adapters (the m-LoRA layout)::

    {"cutoff_len": 512, "save_step": 1000, ..., "lora": [{"name": "arc_e_0", "r": 8, ...}]}

An adapter dict that has ``routing_strategy`` is a MixLoRA adapter (m-LoRA's convention), any
other is a plain LoRA/DoRA adapter. Every accepted key is honoured by the framework; a key the
framework would ignore is an error, never a silent no-op.

This module imports nothing heavier than the standard library, so the CLI can validate a config
before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Union, get_args, get_origin, get_type_hints

from mlora.errors import MloraError

__all__ = [
    "ConfigError", "LoraConfig", "ExpertLoraConfig", "ExpertSettings", "MixLoraConfig", "RunConfig",
    "load_config", "config_from_dict", "adapter_from_dict", "to_dict",
    "DEFAULT_TARGET_MODULES", "ROUTING_STRATEGIES", "CASUAL_TASK", "PROTOCOLS", "DTYPE_NAMES",
    "split_list",
]  # fmt: skip

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTING_STRATEGIES = ("mixlora", "mixlora-switch", "mixlora-dynamic")
CASUAL_TASK = "casual"  # m-LoRA's spelling for "instruction data, no benchmark"
Protocol = Literal["choice", "loglikelihood"]  # how benchmark items are trained and scored (mlora.data.items)
PROTOCOLS = get_args(Protocol)
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # the base dtypes the commands take (--dtype)

# Older m-LoRA configs name the strategies after the models they imitate, and spell the
# instruction task "causal" or leave it empty; such configs must keep loading unchanged.
_ROUTING_ALIASES = {"mixtral": "mixlora", "switch": "mixlora-switch", "dynamic": "mixlora-dynamic"}
_TASK_ALIASES = {"": CASUAL_TASK, "causal": CASUAL_TASK}


def split_list(text: str) -> list[str]:
    """The entries of a ';'-joined list (`task_name`, `data`, gen's `--tasks`), stripped:
    "arc-c; boolq" -> ["arc-c", "boolq"]. An empty entry stays (as "")."""
    return [part.strip() for part in text.split(";")]


def _sources(data: str | None, count: int) -> list[str | None]:
    """The data source of each task: None (the benchmark's default) where `data` is absent or
    its entry is empty."""
    return [None] * count if data is None else [entry or None for entry in split_list(data)]

# Keys of transformers' ACT2FN table (kept here so validation does not import transformers).
_ACTIVATIONS = (
    "gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh",
    "laplace", "leaky_relu", "linear", "mish", "quick_gelu", "relu", "relu2", "relu6", "sigmoid",
    "silu", "swish", "tanh",
)  # fmt: skip

# MixLoRA keys that only one routing strategy reads; given for another strategy they would be
# dead keys, so they are rejected (and `to_dict` leaves them out).
_STRATEGY_KEYS = {
    "top_k": "mixlora",
    "top_p": "mixlora-dynamic",
    "temperature": "mixlora-dynamic",
    "expert_capacity": "mixlora-switch",
    "router_z_loss_coef": "mixlora-switch",
    "ffn_dropout": "mixlora-switch",
}

# An adapter name becomes a folder name: keep it portable (no separators, no leading dot). A
# leading letter or digit also keeps it apart from the run's bookkeeping folder, `_mlora`.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


def adapter_name_problem(name: str) -> str | None:
    """What is wrong with adapter name `name` (None when it is valid): the one rule, checked
    with the config before anything loads and again by the model for adapters made in code."""
    if not _NAME_RE.match(name):
        return (f"{name!r} cannot be an adapter name; use letters, digits, '_', '-' or '.' (start with a letter or "
                "digit, at most 100 characters)")
    if name.endswith("."):
        return f"{name!r} cannot be an adapter name: a folder name cannot end with '.' on every system"
    return None
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class ConfigError(MloraError):
    """A config has one or more problems; ``problems`` lists them all, ``source`` is the file."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = f"{self.source}: " if self.source and not self.source.startswith("<") else ""
        return "\n".join(prefix + p for p in self.problems)


_REQUIRED = dataclasses.MISSING


def _f(default: Any, text: str, **bounds: Any) -> Any:
    """A dataclass field with its help text and numeric bounds (ge, gt, le, lt) in the metadata."""
    meta = {"help": text, **bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------- adapters

_Scheduler = Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup"]
_Init = Literal["original", "gaussian"]


@dataclass
class LoraConfig:
    """One LoRA or DoRA adapter: its data, optimizer, schedule and low-rank settings."""

    name: str = _f(_REQUIRED, "Adapter name; also its output folder name.")
    task_name: str = _f(CASUAL_TASK, "A benchmark task, several joined by ';' (multi-task), or 'casual' (instruction data).")
    data: Optional[str] = _f(
        None,
        "Data source: hub id, 'id:subset' or local json/jsonl/parquet path; for multi-task one per task joined "
        "by ';'. null (or an empty entry) = the benchmark's default source. Required for 'casual'.",
    )
    prompt: str = _f("alpaca", "Prompt template name or path (instruction data).")
    optim: Literal["adamw", "sgd"] = _f("adamw", "Optimizer.")
    lr: float = _f(3e-4, "Learning rate.", gt=0)
    momentum: float = _f(0.0, "SGD momentum (optim 'sgd' only).", ge=0)
    weight_decay: float = _f(0.0, "Decoupled weight decay.", ge=0)
    scheduler_type: _Scheduler = _f("constant", "Learning-rate schedule.")
    warmup_steps: int = _f(0, "Warm-up optimizer steps (not with 'constant').", ge=0)
    warmup_ratio: float = _f(0.0, "Warm-up as a fraction of all optimizer steps.", ge=0, lt=1)
    batch_size: int = _f(16, "Samples per optimizer step.", ge=1)
    micro_batch_size: int = _f(8, "Samples per forward pass; divides batch_size (gradient accumulation).", ge=1)
    evaluate_batch_size: int = _f(16, "Samples per evaluation forward pass.", ge=1)
    num_epochs: int = _f(2, "Passes over the training data.", ge=1)
    group_by_length: bool = _f(False, "Batch samples of similar length together.")
    r: int = _f(8, "LoRA rank.", ge=1)
    lora_alpha: float = _f(16, "LoRA alpha; scaling is alpha / r.", gt=0)
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list[str] = _f(list(DEFAULT_TARGET_MODULES), "Projections to adapt: a list or a dict of booleans.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha / sqrt(r).")
    lora_init: _Init = _f("original", "Init of A: kaiming-uniform ('original') or N(0, 1/r) ('gaussian').")
    loraplus_lr_ratio: float = _f(1.0, "LoRA+: B matrices and vectors train at lr * ratio.", gt=0)
    evaluate_steps: int = _f(0, "Score on the eval split every N optimizer steps; 0 = only at the end.", ge=0)
    protocol: Protocol = _f(
        "choice", "Training target and default evaluation protocol for benchmark tasks."
    )
    train_on_inputs: bool = _f(False, "Also compute the loss on prompt tokens.")
    max_grad_norm: float = _f(1.0, "Gradient-clipping norm; 0 disables clipping.", ge=0)
    expand_side: Literal["left", "right"] = _f("right", "Padding side of a micro-batch.")
    seed: Optional[int] = _f(
        None, "This adapter's seed (initial weights, dropout masks, data order); null = derived from the run's "
        "--seed and the adapter name. Replicas of one configuration differ only in it.", ge=0, lt=2**63,
    )

    # Class attributes, not fields (no annotation), so never run-config keys: what peft's and the
    # mixlora package's configs tell a caller. `MixLoraModelForCausalLM.from_pretrained` sets the
    # base model it loaded (the name to give AutoTokenizer); None for a config built otherwise.
    base_model_name_or_path = None
    peft_type = "LORA"
    task_type = "CAUSAL_LM"

    def __post_init__(self) -> None:
        _finish(self)

    @property
    def scaling(self) -> float:
        """Factor applied to the LoRA delta: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return _scaling(self.lora_alpha, self.r, self.use_rslora)

    @property
    def is_moe(self) -> bool:
        """True for MixLoRA/MixDoRA adapters."""
        return False

    @property
    def tasks(self) -> list[str]:
        """The task names of this adapter (``task_name`` split on ';')."""
        return split_list(self.task_name)

    @property
    def task_sources(self) -> list[tuple[str, Optional[str]]]:
        """(task, data source or None for the benchmark's default) for each task, in order."""
        tasks = self.tasks
        return list(zip(tasks, _sources(self.data, len(tasks))))

    def _problems(self, skip: set[str]) -> list[str]:
        """Cross-field problems; rules reading a key in ``skip`` (already reported) are not run."""
        ok = skip.isdisjoint
        out = []
        if ok({"batch_size", "micro_batch_size"}) and self.batch_size % self.micro_batch_size:
            out.append(f"micro_batch_size: {self.micro_batch_size} must divide batch_size {self.batch_size}")
        if ok({"optim", "momentum"}) and self.optim != "sgd" and self.momentum != 0:
            out.append(f"momentum: used only with optim 'sgd' (optim is '{self.optim}'); remove it or set 0")
        warm = ok({"warmup_steps", "warmup_ratio"})
        if warm and self.warmup_steps and self.warmup_ratio:
            out.append("warmup_steps: give warmup_steps or warmup_ratio, not both")
        if warm and ok({"scheduler_type"}) and (self.warmup_steps or self.warmup_ratio) and self.scheduler_type == "constant":
            out.append("scheduler_type: 'constant' has no warm-up; use 'constant_with_warmup' or another schedule, "
                       "or set warmup_steps/warmup_ratio to 0")  # fmt: skip
        if ok({"task_name", "data"}):
            out += _task_problems(self.task_name, self.data)
        if ok({"target_modules"}):
            if not self.target_modules:
                out.append("target_modules: needs at least one target module (e.g. q_proj, v_proj)")
            for m in self.target_modules:
                if not _MODULE_RE.match(m):
                    out.append(f"target_modules: {m!r} is not a module name")
            dup = sorted({m for m in self.target_modules if self.target_modules.count(m) > 1})
            if dup:
                out.append(f"target_modules: lists {', '.join(dup)} more than once")
        if ok({"name"}) and adapter_name_problem(self.name):
            out.append(f"name: {adapter_name_problem(self.name)}")
        if ok({"prompt"}) and not self.prompt.strip():
            out.append("prompt: must not be empty")
        return out


@dataclass
class ExpertLoraConfig:
    """LoRA settings of the MixLoRA experts; None inherits the adapter's value."""

    r: Optional[int] = _f(None, "Expert LoRA rank.", ge=1)
    lora_alpha: Optional[float] = _f(None, "Expert LoRA alpha.", gt=0)
    lora_dropout: Optional[float] = _f(None, "Expert LoRA dropout.", ge=0, lt=1)
    use_dora: Optional[bool] = _f(None, "Experts use DoRA.")
    use_rslora: Optional[bool] = _f(None, "Experts use rsLoRA scaling.")
    lora_init: Optional[_Init] = _f(None, "Init of the experts' A matrices.")

    def __post_init__(self) -> None:
        _finish(self)

    def _problems(self, skip: set[str]) -> list[str]:
        return []


class ExpertSettings(NamedTuple):
    """The resolved LoRA settings every expert of a MixLoRA adapter uses."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_dora: bool
    use_rslora: bool
    lora_init: str
    scaling: float


@dataclass
class MixLoraConfig(LoraConfig):
    """A MixLoRA (or, with use_dora, MixDoRA) adapter: LoRA on attention, LoRA experts in the FFN."""

    routing_strategy: Literal["mixlora", "mixlora-switch", "mixlora-dynamic"] = _f(
        "mixlora", "'mixlora' top-k, 'mixlora-switch' top-1 with capacity, 'mixlora-dynamic' top-p."
    )
    num_experts: int = _f(8, "Experts per MixLoRA FFN.", ge=1)
    top_k: int = _f(2, "Experts per token (mixlora).", ge=1)
    top_p: float = _f(0.8, "Probability mass the chosen experts reach (mixlora-dynamic).", gt=0, le=1)
    temperature: float = _f(0.0, "Router softmax temperature (mixlora-dynamic); 0 = none.", ge=0)
    router_init_range: float = _f(0.02, "Std of the router's normal init.", ge=0)
    router_loss: bool = _f(True, "Add the router's auxiliary losses to the loss.")
    router_aux_loss_coef: float = _f(0.01, "Load-balance loss coefficient.", ge=0)
    router_z_loss_coef: float = _f(0.001, "Router z-loss coefficient (mixlora-switch).", ge=0)
    expert_capacity: int = _f(32, "Tokens per expert (mixlora-switch); overflow gets the frozen FFN.")
    jitter_noise: float = _f(0.0, "Multiplicative router-input noise while training.", ge=0)
    act_fn: Optional[str] = _f(None, "Expert activation; null = the base model's.")
    ffn_dropout: float = _f(0.0, "Dropout on the routed FFN output while training (mixlora-switch).", ge=0, lt=1)
    sparse_step: Optional[int] = _f(None, "Experts only on every n-th layer (plain LoRA FFN elsewhere); null = all.", ge=1)
    expert_lora: Optional[ExpertLoraConfig] = _f(None, "Expert LoRA settings overriding the adapter's.")

    peft_type = "MIXLORA"

    def __post_init__(self) -> None:
        if isinstance(self.routing_strategy, str):
            self.routing_strategy = _ROUTING_ALIASES.get(self.routing_strategy, self.routing_strategy)
        _finish(self)

    @property
    def is_moe(self) -> bool:
        return True

    def expert_settings(self) -> ExpertSettings:
        """The LoRA settings of every expert: ``expert_lora`` values over the adapter's."""
        e = self.expert_lora or ExpertLoraConfig()
        names = ("r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "lora_init")
        v = {n: getattr(self, n) if getattr(e, n) is None else getattr(e, n) for n in names}
        return ExpertSettings(**v, scaling=_scaling(v["lora_alpha"], v["r"], v["use_rslora"]))

    def _problems(self, skip: set[str]) -> list[str]:
        ok = skip.isdisjoint
        out = super()._problems(skip)
        strategy = self.routing_strategy
        if ok({"top_k", "num_experts", "routing_strategy"}) and strategy == "mixlora" and self.top_k > self.num_experts:
            out.append(f"top_k: {self.top_k} exceeds num_experts {self.num_experts}")
        if ok({"expert_capacity", "routing_strategy"}) and strategy == "mixlora-switch" and self.expert_capacity <= 0:
            out.append(f"expert_capacity: mixlora-switch needs expert_capacity > 0, got {self.expert_capacity} "
                       "(a common choice: cutoff_len / num_experts * 1.25)")  # fmt: skip
        if ok({"act_fn"}) and self.act_fn is not None and self.act_fn not in _ACTIVATIONS:
            out.append(f"act_fn: unknown activation {self.act_fn!r}{_suggest(self.act_fn, _ACTIVATIONS)}")
        return out


# --------------------------------------------------------------------------------------- run


@dataclass
class RunConfig:
    """A whole run: shared settings and the adapters trained together over one base model."""

    lora: list[Union[LoraConfig, MixLoraConfig]] = _f(_REQUIRED, "The adapters (with routing_strategy: MixLoRA).")
    cutoff_len: int = _f(512, "Maximum tokens per sample; longer samples are cut.", ge=1)
    save_step: int = _f(1000, "Optimizer steps between checkpoints; 0 = only the final adapter.", ge=0)
    train_lora_candidate_num: int = _f(2, "Adapters kept ready for training at once.", ge=1)
    train_lora_simultaneously_num: int = _f(2, "Adapters sharing one training batch.", ge=1)
    train_strategy: Literal["optim", "none"] = _f(
        "optim", "'optim': the dispatcher picks which candidates share a batch to keep it full; 'none': config order."
    )
    eval_lora_simultaneously_num: int = _f(2, "Adapters sharing one evaluation batch.", ge=1)
    parallelism: Literal["data", "adapter"] = _f(
        "data", "Over several processes (torchrun): 'data' splits every adapter's batch across them; 'adapter' "
        "gives each process its own adapters."
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora, list):
            self.lora = [adapter_from_dict(a, f"lora[{i}]") if isinstance(a, dict) else a for i, a in enumerate(self.lora)]
        _finish(self)

    def _problems(self, skip: set[str]) -> list[str]:
        ok = skip.isdisjoint
        out = []
        pair = {"train_lora_simultaneously_num", "train_lora_candidate_num"}
        if ok(pair) and self.train_lora_simultaneously_num > self.train_lora_candidate_num:
            out.append(f"train_lora_simultaneously_num: {self.train_lora_simultaneously_num} exceeds "
                       f"train_lora_candidate_num {self.train_lora_candidate_num}")  # fmt: skip
        if not ok({"lora"}):
            return out
        if not self.lora:
            out.append("lora: needs at least one adapter")
        bad = [i for i, a in enumerate(self.lora) if not isinstance(a, LoraConfig)]
        if bad:
            out.append(f"lora: entries {bad} are not adapter configs")
            return out
        return out + _list_problems([(i, a.name, a.task_name, a.data) for i, a in enumerate(self.lora)])

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters in config order."""
        return [a.name for a in self.lora]


# -------------------------------------------------------------------------------- validation


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _describe(value: Any) -> str:
    """How a given JSON value reads in a message: its text and its JSON type."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)  # fmt: skip
    text = json.dumps(value) if isinstance(value, (bool, int, float, str, type(None))) else None
    if text is None or len(text) > 60:
        return kind
    return f"{text} ({kind})"


_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _bounds_text(meta: dict) -> str:
    return " and ".join(f"{sym} {meta[key]}" for key, (sym, _) in _BOUNDS.items() if key in meta)


def _out_of_bounds(value: Any, meta: dict) -> bool:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return any(not test(value, meta[key]) for key, (_, test) in _BOUNDS.items() if key in meta)


def _check_type(value: Any, tp: Any) -> tuple[bool, Any, str]:
    """Check a JSON value against a field annotation; returns (ok, normalised value, expected text)."""
    origin = get_origin(tp)
    if origin is Union:
        if value is None:
            return True, None, ""
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        ok, norm, expected = _check_type(value, inner)
        return ok, norm, f"{expected} or null"
    if origin is Literal:
        choices = get_args(tp)
        return value in choices, value, "one of " + ", ".join(repr(c) for c in choices)
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value, "a number"
    if tp is str:
        return isinstance(value, str), value, "a string"
    if origin is list:
        if get_args(tp) == (str,):
            ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
            return ok, list(value) if ok else value, "a list of names (or a dict of name: true/false)"
        return isinstance(value, list), value, "a list"
    return True, value, ""  # a nested config is checked by its own dataclass


def _choices(tp: Any) -> tuple:
    """The allowed strings of a Literal (or Optional Literal) annotation; () for other types."""
    if get_origin(tp) is Union:
        tp = [a for a in get_args(tp) if a is not type(None)][0]
    return get_args(tp) if get_origin(tp) is Literal else ()


def _finish(cfg: Any) -> None:
    """Normalise a config dataclass in place; raise ConfigError listing all of its problems.

    Problems read ``key: expected ..., got ...``; callers prefix them with where the config sits
    (``lora[2].``) and the file name.
    """
    hints = get_type_hints(type(cfg))
    problems: list[str] = []
    bad: set[str] = set()
    if isinstance(cfg, LoraConfig):
        _normalise_lora(cfg, problems, bad)
    for f in dataclasses.fields(cfg):
        if f.name in bad:
            continue
        value = getattr(cfg, f.name)
        ok, norm, expected = _check_type(value, hints[f.name])
        bounds = _bounds_text(f.metadata)
        if not ok:
            if bounds and ("integer" in expected or "number" in expected):
                expected = expected.replace("integer", f"integer {bounds}").replace("number", f"number {bounds}")
            hint = _suggest(value, _choices(hints[f.name])) if isinstance(value, str) else ""
            problems.append(f"{f.name}: expected {expected}, got {_describe(value)}{hint}")
            bad.add(f.name)
        elif _out_of_bounds(norm, f.metadata):
            problems.append(f"{f.name}: expected a value {bounds}, got {_describe(value)}")
            bad.add(f.name)
        else:
            setattr(cfg, f.name, norm)
    # Cross-field rules skip keys already reported, so one bad value yields one message.
    problems += cfg._problems(bad)
    if problems:
        raise ConfigError(problems)


def _normalise_lora(cfg: LoraConfig, problems: list[str], bad: set[str]) -> None:
    """m-LoRA spellings to ours: target_modules dict -> list, task aliases, expert_lora dict."""
    tm = cfg.target_modules
    if isinstance(tm, dict):
        wrong = [k for k, v in tm.items() if not isinstance(v, bool)]
        if wrong:
            problems.append(f"target_modules: a dict must map module names to true/false; {wrong[0]!r} maps to "
                            f"{_describe(tm[wrong[0]])}")  # fmt: skip
            bad.add("target_modules")
        else:
            cfg.target_modules = [k for k, v in tm.items() if v]
    if isinstance(cfg.task_name, str):
        cfg.task_name = ";".join(_TASK_ALIASES.get(t, t) for t in split_list(cfg.task_name))
    if isinstance(cfg, MixLoraConfig) and isinstance(cfg.expert_lora, dict):
        try:
            cfg.expert_lora = _expert_from_dict(cfg.expert_lora, "expert_lora")
        except ConfigError as e:
            problems += e.problems
            bad.add("expert_lora")
    elif isinstance(cfg, MixLoraConfig) and not isinstance(cfg.expert_lora, (ExpertLoraConfig, type(None))):
        problems.append(f"expert_lora: expected an object or null, got {_describe(cfg.expert_lora)}")
        bad.add("expert_lora")


def _task_problems(task_name: str, data: Optional[str]) -> list[str]:
    """Each task must be known, and data (when given) has one source per task."""
    from mlora.data import BENCHMARK_TASKS  # a tuple in a torch-free module: cheap to import here

    out = []
    tasks = split_list(task_name)
    valid = (*BENCHMARK_TASKS, CASUAL_TASK)
    for t in tasks:
        if t not in valid:
            out.append(f"task_name: unknown task {t!r}{_suggest(t, valid)} (valid: {', '.join(valid)})")
    sources = _sources(data, len(tasks))
    if len(sources) != len(tasks):
        return out + [f"data: gives {len(sources)} source(s) for {len(tasks)} task(s); give one per task joined by "
                      "';' (an empty entry uses that benchmark's default source)"]  # fmt: skip
    pairs = list(zip(tasks, sources))
    if len(set(pairs)) != len(pairs):
        out.append("task_name: lists the same task (with the same data) more than once")
    return out


def _unknown_key_problems(d: dict, valid: list[str], where: str, hints: dict[str, str]) -> list[str]:
    """Keys the dataclass does not have (with the closest valid key) and keys given twice."""
    prefix = f"{where}." if where else ""
    out = []
    for key in d:
        if key not in valid or key in hints:
            out.append(f"{prefix}{key}: " + (hints.get(key) or f"unknown key{_suggest(key, valid)}"))
    for key in getattr(d, "duplicates", ()):
        out.append(f"{prefix}{key}: given more than once; keep one")
    return out


def _list_problems(entries: list[tuple[int, Any, Any, Any]]) -> list[str]:
    """Rules over the adapter list, given (index, name, task_name, data) per adapter: unique names,
    and a data source for instruction tasks. Checked on the list, not per adapter, so that a bare
    ``LoraConfig(name=...)`` stays constructible in code."""
    out = []
    seen: dict[str, int] = {}
    for i, name, task_name, data in entries:
        if isinstance(name, str):
            key = name.lower()  # folders differing only in case collide on some file systems
            if key in seen:
                out.append(f"lora[{i}].name: {name!r} is already used by lora[{seen[key]}]; names must be unique")
            seen.setdefault(key, i)
        if isinstance(task_name, str) and isinstance(data, (str, type(None))):
            tasks = [_TASK_ALIASES.get(t, t) for t in split_list(task_name)]
            sources = _sources(data, len(tasks))
            if len(tasks) == len(sources) and any(t == CASUAL_TASK and x is None for t, x in zip(tasks, sources)):
                out.append(f"lora[{i}].data: task 'casual' (instruction data) needs a data source: a hub id or local file")
    return out


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _expert_from_dict(d: Any, where: str) -> ExpertLoraConfig:
    if not isinstance(d, dict):
        raise ConfigError([f"{where}: expected an object, got {_describe(d)}"])
    valid = _field_names(ExpertLoraConfig)
    problems = _unknown_key_problems(d, valid, where, {})
    try:
        cfg = ExpertLoraConfig(**{k: v for k, v in d.items() if k in valid})
    except ConfigError as e:
        problems += [f"{where}.{p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    return cfg


def adapter_from_dict(d: Any, where: str = "lora[0]") -> Union[LoraConfig, MixLoraConfig]:
    """Build one adapter from its JSON object; a dict with ``routing_strategy`` is MixLoRA.

    Raises:
        ConfigError: listing every problem, each prefixed with ``where`` (e.g. ``lora[2].r: ...``).
    """
    if not isinstance(d, dict):
        raise ConfigError([f"{where}: expected an adapter object, got {_describe(d)}"])
    moe = "routing_strategy" in d
    cls = MixLoraConfig if moe else LoraConfig
    valid = _field_names(cls)
    hints: dict[str, str] = {}
    if moe:
        strategy = d["routing_strategy"]
        strategy = _ROUTING_ALIASES.get(strategy, strategy) if isinstance(strategy, str) else strategy
        for key, owner in _STRATEGY_KEYS.items():
            if key in d and strategy in ROUTING_STRATEGIES and owner != strategy:
                hints[key] = f"used only by routing_strategy '{owner}' (this adapter uses '{strategy}'); remove it"
    else:
        for key in set(_field_names(MixLoraConfig)) - set(valid):
            hints[key] = "a MixLoRA key; add routing_strategy (mixlora, mixlora-switch or mixlora-dynamic) or remove it"
    problems = _unknown_key_problems(d, valid, where, hints)
    kwargs = {k: v for k, v in d.items() if k in valid and k not in hints}
    if "name" not in d:
        problems.append(f"{where}.name: missing; every adapter needs a name")
        kwargs["name"] = "unnamed"  # lets the remaining checks run
    try:
        cfg = cls(**kwargs)
    except ConfigError as e:
        problems += [f"{where}.{p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    return cfg


def config_from_dict(d: Any, source: str = "<dict>") -> RunConfig:
    """Build and validate a RunConfig from a parsed JSON object.

    Raises:
        ConfigError: listing every problem in the config, with ``source`` as its file name.
    """
    if not isinstance(d, dict):
        raise ConfigError([f"expected a JSON object with a 'lora' list at the top, got {_describe(d)}"], source)
    valid = _field_names(RunConfig)
    problems = _unknown_key_problems(d, valid, "", {})
    raw = d.get("lora")
    adapters: list = []

    if "lora" not in d:
        problems.append("lora: missing; give a list of adapters")
    elif not isinstance(raw, list):
        problems.append(f"lora: expected a list of adapters, got {_describe(raw)}")
    else:
        for i, a in enumerate(raw):
            try:
                adapters.append(adapter_from_dict(a, f"lora[{i}]"))
            except ConfigError as e:
                problems += e.problems
    all_built = isinstance(raw, list) and len(adapters) == len(raw)
    kwargs = {k: v for k, v in d.items() if k in valid and k != "lora"}
    cfg = None
    try:
        cfg = RunConfig(lora=adapters, **kwargs)
    except ConfigError as e:
        # Once an adapter was rejected, rules over the adapter list (indices, "needs one") would mislead.
        problems += [p for p in e.problems if all_built or not p.startswith("lora")]
    if isinstance(raw, list) and not all_built:
        entries = [(i, a.get("name"), a.get("task_name", CASUAL_TASK), a.get("data")) for i, a in enumerate(raw) if isinstance(a, dict)]
        problems += _list_problems(entries)
    if problems:
        raise ConfigError(problems, source)
    return cfg


class _PairsDict(dict):
    """A JSON object that remembers keys given twice (json keeps only the last silently)."""

    duplicates: tuple = ()


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
    d = _PairsDict(pairs)
    seen: set[str] = set()
    d.duplicates = tuple(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def load_config(path: Union[str, Path]) -> RunConfig:
    """Read, parse and validate a run config file.

    Raises:
        ConfigError: a missing/unreadable file, a JSON syntax error (with line and column), or
            every validation problem in the config.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["file not found; create one with `python launch.py gen --template T --tasks ...`"], source) from None
    except IsADirectoryError:
        raise ConfigError(["is a folder, not a config file"], source) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read: {e}"], source) from None
    try:
        data = json.loads(text, object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as e:
        raise ConfigError([f"line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}"], source) from None
    return config_from_dict(data, source)


# ---------------------------------------------------------------------------------- export


def _adapter_to_dict(a: LoraConfig) -> dict:
    out = {}
    for f in dataclasses.fields(a):
        if a.is_moe and _STRATEGY_KEYS.get(f.name, a.routing_strategy) != a.routing_strategy:
            continue  # a key of another routing strategy: writing it would make the file invalid
        value = getattr(a, f.name)
        if isinstance(value, ExpertLoraConfig):
            value = dataclasses.asdict(value)
        elif isinstance(value, list):
            value = list(value)
        out[f.name] = value
    return out


def to_dict(cfg: Union[RunConfig, LoraConfig]) -> dict:
    """A JSON-ready, fully resolved dict (every key with its value); round-trips through
    ``config_from_dict`` (or ``adapter_from_dict`` for a single adapter)."""
    if isinstance(cfg, LoraConfig):
        return _adapter_to_dict(cfg)
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "lora"}
    out["lora"] = [_adapter_to_dict(a) for a in cfg.lora]
    return out
