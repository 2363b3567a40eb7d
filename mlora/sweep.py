"""Experiment sweeps: a grid of per-adapter settings times seeds, as the adapters of one run config.

    points = expand_grid({"r": [8, 16], "lr": [1e-4, 2e-4]}, seeds=[0, 1, 2])   # 12 points
    points[0].suffix       -> "r8_lr1e-4_s0"     (the adapter is named "<stem>_r8_lr1e-4_s0")
    points[0].overrides    -> {"r": 8, "lr": 0.0001, "seed": 0}
    points[0].describe()   -> "r=8, lr=1e-4"

The name carries only the swept keys, so a reader sees the point of the grid; the seed is the
adapter's own ``seed`` key (`mlora.config.LoraConfig.seed`), so replica k of every point starts
from the same seed (paired replicas: where the shapes agree, the same initial weights and data
order). `mlora.gen.generate_config` writes the points as adapters and `annotate_problems` says
which grid point an invalid adapter is; `mlora.evaluate.replicas` groups the replicas again
from their configs when the results are tabled.

This module imports only the standard library and `mlora.config`.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import PurePath

from mlora.config import MixLoraConfig
from mlora.errors import MloraError

# Short labels of multi-word keys in adapter names (``alpha32`` reads better than
# ``lora_alpha32``); any other key is written without its underscores.
_LABELS = {
    "lora_alpha": "alpha", "lora_dropout": "dropout", "weight_decay": "wd", "batch_size": "bs",
    "micro_batch_size": "mbs", "evaluate_batch_size": "ebs", "num_epochs": "ep", "warmup_steps": "warmup",
    "warmup_ratio": "warmupr", "evaluate_steps": "evalsteps", "loraplus_lr_ratio": "lplus",
    "max_grad_norm": "clip", "num_experts": "experts", "top_k": "top", "top_p": "topp",
    "router_aux_loss_coef": "aux", "router_z_loss_coef": "zloss", "expert_capacity": "cap",
    "jitter_noise": "jitter", "sparse_step": "sparse", "router_init_range": "rinit",
    "use_dora": "dora", "use_rslora": "rslora", "group_by_length": "bylength", "train_on_inputs": "oninputs",
}  # fmt: skip
# Keys a grid cannot sweep: the name is made from the grid, the seed comes from `seeds`.
_NOT_SWEPT = ("name", "seed")


class SweepError(MloraError):
    """A grid or seed list that cannot be expanded (an unknown key, an empty or repeated value)."""


def format_value(value: object) -> str:
    """A value as short as it reads exactly: ``16``, ``2e-4`` (not ``0.0002``), ``0.05``, ``32`` for 32.0."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        exact = Decimal(repr(value))
        plain = format(exact, "f")
        scientific = format(exact.normalize(), "e").replace("e+", "e")
        return scientific if len(scientific) < len(plain) else plain
    return str(value)


def seed_suffix(seed: int) -> str:
    """The name part of a replica's seed: ``s3``."""
    return f"s{seed}"


def _name_part(key: str, value: object) -> str:
    """One swept key in an adapter name: ``r16``, ``lr2e-4``, ``dora`` / ``nodora``, ``cosine``."""
    label = _LABELS.get(key, key.replace("_", ""))
    if isinstance(value, bool):
        return label if value else f"no{label}"
    if isinstance(value, str):  # a schedule, protocol, routing strategy or prompt: the value says it
        return re.sub(r"[^A-Za-z0-9.\-]", "-", PurePath(value).stem if "/" in value or "\\" in value else value)
    return f"{label}{format_value(value)}"


@dataclass(frozen=True)
class GridPoint:
    """One adapter of a sweep: a value for each swept key (in grid order), and its seed (None
    when the sweep has no seeds: the adapter's seed is then derived from the run seed)."""

    values: tuple[tuple[str, object], ...]
    seed: int | None = None

    @property
    def overrides(self) -> dict:
        """The adapter keys this point sets, ``seed`` included."""
        out = dict(self.values)
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    @property
    def suffix(self) -> str:
        """The adapter name after its stem: ``r16_lr2e-4_s1``."""
        parts = [_name_part(k, v) for k, v in self.values]
        if self.seed is not None:
            parts.append(seed_suffix(self.seed))
        return "_".join(parts)

    def describe(self) -> str:
        """The swept values, for messages: ``r=16, lr=2e-4`` (``seed 1`` when only seeds are swept)."""
        text = ", ".join(f"{k}={format_value(v)}" for k, v in self.values)
        return text or (f"seed {self.seed}" if self.seed is not None else "")


def _check_values(key: str, values: Sequence[object]) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        return [f"{key}: give a non-empty list of values, got {values!r}"]
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    return [f"{key}: lists {format_value(v)} more than once" for v in repeated]


def expand_grid(grid: Mapping[str, Sequence[object]] | None = None,
                seeds: Sequence[int] | None = None) -> list[GridPoint]:
    """The cross product of `grid` (key -> values) and `seeds`, seeds varying fastest.

    Args:
        grid: per-adapter config keys and the values each takes; keys keep their order in the
            names (``{"r": [8, 16], "lr": [1e-4]}`` -> ``r8_lr1e-4``, ``r16_lr1e-4``).
        seeds: each point's replicas; None: one adapter per point, seed derived from the run.
    Returns:
        The points in grid order (the first key varies slowest), each seed's replica in turn.
    Raises:
        SweepError: an unknown or unsweepable key, an empty list, a value or seed given twice, a
            seed that is not an integer in [0, 2**63) (every problem in one message).
    """
    grid = dict(grid or {})
    valid = [f.name for f in dataclasses.fields(MixLoraConfig) if f.name not in _NOT_SWEPT]
    problems = []
    for key, values in grid.items():
        if key not in valid:
            why = "comes from the seeds of the sweep" if key == "seed" else (
                "is made from the swept values" if key == "name" else "is not an adapter key")
            problems.append(f"{key}: cannot be swept: it {why}")
        else:
            problems += _check_values(key, values)
    if seeds is not None:
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63]
        if bad:
            problems.append(f"seeds: expected integers in [0, 2**63), got {bad[0]!r}")
        else:
            problems += _check_values("seeds", list(seeds))
    if problems:
        raise SweepError(f"invalid sweep: {'; '.join(problems)}")
    axes = [[(key, v) for v in values] for key, values in grid.items()]
    return [GridPoint(tuple(values), seed)
            for values in itertools.product(*axes)
            for seed in (list(seeds) if seeds is not None else [None])]


_PROBLEM_RE = re.compile(r"^lora\[(\d+)\](.*)$", re.DOTALL)


def annotate_problems(problems: Sequence[str], points: Mapping[int, tuple[str, GridPoint]]) -> list[str]:
    """Validation problems of a generated config, each adapter of the sweep named by its grid point.

    `points` maps an index in the config's ``lora`` list to the name stem and point that adapter
    was made from. A problem shared by every adapter of the sweep is reported once; one shared by
    the replicas (seeds) of a point once for that point, naming the point's values:
    ``lora[3].micro_batch_size: 16 must divide batch_size 8 (grid point batch_size=8, micro_batch_size=16)``.
    Problems of other adapters and of the run level are kept as they are.
    """
    keyed: dict[str, list[int]] = {}  # problem text after "lora[i]" -> the sweep indices having it
    order: list[tuple[str, str | None]] = []
    for problem in problems:
        m = _PROBLEM_RE.match(problem)
        if m is None or int(m[1]) not in points:
            order.append((problem, None))
            continue
        if m[2] not in keyed:
            keyed[m[2]] = []
            order.append((problem, m[2]))
        keyed[m[2]].append(int(m[1]))
    several_stems = len({stem for stem, _ in points.values()}) > 1
    out = []
    for problem, rest in order:
        if rest is None:
            out.append(problem)
            continue
        indices = keyed[rest]
        if len(indices) == len(points) > 1:
            out.append(f"lora[{indices[0]}]{rest} (every one of the sweep's {len(points)} adapters)")
            continue
        replicas: dict[tuple, list[int]] = {}  # (stem, swept values) -> indices of its seeds
        for i in indices:
            stem, point = points[i]
            replicas.setdefault((stem, point.values), []).append(i)
        for (stem, _), same in replicas.items():
            point = points[same[0]][1]
            note = f"grid point {point.describe()}" if point.values else point.describe()
            note += f" of {stem}" if several_stems else ""
            if same[1:]:
                note += "; the same in its other seeds: " + ", ".join(f"lora[{i}]" for i in same[1:])
            out.append(f"lora[{same[0]}]{rest} ({note})")
    return out
