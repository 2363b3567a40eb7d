"""Every task turns its hand-written fixture rows into the prompts, labels and targets written
out below by hand (tests/fixtures/<task>/). The `loglikelihood` strings are also compared with
the ones lm-eval's own task definitions produce, in test_harness_parity.py."""

import json

import pytest

from mlora.data import (
    BENCHMARK_TASKS,
    DataError,
    MultipleChoiceItem,
    TrainingExample,
    build_training_examples,
    get_task,
    is_benchmark,
    load_items,
    task_names,
    task_sources,
)
from mlora.data.items import LoglikelihoodRequests


def _eval(task, fixtures):
    return load_items(task, "eval", fixtures)


# ----------------------------------------------------------------------------- registry


def test_benchmark_tasks_constant_is_unchanged():
    assert BENCHMARK_TASKS == ("arc-c", "arc-e", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande")
    # The registry holds exactly these tasks.
    from mlora.data.registry import _TASKS

    assert tuple(_TASKS) == BENCHMARK_TASKS


@pytest.mark.parametrize(
    "name, hub_id, subset, train, evaluation",
    [
        ("arc-c", "allenai/ai2_arc", "ARC-Challenge", "train", "test"),
        ("arc-e", "allenai/ai2_arc", "ARC-Easy", "train", "test"),
        ("boolq", "google/boolq", None, "train", "validation"),
        ("obqa", "allenai/openbookqa", "main", "train", "test"),
        ("piqa", "ybisk/piqa", None, "train", "validation"),
        ("siqa", "allenai/social_i_qa", None, "train", "validation"),
        ("hellaswag", "Rowan/hellaswag", None, "train", "validation"),
        ("winogrande", "allenai/winogrande", "winogrande_debiased", "train", "validation"),
    ],
)
def test_registry_sources_and_splits(name, hub_id, subset, train, evaluation):
    task = get_task(name)
    assert (task.name, task.hub_id, task.subset, task.train_split, task.eval_split) == (
        name, hub_id, subset, train, evaluation,
    )
    assert task.split_name("eval") == evaluation
    assert task.split_name("train") == train
    assert is_benchmark(name)


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(DataError, match="Did you mean 'arc-c'"):
        get_task("arc_c")
    assert not is_benchmark("casual")
    with pytest.raises(DataError, match="instruction data"):
        get_task("casual")


def test_task_names_of_an_adapter():
    assert task_names("arc-c") == ("arc-c",)
    assert task_names("arc-c; boolq;piqa") == ("arc-c", "boolq", "piqa")
    assert task_names("casual") == ("casual",)
    # The config allows instruction data beside benchmarks, and a task twice with two sources.
    assert task_names("casual;arc-c;casual") == ("casual", "arc-c", "casual")
    with pytest.raises(DataError, match="empty entry"):
        task_names("arc-c;;boolq")
    with pytest.raises(DataError, match="Unknown task 'bolq'"):
        task_names("arc-c;bolq")


# ----------------------------------------------------------------------------- fixtures load


@pytest.mark.parametrize(
    "task, answers",
    [
        ("arc-c", [1, 2, 2, 0, 1, 2, 2, 4]),
        ("arc-e", [0, 0, 1, 1, 1, 2, 0, 3]),
        ("boolq", [1, 0, 0, 1, 0, 0, 1, 0]),
        ("obqa", [1, 1, 0, 2, 1, 2, 0, 2]),
        ("piqa", [0, 1, 0, 1, 0, 1, 0, 1]),
        ("siqa", [0, 1, 2, 0, 1, 2, 0, 1]),
        ("hellaswag", [0, 1, 2, 3, 0, 1, 2, 3]),
        ("winogrande", [0, 1, 0, 1, 0, 1, 0, 1]),
    ],
)
def test_every_task_loads_its_fixture(task, answers, fixtures):
    train = load_items(task, "train", fixtures)
    evaluation = _eval(task, fixtures)
    assert len(train) == 12
    assert [item.answer for item in evaluation] == answers
    assert all(item.task == task for item in train + evaluation)
    # The fixture folder of the task itself works as well as the root holding all tasks.
    assert load_items(task, "eval", fixtures / task) == evaluation


def test_limit_keeps_the_first_rows(fixtures):
    items = load_items("piqa", "train", fixtures, limit=3)
    assert [item.answer for item in items] == [0, 1, 0]
    with pytest.raises(DataError, match="limit"):
        load_items("piqa", "train", fixtures, limit=0)


# ----------------------------------------------------------------------------- per task


def test_arc_three_choices(fixtures):
    item = _eval("arc-c", fixtures)[0]
    assert item.prompt == (
        "Question: Which object is the best conductor of electricity?\n"
        "A. a rubber band\nB. a copper wire\nC. a wooden stick\nAnswer:"
    )
    assert item.labels == ("A", "B", "C")
    assert item.label_targets == (" A", " B", " C")
    assert item.answer == 1
    assert item.training_example("choice").target == " B"
    assert item.loglikelihood.pairs() == (
        ("Question: Which object is the best conductor of electricity?\nAnswer:", " a rubber band"),
        ("Question: Which object is the best conductor of electricity?\nAnswer:", " a copper wire"),
        ("Question: Which object is the best conductor of electricity?\nAnswer:", " a wooden stick"),
    )
    ll = item.training_example("loglikelihood")
    assert (ll.prompt, ll.target, ll.add_eos) == (
        "Question: Which object is the best conductor of electricity?\nAnswer:", " a copper wire", False,
    )


def test_arc_five_choices_and_numeric_labels(fixtures):
    five, numeric = _eval("arc-c", fixtures)[1:3]
    assert five.labels == ("A", "B", "C", "D", "E")
    assert five.prompt.endswith("C. Mercury\nD. Mars\nE. Jupiter\nAnswer:")
    assert five.training_example().target == " C"
    # answerKey "3" among labels "1".."4" is the third choice, lettered C in the prompt.
    assert numeric.labels == ("A", "B", "C", "D")
    assert numeric.answer == 2
    assert numeric.prompt == (
        "Question: What do plants mostly take in from the air to make food?\n"
        "A. oxygen\nB. nitrogen\nC. carbon dioxide\nD. helium\nAnswer:"
    )
    assert numeric.training_example("choice").target == " C"
    assert numeric.training_example("loglikelihood").target == " carbon dioxide"


def test_arc_easy_uses_its_own_subset_folder(fixtures):
    item = _eval("arc-e", fixtures)[2]
    assert item.prompt.startswith("Question: Which of these is the hardest?\nA. chalk\nB. a diamond")
    assert item.training_example().target == " B"


def test_boolq_prompt_carries_the_passage(fixtures):
    false_item, true_item = _eval("boolq", fixtures)[:2]
    assert false_item.prompt == (
        "The Moon is Earth's only natural satellite. It orbits Earth rather than the Sun, so it is not "
        "classed as a planet.\nQuestion: is the moon a planet?\nA. yes\nB. no\nAnswer:"
    )
    assert false_item.labels == ("A", "B")
    assert false_item.training_example().target == " B"
    assert true_item.training_example().target == " A"
    assert true_item.choices == ("yes", "no")
    # lm-eval's boolq: "no" first, so the answer index differs from the lettered one.
    assert true_item.loglikelihood.continuations == (" no", " yes")
    assert (true_item.answer, true_item.loglikelihood.answer) == (0, 1)
    assert (false_item.answer, false_item.loglikelihood.answer) == (1, 0)
    assert true_item.loglikelihood.contexts[0] == (
        "Many bats hunt at night by making high-pitched calls and listening for the echoes that bounce "
        "back from insects.\nQuestion: do bats use echoes to find food?\nAnswer:"
    )
    assert true_item.training_example("loglikelihood").target == " yes"
    assert false_item.training_example("loglikelihood").target == " no"


def test_boolq_question_mark_is_added_even_after_one(tmp_path):
    from mlora.data.boolq import parse_boolq

    item = parse_boolq("boolq", {"question": "is it wet?", "passage": "Rain.", "answer": True})
    assert item.prompt.startswith("Rain.\nQuestion: is it wet?\nA. yes")
    assert item.loglikelihood.contexts[0] == "Rain.\nQuestion: is it wet??\nAnswer:"


def test_obqa(fixtures):
    item = _eval("obqa", fixtures)[0]
    assert item.prompt == (
        "Question: A person wants to see a distant star more clearly. They should use\n"
        "A. a microscope\nB. a telescope\nC. a magnet\nD. a thermometer\nAnswer:"
    )
    assert item.training_example().target == " B"
    ll = item.training_example("loglikelihood")
    assert (ll.prompt, ll.target) == ("A person wants to see a distant star more clearly. They should use",
                                      " a telescope")


def test_piqa(fixtures):
    item = _eval("piqa", fixtures)[1]
    assert item.prompt == (
        "Goal: How do I untangle a knotted necklace?\n"
        "A. Pull both ends as hard as possible.\nB. Work the knot loose with two pins.\nAnswer:"
    )
    assert item.training_example().target == " B"
    assert item.loglikelihood.pairs() == (
        ("Question: How do I untangle a knotted necklace?\nAnswer:", " Pull both ends as hard as possible."),
        ("Question: How do I untangle a knotted necklace?\nAnswer:", " Work the knot loose with two pins."),
    )


def test_siqa_string_labels_count_from_one(fixtures):
    item = _eval("siqa", fixtures)[2]
    assert item.prompt == (
        "Clara invited her whole class to her birthday party.\nQuestion: Why did Clara do this?\n"
        "A. to be left alone\nB. to skip the party\nC. to include everyone\nAnswer:"
    )
    assert item.labels == ("A", "B", "C")
    assert item.training_example().target == " C"
    ll = item.training_example("loglikelihood")
    assert (ll.prompt, ll.target) == (
        "Q: Clara invited her whole class to her birthday party. Why did Clara do this?\nA:", " to include everyone"
    )


def test_hellaswag_string_labels_and_context(fixtures):
    item = _eval("hellaswag", fixtures)[0]
    context = "Shoveling snow: A man in a thick coat stands on a driveway covered in snow. He"
    assert item.prompt == (
        f"{context}\nWhich ending fits best?\n"
        "A. pushes a shovel along the ground and tosses the snow aside.\n"
        "B. sunbathes on the snow in his swimsuit.\n"
        "C. plants tomatoes in the snow.\n"
        "D. paints the snow blue with a roller.\nAnswer:"
    )
    assert item.loglikelihood.contexts == (context,) * 4
    assert item.loglikelihood.continuations[0] == " pushes a shovel along the ground and tosses the snow aside."
    assert item.training_example().target == " A"
    last = _eval("hellaswag", fixtures)[3]  # label "3"
    assert last.training_example().target == " D"
    assert last.training_example("loglikelihood").target == " walk together down the quiet street."


def test_hellaswag_wikihow_markup_is_removed(fixtures):
    item = _eval("hellaswag", fixtures)[4]
    assert item.prompt.startswith(
        "Food and Entertaining: How to make lemonade. Squeeze the lemons. "
        "Cut each lemon in half and press out the juice.\nWhich ending fits best?\n"
        "A. Stir the juice with water and sugar until the sugar dissolves.\n"
    )
    assert item.loglikelihood.contexts[0] == (
        "Food and Entertaining: How to make lemonade. Squeeze the lemons. "
        "Cut each lemon in half and press out the juice."
    )
    # lm-eval removes a leading "[title]" but keeps the space after it.
    assert item.loglikelihood.continuations[:3] == (
        "  Stir the juice with water and sugar until the sugar dissolves.",
        "  Throw the juice away and keep the peels.",
        " Freeze the lemons whole and serve them as ice.",
    )


def test_hellaswag_loglikelihood_keeps_lm_evals_quirks():
    from mlora.data.hellaswag import parse_hellaswag

    row = {"activity_label": "Phones", "ctx_a": "A man  holds a phone.", "ctx_b": "he opens the iPhone   app",
           "endings": ["[step] taps it.", "x"], "label": "0"}
    item = parse_hellaswag("hellaswag", row)
    # str.capitalize lowercases the rest of ctx_b; each pair of spaces becomes one space.
    assert item.loglikelihood.contexts[0] == "Phones: A man holds a phone. He opens the iphone  app"
    assert item.loglikelihood.continuations == ("  taps it.", " x")
    # The choice protocol's prompt keeps the text as written, spaces collapsed.
    assert item.prompt.startswith("Phones: A man holds a phone. He opens the iPhone app\n")


def test_hellaswag_row_with_ctx_only():
    from mlora.data.hellaswag import parse_hellaswag

    row = {"activity_label": "Rowing", "ctx": "A team pushes a boat into a lake.", "endings": ["w", "y"], "label": 1}
    item = parse_hellaswag("hellaswag", row)
    assert item.loglikelihood.contexts == ("Rowing: A team pushes a boat into a lake.",) * 2
    assert item.labels == ("A", "B")
    assert item.answer == 1


def test_winogrande_fills_the_blank(fixtures):
    item = _eval("winogrande", fixtures)[0]
    assert item.prompt == (
        "Which sentence makes more sense?\n"
        "A. The trophy would not fit in the suitcase because the trophy was too large.\n"
        "B. The trophy would not fit in the suitcase because the suitcase was too large.\nAnswer:"
    )
    assert item.loglikelihood.pairs() == (
        ("The trophy would not fit in the suitcase because the trophy", " was too large."),
        ("The trophy would not fit in the suitcase because the suitcase", " was too large."),
    )
    assert item.training_example().target == " A"
    second = _eval("winogrande", fixtures)[1]  # answer "2"
    assert second.training_example().target == " B"
    ll = second.training_example("loglikelihood")
    assert (ll.prompt, ll.target) == ("Sara gave her umbrella to Beth because Beth", " had to walk home in the rain.")


def test_winogrande_blank_at_the_start(fixtures):
    item = _eval("winogrande", fixtures)[6]
    assert item.loglikelihood.contexts == ("Ben", "Mark")
    assert item.loglikelihood.continuations == (" washed the dishes while Mark dried them, so Ben's hands got wet.",) * 2


def test_winogrande_rest_always_follows_a_space():
    from mlora.data.winogrande import parse_winogrande

    row = {"sentence": "Ann lent Kim a pen because _'s pen broke.", "option1": "Ann", "option2": "Kim", "answer": "2"}
    item = parse_winogrande("winogrande", row)
    assert item.loglikelihood.pairs() == (("Ann lent Kim a pen because Ann", " 's pen broke."),
                                          ("Ann lent Kim a pen because Kim", " 's pen broke."))
    assert item.choices[1] == "Ann lent Kim a pen because Kim's pen broke."  # the choice protocol fills it as written


# ----------------------------------------------------------------------------- item type


def test_item_checks_its_shape():
    requests = LoglikelihoodRequests.shared_context("c", ["x", "y"], 1)
    assert requests.pairs() == (("c", " x"), ("c", " y"))
    with pytest.raises(ValueError, match="same number"):
        MultipleChoiceItem("t", "p", ("A", "B"), ("x",), 0, requests)
    with pytest.raises(ValueError, match="same number"):
        MultipleChoiceItem("t", "p", ("A", "B", "C"), ("x", "y", "z"), 0, requests)
    with pytest.raises(ValueError, match="out of range"):
        MultipleChoiceItem("t", "p", ("A", "B"), ("x", "y"), 2, requests)
    with pytest.raises(ValueError, match="out of range"):
        LoglikelihoodRequests(("c", "c"), (" x", " y"), 2)
    item = MultipleChoiceItem("t", "p", ("A", "B"), ("x", "y"), 0, requests)
    assert item.training_example("loglikelihood") == TrainingExample("t", "c", " y")
    with pytest.raises(ValueError, match="unknown protocol"):
        item.training_example("letters")


# ----------------------------------------------------------------------------- malformed rows


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "task, good, bad, message",
    [
        ("hellaswag", {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["d", "e", "f", "g"], "label": 3},
         {"label": "4"}, "field 'label' is '4', out of range (expected one of 0, 1, 2, 3)"),
        ("siqa", {"context": "a", "question": "b", "answerA": "c", "answerB": "d", "answerC": "e", "label": "3"},
         {"label": "0"}, "field 'label' is '0', out of range (expected one of 1, 2, 3)"),
        ("winogrande", {"sentence": "a _ b.", "option1": "x", "option2": "y", "answer": "2"},
         {"answer": ""}, "field 'answer' is '', out of range (expected one of 1, 2)"),
        ("piqa", {"goal": "a", "sol1": "b", "sol2": "c", "label": 1},
         {"label": -1}, "field 'label' is -1, out of range (expected one of 0, 1)"),
        ("arc-c", {"question": "q", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "C"},
         {"answerKey": "D"}, "field 'answerKey' is 'D', not one of the choice labels A, B, C"),
        ("boolq", {"question": "q", "passage": "p", "answer": True},
         {"answer": "maybe"}, "field 'answer' should be true or false, got 'maybe'"),
        ("winogrande", {"sentence": "a _ b.", "option1": "x", "option2": "y", "answer": "1"},
         {"sentence": "no blank here."}, "field 'sentence' has no blank '_' to fill: 'no blank here.'"),
    ],
)
def test_malformed_row_is_reported_with_file_and_line(tmp_path, task, good, bad, message):
    path = _write_jsonl(tmp_path / "train.jsonl", [good, {**good, **bad}, good])
    with pytest.raises(DataError) as caught:
        load_items(task, "train", tmp_path)
    text = str(caught.value)
    assert f"{path} line 2: {message}" in text
    assert "1 malformed row" in text


def test_every_malformed_row_is_listed(tmp_path):
    good = {"goal": "a", "sol1": "b", "sol2": "c", "label": 0}
    path = tmp_path / "validation.jsonl"
    rows = [good, {"sol1": "b", "sol2": "c", "label": 0}, good, {**good, "label": 2}]
    # A blank line: line numbers stay those of the file.
    path.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_items("piqa", "eval", tmp_path)
    text = str(caught.value)
    assert "piqa: 2 malformed row(s)" in text
    assert f"{path} line 3: missing field 'goal'" in text
    assert f"{path} line 5: field 'label' is 2, out of range" in text


def test_limit_stops_before_later_bad_rows(tmp_path):
    good = {"goal": "a", "sol1": "b", "sol2": "c", "label": 0}
    _write_jsonl(tmp_path / "train.jsonl", [good, good, {"goal": "x"}])
    assert len(load_items("piqa", "train", tmp_path, limit=2)) == 2


# ----------------------------------------------------------------------------- training examples


def test_single_task_examples_keep_source_order(fixtures):
    examples = build_training_examples("arc-e", fixtures)
    assert [e.target for e in examples[:4]] == [" B", " A", " D", " B"]
    assert examples[0].prompt == (
        "Question: Which sense do people mainly use to hear a bell?\nA. sight\nB. hearing\nC. taste\nD. smell\nAnswer:"
    )
    ll = build_training_examples("arc-e", fixtures, protocol="loglikelihood")
    assert [e.target for e in ll[:3]] == [" hearing", " water", " winter"]
    with pytest.raises(DataError, match="Unknown protocol"):
        build_training_examples("arc-e", fixtures, protocol="letters")


def test_multi_task_examples_mix_every_task(fixtures):
    examples = build_training_examples("arc-c;boolq;winogrande", fixtures, seed=3)
    tasks = [e.task for e in examples]
    assert len(examples) == 36
    assert {name: tasks.count(name) for name in set(tasks)} == {"arc-c": 12, "boolq": 12, "winogrande": 12}
    assert tasks != sorted(tasks, key=["arc-c", "boolq", "winogrande"].index)  # shuffled, not stacked
    assert examples == build_training_examples("arc-c;boolq;winogrande", fixtures, seed=3)
    first_winogrande = next(e for e in examples if e.task == "winogrande")
    assert first_winogrande.prompt.startswith("Which sentence makes more sense?\nA. ")


def test_multi_task_sources_joined_by_semicolons(fixtures):
    data = f"{fixtures / 'piqa'};{fixtures / 'alpaca' / 'train.json'};{fixtures}"
    examples = build_training_examples("piqa;casual;siqa", data, seed=1)
    tasks = [e.task for e in examples]
    assert {name: tasks.count(name) for name in set(tasks)} == {"piqa": 12, "casual": 8, "siqa": 12}
    casual = [e for e in examples if e.task == "casual"]
    assert all(e.add_eos and e.prompt.startswith("Below is an instruction") for e in casual)
    assert task_sources(("piqa", "boolq"), "x; ") == [("piqa", "x"), ("boolq", None)]
    assert task_sources(("piqa", "boolq"), ["a", None]) == [("piqa", "a"), ("boolq", None)]
    assert task_sources(("piqa",), None) == [("piqa", None)]
    with pytest.raises(DataError, match="gives 3 source"):
        task_sources(("piqa", "boolq"), "a;b;c")


def test_multi_task_folder_needs_a_subfolder_per_task(fixtures, tmp_path):
    with pytest.raises(DataError, match="one source per task joined by ';'"):
        build_training_examples("arc-c;boolq", fixtures / "arc-c" / "train.jsonl")
    (tmp_path / "arc-c").mkdir()
    with pytest.raises(DataError, match="missing the subfolder.*boolq"):
        build_training_examples("arc-c;boolq", tmp_path)
