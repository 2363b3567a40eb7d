"""Instruction ('casual') data: alpaca records through the built-in or a file template."""

import json

import pytest

from mlora.data import DataError, build_training_examples, load_template

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName three colors of a traffic light.\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate the word "
    "into French.\n\n### Input:\napple\n\n### Response:\n"
)


def test_alpaca_template_is_the_default(fixtures):
    examples = build_training_examples("casual", fixtures / "alpaca")
    assert len(examples) == 8
    first, second = examples[:2]
    assert (first.task, first.prompt, first.target, first.add_eos) == (
        "casual", ALPACA_NO_INPUT, "Red, yellow and green.", True,
    )
    assert (second.prompt, second.target) == (ALPACA_INPUT, "pomme")
    # A record without an "input" key uses the no-input form too.
    assert examples[7].prompt.endswith("### Instruction:\nList two things you can recycle.\n\n### Response:\n")
    assert build_training_examples("casual", fixtures / "alpaca" / "train.json", prompt="alpaca") == examples
    assert load_template("alpaca").response_split == "### Response:"


def test_template_file(fixtures):
    examples = build_training_examples(
        "casual", fixtures / "alpaca", prompt=str(fixtures / "alpaca" / "template.json"), limit=2
    )
    assert [(e.prompt, e.target) for e in examples] == [
        ("Task: Name three colors of a traffic light.\nReply:", "Red, yellow and green."),
        ("Task: Translate the word into French.\nGiven: apple\nReply:", "pomme"),
    ]
    assert load_template(str(fixtures / "alpaca" / "template.json")).response_split == "Reply:"


def test_bad_template_file_lists_every_problem(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"prompt_input": "{instruction} {question}", "prompt_no_input": "", "colour": 1}))
    with pytest.raises(DataError) as caught:
        load_template(str(path))
    text = str(caught.value)
    assert "unknown key 'colour'" in text
    assert "'prompt_no_input' must be a non-empty string" in text
    assert "'response_split' must be a non-empty string" in text
    assert (
        "'prompt_input' uses placeholders ['instruction', 'question'], expected exactly {input}, {instruction}"
    ) in text


def test_unknown_template_name():
    with pytest.raises(DataError, match="neither a built-in template"):
        load_template("vicuna")


def test_casual_needs_data_and_good_rows(tmp_path):
    with pytest.raises(DataError, match="'casual' needs data"):
        build_training_examples("casual")
    path = tmp_path / "my_data.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": " "}]))
    with pytest.raises(DataError) as caught:
        build_training_examples("casual", path)
    assert f"{path} row 2: field 'output' should be a non-empty string, got ' '" in str(caught.value)
