"""Task registry, dataset sources, prompts and tokenization.

Public API (see each function's docstring for details):

    BENCHMARK_TASKS, CASUAL_TASK, PROTOCOLS
    DataError                               every user-facing data problem
    is_benchmark(name) -> bool
    get_task(name) -> Task                  source, subset, splits, fields, row parser
    task_names("a;b") -> ("a", "b")         validated names of an adapter's task_name
    task_sources(names, data) -> [(task, data or None), ...]   the source of each task
    load_items(task_name, split, data=None, trust_remote_code=False, limit=None)
        -> list[MultipleChoiceItem]          each with its lm-eval requests (LoglikelihoodRequests)
    build_training_examples(task_name, data=None, protocol="choice", prompt=None, *,
        trust_remote_code=False, limit=None, seed=0) -> list[TrainingExample]
    load_template(prompt) -> PromptTemplate  "alpaca" or a template JSON file
    tokenize_examples(tokenizer, examples, cutoff_len, train_on_inputs=False)
        -> TokenizedExamples                 (imports torch; loaded on first use)
    pad_rows(rows, pad_value, side="right") -> Padded(values, mask, offsets), (B, T) tensors
                                            the one padding rule (training, scoring, generation)
    split_ids(tokenizer, context, continuation) -> (context_ids, continuation_ids)
                                            the training boundary, for evaluation
"""

from mlora.data.casual import PromptTemplate, load_template
from mlora.data.errors import DataError
from mlora.data.items import PROTOCOLS, LoglikelihoodRequests, MultipleChoiceItem, TrainingExample
from mlora.data.load import build_training_examples, load_items, task_sources
from mlora.data.registry import BENCHMARK_TASKS, CASUAL_TASK, get_task, is_benchmark, task_names
from mlora.data.task import Task

_TOKENIZE_EXPORTS = (
    "IGNORE_INDEX", "TokenizedExample", "TokenizedExamples", "Padded", "pad_rows", "split_ids", "tokenize_example",
    "tokenize_examples",
)

__all__ = [
    "BENCHMARK_TASKS",
    "CASUAL_TASK",
    "IGNORE_INDEX",
    "PROTOCOLS",
    "DataError",
    "LoglikelihoodRequests",
    "MultipleChoiceItem",
    "Padded",
    "PromptTemplate",
    "Task",
    "TokenizedExample",
    "TokenizedExamples",
    "TrainingExample",
    "build_training_examples",
    "get_task",
    "is_benchmark",
    "load_items",
    "load_template",
    "pad_rows",
    "split_ids",
    "task_names",
    "task_sources",
    "tokenize_example",
    "tokenize_examples",
]  # fmt: skip


def __getattr__(name):
    # Tokenization needs torch; loaded on first use so that config checks stay light.
    if name in _TOKENIZE_EXPORTS:
        from mlora.data import tokenize

        return getattr(tokenize, name)
    raise AttributeError(f"module 'mlora.data' has no attribute {name!r}")
