"""Scoring adapters on the benchmarks (DESIGN.md section 6).

Two protocols (`mlora.evaluate.protocols`): ``choice``, the MixLoRA paper's (the item's own
answer letters compete at the answer position), and ``loglikelihood``, lm-evaluation-harness's
(summed log-probability of each choice's continuation, with lm-eval's strings, choice order and
metrics: ``acc``, and ``acc_norm`` where lm-eval reports it). Many adapters, and the bare base
model, are scored in shared batched forwards where an item's choices share their context
(`mlora.evaluate.batched`); results come as a table and as JSON / CSV files
(`mlora.evaluate.results`); `mlora.evaluate.run` scores the saved adapters of a run.

    results = evaluate_adapters(model, tokenizer, [cfg_a, cfg_b], simultaneous=2, include_base=True)
    print(format_table(results))
    save_results(results, "output")   # output/eval_results.json and .csv
"""

from mlora.evaluate.batched import BASE, EvalSpec, Shard, adapter_spec, base_spec, evaluate, evaluate_adapters
from mlora.evaluate.protocols import EvaluationError, continuation_length, score_choice, score_loglikelihood
from mlora.evaluate.results import RESULTS_STEM, EvalResults, TaskResult, format_table, save_results
from mlora.evaluate.run import evaluate_run, evaluate_saved, evaluate_trained, plan_evaluation, results_stem

__all__ = [
    "BASE",
    "RESULTS_STEM",
    "EvalResults",
    "EvalSpec",
    "EvaluationError",
    "Shard",
    "TaskResult",
    "adapter_spec",
    "base_spec",
    "continuation_length",
    "evaluate",
    "evaluate_adapters",
    "evaluate_run",
    "evaluate_saved",
    "evaluate_trained",
    "format_table",
    "plan_evaluation",
    "results_stem",
    "save_results",
    "score_choice",
    "score_loglikelihood",
]
