"""Replicas of one configuration, grouped for the result table.

Adapters whose configs are equal but for ``name`` and their own ``seed`` are replicas of one
configuration (what ``launch.py gen --seeds N`` writes). The table reports, per configuration,
the mean and the sample standard deviation (n - 1) over its replicas of each task's accuracy
and of their average, and names the best configuration of each method (LoRA, DoRA, MixLoRA,
...); the JSON keeps every replica's row as well. An adapter without a ``seed`` key is a
configuration of its own, as before sweeps existed.

    configurations = group_replicas(run_config.lora)
    summaries = summarise(results, configurations)     # one dict per configuration, JSON-ready
    best = best_per_method(summaries)

This module imports only the standard library and `mlora.config` (`mlora.sweep` for the names).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlora.config import LoraConfig, to_dict
from mlora.sweep import seed_suffix

if TYPE_CHECKING:
    from mlora.evaluate.results import EvalResults

BASE_METHOD = "base"
_ROUTING = {"mixlora": "", "mixlora-switch": "-switch", "mixlora-dynamic": "-dynamic"}


@dataclass(frozen=True)
class Configuration:
    """Adapters trained alike but for their seeds.

    Attributes:
        label: the configuration's name: the adapters' name without ``_s<seed>`` (``mixlora_r16_lr2e-4``).
        method: ``LoRA``, ``DoRA``, ``MixLoRA``, ``MixDoRA`` (with ``-switch`` / ``-dynamic`` for
            those routings), ``base`` for the bare base model.
        adapters: the replicas' adapter names, in config order.
        seeds: their ``seed`` keys (None: derived from the run seed).
    """

    label: str
    method: str
    adapters: tuple[str, ...]
    seeds: tuple[int | None, ...]


def method_of(cfg: LoraConfig) -> str:
    """The method an adapter config trains: ``LoRA``, ``DoRA``, ``MixLoRA``, ``MixDoRA-switch``, ..."""
    if cfg.is_moe:
        return ("MixDoRA" if cfg.use_dora else "MixLoRA") + _ROUTING[cfg.routing_strategy]
    return "DoRA" if cfg.use_dora else "LoRA"


def _label(names: Sequence[str], seeds: Sequence[int | None]) -> str:
    stems = [n.removesuffix(f"_{seed_suffix(s)}") if s is not None else n for n, s in zip(names, seeds)]
    if len(set(stems)) == 1:
        return stems[0]
    common = stems[0]
    for stem in stems[1:]:
        while not stem.startswith(common):
            common = common[:-1]
    return common.rstrip("_-.") or stems[0]


def group_replicas(cfgs: Iterable[LoraConfig]) -> list[Configuration]:
    """Group adapter configs into configurations, in order of first appearance.

    Adapters with a ``seed`` key whose configs agree on every other key but ``name`` are one
    configuration; an adapter without a seed key is always one of its own.
    """
    groups: dict[str, list[LoraConfig]] = {}
    for cfg in cfgs:
        if cfg.seed is None:
            key = f"name:{cfg.name}"
        else:
            key = json.dumps({k: v for k, v in to_dict(cfg).items() if k not in ("name", "seed")}, sort_keys=True)
        groups.setdefault(key, []).append(cfg)
    out = []
    for members in groups.values():
        names, seeds = [c.name for c in members], [c.seed for c in members]
        out.append(Configuration(_label(names, seeds), method_of(members[0]), tuple(names), tuple(seeds)))
    return out


def spread(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """``(mean, sample standard deviation)`` of the finite values; the deviation is None for
    fewer than two values, both are None for none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None


def _cell(values: list[float | None]) -> dict:
    acc = spread(values)
    return {"mean": acc[0], "std": acc[1]}


def summarise(results: EvalResults, configurations: Sequence[Configuration] = ()) -> list[dict]:
    """One JSON-ready record per configuration of the scored adapters, in results order::

        {"configuration": "mixlora_r16_lr2e-4", "method": "MixLoRA", "n": 3,
         "adapters": [...], "seeds": [0, 1, 2],
         "tasks": {"arc-e": {"acc_mean", "acc_std", "acc_norm_mean", "acc_norm_std"}, ...},
         "average": {"acc_mean", "acc_std", "acc_norm_mean", "acc_norm_std"}}

    Means and sample standard deviations (n - 1) run over the replicas; a standard deviation is
    null for a single replica, an ``acc_norm`` entry null where the task reports none. The
    average's spread is that of each replica's own average over its tasks. Scored adapters
    missing from `configurations` (the bare base model) are configurations of their own.
    """
    scored = results.adapters
    known = {name for c in configurations for name in c.adapters}
    groups = [c for c in configurations if any(a in scored for a in c.adapters)]
    groups += [Configuration(name, BASE_METHOD if name == BASE_METHOD else "", (name,), (None,))
               for name in scored if name not in known]
    groups.sort(key=lambda c: min(scored.index(a) for a in c.adapters if a in scored))
    averages = {a["adapter"]: a for a in results.averages()}
    tasks = list(dict.fromkeys(r.task for r in results.tasks))
    out = []
    for c in groups:
        members = [a for a in c.adapters if a in scored]
        per_task = {}
        for task in tasks:
            rows = [r for r in results.tasks if r.task == task and r.adapter in members]
            if rows:
                acc, norm = _cell([r.acc for r in rows]), _cell([r.acc_norm for r in rows])
                per_task[task] = {"acc_mean": acc["mean"], "acc_std": acc["std"], "acc_norm_mean": norm["mean"],
                                  "acc_norm_std": norm["std"]}  # fmt: skip
        acc = _cell([averages[a]["acc"] for a in members])
        norm = _cell([averages[a]["acc_norm"] for a in members])
        out.append({
            "configuration": c.label, "method": c.method, "n": len(members), "adapters": members,
            "seeds": [s for a, s in zip(c.adapters, c.seeds) if a in scored], "tasks": per_task,
            "average": {"acc_mean": acc["mean"], "acc_std": acc["std"], "acc_norm_mean": norm["mean"],
                        "acc_norm_std": norm["std"]},
        })  # fmt: skip
    return out


def best_per_method(summaries: Sequence[dict]) -> list[dict]:
    """Per method (in order of appearance, the base model left out): the configuration with the
    highest mean average accuracy, and the runner-up, so a reader can judge the gap against the
    spread over seeds::

        {"method": "MixLoRA", "configuration": ..., "acc_mean": ..., "acc_std": ..., "n": 3,
         "runner_up": {"configuration", "acc_mean", "acc_std", "n"} or null, "configurations": 6}
    """
    methods: dict[str, list[dict]] = {}
    for s in summaries:
        if s["method"] not in ("", BASE_METHOD) and s["average"]["acc_mean"] is not None:
            methods.setdefault(s["method"], []).append(s)
    out = []
    for method, entries in methods.items():
        ranked = sorted(entries, key=lambda s: -s["average"]["acc_mean"])  # stable: ties keep config order

        def brief(s: dict) -> dict:
            return {"configuration": s["configuration"], "acc_mean": s["average"]["acc_mean"],
                    "acc_std": s["average"]["acc_std"], "n": s["n"]}

        out.append({"method": method, **brief(ranked[0]), "runner_up": brief(ranked[1]) if len(ranked) > 1 else None,
                    "configurations": len(ranked)})
    return out
