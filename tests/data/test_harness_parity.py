"""The `loglikelihood` protocol against lm-evaluation-harness itself.

For hand-written rows of every task (the fixtures plus edge cases below), lm-eval's own task
definition (its YAML and utils, loaded and built by lm-eval's task machinery from local rows,
never from the hub) renders the requests the way its evaluator does: `fewshot_context` with
no shots, then `construct_requests`. Our context and continuation strings, choice order and
gold index must be exactly those, and for made-up log-likelihoods our metrics must be the ones
lm-eval's `process_results` reports (the same keys: no acc_norm where lm-eval has none).
"""

import json
from pathlib import Path

import datasets
import pytest

from mlora.data import BENCHMARK_TASKS, get_task
from mlora.evaluate import TaskResult

lm_eval_tasks = pytest.importorskip("lm_eval.tasks")  # the `test` extra installs it
load_yaml = pytest.importorskip("lm_eval.tasks._yaml_loader").load_yaml  # what lm-eval reads its YAMLs with

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TASK_YAMLS = Path(lm_eval_tasks.__file__).parent

# lm-eval task -> its YAML inside lm_eval/tasks (version 0.4.13).
HARNESS_YAML = {
    "arc_challenge": "arc/arc_challenge.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
}

# Rows where lm-eval's strings are easy to get wrong: blanks around fields, a question mark
# already there, WikiHow markup, capitals after the first letter, "_'s", characters that are
# several bytes (acc_norm divides by characters).
EDGE_ROWS = {
    "arc-c": [
        {"id": "e1", "question": "Which is warm? ", "choices": {"text": [" café au lait", "ice ", "snow"],
                                                               "label": ["1", "2", "3"]}, "answerKey": "1"},
    ],
    "arc-e": [
        {"id": "e1", "question": "  Pick   one.", "choices": {"text": ["naïve", "plain", "über", "x"],
                                                             "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
    ],
    "boolq": [
        {"question": "is it raining?", "passage": "It rains.  ", "answer": True},
        {"question": "is snow hot", "passage": "Snow is cold.", "answer": False},
    ],
    "obqa": [
        {"id": "e1", "question_stem": "The sun is a ", "choices": {"text": ["star", "planet ", "moon", "comet"],
                                                                  "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    ],
    "piqa": [{"goal": "To boil an egg ", "sol1": " put it in hot water", "sol2": "put it in a freezer.", "label": 0}],
    "siqa": [
        {"context": "Kai ate soup. ", "question": "What will Kai want next?", "answerA": "a nap",
         "answerB": " more soup", "answerC": "to run", "label": "2"},
    ],
    "hellaswag": [
        {"activity_label": "Phones", "ctx_a": "A man  holds a phone.", "ctx_b": "he opens the iPhone   app",
         "endings": ["[step] taps it.", "throws it  away.", "[title] Eats it.", "sings."], "label": "2"},
        {"activity_label": "Home and Garden", "ctx_a": "[header] How to dig [title] Find a spade.", "ctx_b": "",
         "endings": ["Dig.", "Sleep.", "[substeps] Fly.", "Swim."], "label": "0"},
    ],
    "winogrande": [
        {"sentence": "Ann lent Kim a pen because _'s pen broke.", "option1": "Ann", "option2": "Kim", "answer": "2"},
        {"sentence": "_ ran  faster than Bo, so Al won. ", "option1": "Al", "option2": "Bo", "answer": "1"},
    ],
}


def rows_of(task: str) -> list[dict]:
    rows = []
    for path in sorted((FIXTURES / task).glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows + EDGE_ROWS[task]


def harness_doc(task: str, row: dict, index: int) -> dict:
    """The row in the schema of lm-eval's dataset, where it differs from ours: lm-eval's boolq
    reads super_glue rows (a 0/1 `label`), ours reads google/boolq (a bool `answer`)."""
    if task == "boolq":
        return {"question": row["question"], "passage": row["passage"], "label": int(row["answer"]), "idx": index}
    # One schema for every row of a task (datasets infers the columns from the rows).
    keep = get_task(task).fields + (("ctx",) if task == "hellaswag" else ())
    return {key: row.get(key) for key in keep}


def harness_task(name: str, docs: list[dict]):
    """lm-eval's task `name`, built by lm-eval from its YAML with `docs` as every split."""
    config = load_yaml(TASK_YAMLS / HARNESS_YAML[name])
    assert config["task"] == name

    def local_dataset(**_):
        split = datasets.Dataset.from_list(docs)
        names = [config.get(key) for key in ("training_split", "validation_split", "test_split")]
        return datasets.DatasetDict({n: split for n in names if n})

    manager = lm_eval_tasks.TaskManager(include_defaults=False)
    return manager.load({**config, "custom_dataset": local_dataset})["tasks"][name]


def made_up_loglikelihoods(continuations) -> list[list[float]]:
    """Score patterns that exercise ties (first index wins), each choice winning, and acc_norm
    disagreeing with acc (scores proportional to length: ties per character)."""
    n = len(continuations)
    patterns = [[-2.0] * n, [-float(len(c)) for c in continuations], [-0.7 * len(c) + k for k, c in
                                                                       enumerate(continuations)]]
    patterns += [[-1.0 if k == win else -1.5 for k in range(n)] for win in range(n)]
    return patterns


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"lm-eval tried to load a dataset from the hub: {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize("task", BENCHMARK_TASKS)
def test_requests_and_metrics_are_lm_evals(task):
    info = get_task(task)
    rows = rows_of(task)
    items = [info.item(row) for row in rows]
    harness = harness_task(info.harness_task, [harness_doc(task, row, i) for i, row in enumerate(rows)])
    docs = list(harness.eval_docs)
    assert len(docs) == len(items)
    assert tuple(harness.aggregation()) == info.metrics("loglikelihood")
    for item, doc in zip(items, docs):
        context = harness.fewshot_context(doc, 0)
        theirs = tuple(tuple(instance.arguments) for instance in harness.construct_requests(doc, context))
        assert item.loglikelihood.pairs() == theirs
        gold = harness.doc_to_text(doc) if harness.multiple_input else harness.doc_to_target(doc)
        assert item.loglikelihood.answer == gold
        example = item.training_example("loglikelihood")
        assert (example.prompt, example.target) == theirs[gold]
        for scores in made_up_loglikelihoods(item.loglikelihood.continuations):
            ours = TaskResult("x", task, "loglikelihood", "eval", metrics=info.metrics("loglikelihood"))
            ours.add_item(item)
            ours.scores = [scores]
            reported = {"acc": ours.acc} | ({"acc_norm": ours.acc_norm} if ours.acc_norm is not None else {})
            assert reported == harness.process_results(doc, [(s, False) for s in scores]), scores
