"""Token ids, loss masks, truncation and padding, checked against ids worked out by hand.

Word-level vocabularies (tests/data/conftest.py): ids 0-3 are <pad> <unk> <s> </s>, then the
listed words in order; the tokenizer puts <s> first.
"""

import pytest
import torch

from mlora.data import (
    DataError,
    TrainingExample,
    load_items,
    pad_rows,
    split_ids,
    tokenize_example,
    tokenize_examples,
)

X = -100  # ignored by the loss

GREETING = ["Task", ":", "greet", "Reply", "hello", "there"]  # ids 4..9


def test_letter_target_is_the_only_label(make_tokenizer):
    tokenizer = make_tokenizer(["Question", ":", "Pick", "one", ".", "A", "B", "red", "blue", "Answer"])
    example = TrainingExample("arc-c", "Question: Pick one.\nA. red\nB. blue\nAnswer:", " B")
    tokenized, truncated = tokenize_example(tokenizer, example, cutoff_len=64)
    #                     <s> Question : Pick one .  A  . red  B  . blue Answer :  B
    assert tokenized.input_ids == [2, 4, 5, 6, 7, 8, 9, 8, 11, 10, 8, 12, 13, 5, 10]
    assert tokenized.labels == [X] * 14 + [10]
    assert tokenized.task == "arc-c"
    assert not truncated


def test_token_merged_across_the_boundary_is_a_target(make_tokenizer):
    # Split on spaces only: "cat" + "s" becomes the single word "cats" (id 6).
    tokenizer = make_tokenizer(["the", "cat", "cats", "sat"], split_punctuation=False)
    tokenized, _ = tokenize_example(tokenizer, TrainingExample("t", "the cat", "s sat"), cutoff_len=64)
    assert tokenized.input_ids == [2, 4, 6, 7]
    assert tokenized.labels == [X, X, 6, 7]


def test_instruction_target_ends_with_eos(make_tokenizer):
    tokenizer = make_tokenizer(GREETING)
    example = TrainingExample("casual", "Task: greet\nReply:", " hello there", add_eos=True)
    tokenized, _ = tokenize_example(tokenizer, example, cutoff_len=64)
    assert tokenized.input_ids == [2, 4, 5, 6, 7, 5, 8, 9, 3]
    assert tokenized.labels == [X, X, X, X, X, X, 8, 9, 3]
    everything, _ = tokenize_example(tokenizer, example, cutoff_len=64, train_on_inputs=True)
    assert everything.labels == [2, 4, 5, 6, 7, 5, 8, 9, 3]
    # A tokenizer that already ends every text with </s> does not get a second one.
    closing = make_tokenizer(GREETING, eos_in_template=True)
    tokenized, _ = tokenize_example(closing, example, cutoff_len=64)
    assert tokenized.input_ids == [2, 4, 5, 6, 7, 5, 8, 9, 3]
    assert tokenized.labels == [X, X, X, X, X, X, 8, 9, 3]


def test_no_eos_for_benchmark_targets(make_tokenizer):
    tokenizer = make_tokenizer(GREETING)
    tokenized, _ = tokenize_example(tokenizer, TrainingExample("boolq", "greet", " hello"), cutoff_len=64)
    assert tokenized.input_ids == [2, 6, 8]
    assert tokenized.labels == [X, X, 8]


def test_truncation_is_counted_and_targetless_rows_dropped(make_tokenizer):
    tokenizer = make_tokenizer(GREETING)
    short = TrainingExample("t", "greet", " hello")  # 3 tokens
    long = TrainingExample("casual", "Task: greet\nReply:", " hello there", add_eos=True)  # 9 tokens
    cut = TrainingExample("t", "Task: greet Reply: hello", " there")  # target is token 8 of 8
    result = tokenize_examples(tokenizer, [short, long, cut], cutoff_len=7)
    assert [e.input_ids for e in result.examples] == [[2, 6, 8], [2, 4, 5, 6, 7, 5, 8]]
    assert [e.labels for e in result.examples] == [[X, X, 8], [X, X, X, X, X, X, 8]]
    assert (result.num_truncated, result.num_dropped) == (2, 1)
    # Training on inputs too, the cut row still has labels and is kept.
    kept = tokenize_examples(tokenizer, [short, long, cut], cutoff_len=7, train_on_inputs=True)
    assert (len(kept.examples), kept.num_truncated, kept.num_dropped) == (3, 2, 0)
    assert kept.examples[2].labels == [2, 4, 5, 6, 7, 5, 8]


def test_pad_rows_right_left_and_per_row(make_tokenizer):
    tokenizer = make_tokenizer(GREETING)
    short = TrainingExample("t", "greet", " hello")
    long = TrainingExample("casual", "Task: greet\nReply:", " hello there", add_eos=True)
    examples = tokenize_examples(tokenizer, [short, long], cutoff_len=64).examples
    ids = [e.input_ids for e in examples]

    right = pad_rows(ids, 0)
    assert right.values.tolist() == [[2, 6, 8, 0, 0, 0, 0, 0, 0], [2, 4, 5, 6, 7, 5, 8, 9, 3]]
    assert right.mask.tolist() == [[True] * 3 + [False] * 6, [True] * 9]
    assert right.offsets == [0, 0]
    labels = pad_rows([e.labels for e in examples], X, "right").values
    assert labels.tolist() == [[X, X, 8, X, X, X, X, X, X], [X, X, X, X, X, X, 8, 9, 3]]

    left = pad_rows(ids, 0, "left")
    assert left.values.tolist() == [[0, 0, 0, 0, 0, 0, 2, 6, 8], [2, 4, 5, 6, 7, 5, 8, 9, 3]]
    assert left.mask.tolist() == [[False] * 6 + [True] * 3, [True] * 9]
    assert left.offsets == [6, 0]
    labels = pad_rows([e.labels for e in examples], X, "left").values
    assert labels.tolist() == [[X, X, X, X, X, X, X, X, 8], [X, X, X, X, X, X, 8, 9, 3]]

    mixed = pad_rows([[7, 8], [1, 2, 3, 4], [5]], -1, ["right", "left", "left"])
    assert mixed.values.tolist() == [[7, 8, -1, -1], [1, 2, 3, 4], [-1, -1, -1, 5]]
    assert mixed.offsets == [0, 0, 3]
    for padded in (right, left, mixed):
        assert padded.values.dtype == torch.long and padded.mask.dtype == torch.bool
        assert padded.values.shape == padded.mask.shape


def test_pad_rows_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        pad_rows([], 0)
    with pytest.raises(ValueError, match="side"):
        pad_rows([[1, 2]], 0, "middle")
    with pytest.raises(ValueError, match="side"):
        pad_rows([[1, 2], [3]], 0, ["left"])


def test_instruction_data_needs_an_eos_token():
    class NoEos:
        eos_token_id = None

        def encode(self, text, add_special_tokens=True):
            return [len(word) for word in text.split()]

    with pytest.raises(DataError, match="no EOS token"):
        tokenize_example(NoEos(), TrainingExample("casual", "a b", " c", add_eos=True), cutoff_len=8)


def test_fixture_item_trains_on_its_letter(make_tokenizer, fixtures):
    # Words outside the vocabulary become <unk> (1); the answer letter keeps its own id.
    tokenizer = make_tokenizer(["Answer", ":", "A", "B", "C"])  # A=6, B=7, C=8
    item = load_items("arc-c", "eval", fixtures)[0]  # three choices, answer B
    tokenized, _ = tokenize_example(tokenizer, item.training_example("choice"), cutoff_len=256)
    assert tokenized.input_ids[-3:] == [4, 5, 7]  # "Answer", ":", "B"
    assert tokenized.labels == [X] * (len(tokenized.input_ids) - 1) + [7]


def test_split_ids_for_evaluation(make_tokenizer, fixtures):
    tokenizer = make_tokenizer(["Answer", ":", "A", "B", "C", "a", "copper", "wire"])  # ids 4..11
    item = load_items("arc-c", "eval", fixtures)[0]  # labels A, B, C
    letters = [split_ids(tokenizer, item.prompt, target) for target in item.label_targets]
    assert [continuation for _, continuation in letters] == [[6], [7], [8]]
    assert letters[0][0][-2:] == [4, 5]  # the context ends at "Answer :"
    context, continuation = split_ids(tokenizer, *item.loglikelihood.pairs()[1])
    assert context[-2:] == [4, 5]
    assert continuation == [9, 10, 11]  # " a copper wire"
    merged = make_tokenizer(["the", "cat", "cats"], split_punctuation=False)
    assert split_ids(merged, "the cat", "s") == ([2, 4], [6])
