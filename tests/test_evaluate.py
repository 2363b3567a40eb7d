"""Evaluation: both protocols on rigged models, parity with an independent per-item loop, and
several adapters in one pass equal to each alone."""

import copy
import csv
import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast

from mlora.config import LoraConfig, MixLoraConfig
from mlora.data import load_items
from mlora.evaluate import (
    BASE,
    EvalResults,
    EvaluationError,
    TaskResult,
    adapter_spec,
    base_spec,
    continuation_length,
    evaluate,
    evaluate_adapters,
    format_table,
    save_results,
    score_choice,
    score_loglikelihood,
)
from mlora.evaluate.batched import _prepare, _schedule, _share_within
from mlora.evaluate.protocols import NO_LIMIT
from mlora.io import merged_model
from mlora.model.adapted import MultiAdapterModel
from tests.model.helpers import randomise_b
from tests.tiny import tiny_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TASKS = ("arc-c", "winogrande", "hellaswag")  # 3-5 choices; per-choice contexts; long endings
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
EXTRA_WORDS = ["cat", "dog", "hot", "water", "fire", "sky", "tree", "moon"]


def fixture_items(task, limit=None):
    return load_items(task, "eval", FIXTURES / task, limit=limit)


def vocab_tokenizer(texts, leave_out=()):
    """A word-level tokenizer (punctuation split off, BOS added) knowing every word of `texts`
    but `leave_out`, so that fixture rows get distinct ids and lengths."""
    splitter = pre_tokenizers.Whitespace()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for text in texts:
        for piece, _ in splitter.pre_tokenize_str(text):
            if piece not in leave_out:
                vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def all_texts():
    texts = list(EXTRA_WORDS)
    for task in ("arc-c", "arc-e", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande"):
        for item in fixture_items(task):
            texts += [item.prompt, *item.loglikelihood.contexts, *item.loglikelihood.continuations]
    return texts


TOKENIZER = vocab_tokenizer(all_texts())
VOCAB = len(TOKENIZER)


def lora(name, task_name="arc-c;winogrande;hellaswag", **kw):
    data = ";".join(str(FIXTURES / t) for t in task_name.split(";"))
    settings = {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
                "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    settings.update(kw)
    return LoraConfig(name=name, task_name=task_name, data=data, **settings)


def rigged(bias: dict[str, float]) -> MultiAdapterModel:
    """A model whose logits are the same at every position: lm_head has zero weights and a bias
    that favours the given words (every other token has logit 0)."""
    hf = tiny_model(vocab=VOCAB)
    head = nn.Linear(hf.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for word, value in bias.items():
            head.bias[TOKENIZER.convert_tokens_to_ids(word)] = value
    hf.lm_head = head
    return MultiAdapterModel(hf)


def write_arc(path: Path, rows) -> Path:
    """rows: (question, [choice texts], answer index) -> an ARC-layout jsonl test split."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "test.jsonl", "w") as f:
        for i, (question, texts, answer) in enumerate(rows):
            labels = [chr(65 + k) for k in range(len(texts))]
            f.write(json.dumps({"id": f"q{i}", "question": question, "answerKey": labels[answer],
                                "choices": {"text": texts, "label": labels}}) + "\n")
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls gain nothing from two threads, and lose a lot when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------- the pure scores


def test_score_choice_is_softmax_over_the_items_labels_only():
    logits = torch.tensor([0.0, 9.0, 1.0, 2.0, 3.0])
    got = score_choice(logits, [2, 4, 3])
    z = math.log(math.exp(1) + math.exp(3) + math.exp(2))
    assert got.tolist() == pytest.approx([1 - z, 3 - z, 2 - z])


def test_score_loglikelihood_sums_the_continuations_log_probs():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    expected = (1 - math.log(1 + math.e + math.e**2)) + (0 - math.log(math.e**2 + 2))
    assert score_loglikelihood(logits, [1, 2]) == pytest.approx(expected)


def test_continuation_length_leaves_out_the_joining_space():
    assert continuation_length(" a copper wire") == len("a copper wire")
    assert continuation_length("x") == 1 and continuation_length(" ") == 1


# ------------------------------------------------------------------------- rigged models


@pytest.mark.parametrize("letter", ["A", "B", "C"])
def test_choice_picks_the_letter_a_rigged_model_prefers(letter):
    # Bias 4 on `letter` and 8 on "E": "E" must win only where the item has an E choice.
    model = rigged({letter: 4.0, "E": 8.0})
    cfg = lora("x", task_name="arc-c;siqa")
    model.add_adapter(cfg)  # B = 0: the adapter leaves the rigged output as it is
    results = evaluate_adapters(model, TOKENIZER, [cfg])
    for task in ("arc-c", "siqa"):
        items = fixture_items(task)
        result = results.result("x", task)
        want = [4 if len(it.labels) == 5 else "ABCDE".index(letter) for it in items]
        assert result.predictions == want
        for it, scores in zip(items, result.scores):
            logits = [8.0 if lab == "E" else 4.0 if lab == letter else 0.0 for lab in it.labels]
            z = math.log(sum(math.exp(v) for v in logits))
            assert scores == pytest.approx([v - z for v in logits], abs=1e-5)
        assert result.acc == sum(w == it.answer for w, it in zip(want, items)) / len(items)
        assert result.items == len(items) and result.split in ("test", "validation")


def test_loglikelihood_picks_the_continuation_a_rigged_model_prefers(tmp_path):
    rows = [("which is hot ?", ["fire", "water", "sky"], 0), ("which is hot ?", ["moon", "tree", "fire"], 2),
            ("which is a pet ?", ["sky", "cat", "moon"], 1), ("which is a pet ?", ["water", "moon", "dog"], 2)]
    data = write_arc(tmp_path / "arc", rows)
    bias = {"fire": 8.0, "cat": 7.0, "dog": 7.5}
    model = rigged(bias)
    cfg = LoraConfig(name="x", task_name="arc-e", data=str(data), protocol="loglikelihood", lora_dropout=0.0)
    model.add_adapter(cfg)
    result = evaluate_adapters(model, TOKENIZER, [cfg]).result("x", "arc-e")
    assert result.predictions == [0, 2, 1, 2] and result.acc == 1.0 and result.acc_norm == 1.0
    # Constant logits: log P(word) = bias(word) - logsumexp(all biases), one token per choice.
    lse = math.log(VOCAB - 3 + sum(math.exp(b) for b in bias.values()))
    for (_, texts, _), scores in zip(rows, result.scores):
        assert scores == pytest.approx([bias.get(t, 0.0) - lse for t in texts], abs=1e-4)


def test_acc_norm_divides_by_characters_and_can_disagree_with_acc(tmp_path):
    # Uniform logits: every token costs log V, so the 1-token choice wins on the sum, while the
    # 4-token choice (17 characters) costs less per character than " cat" (3 characters).
    data = write_arc(tmp_path / "arc", [("which one ?", ["cat", "hot dog water fire"], 1)])
    model = rigged({})
    cfg = LoraConfig(name="x", task_name="arc-e", data=str(data), protocol="loglikelihood")
    model.add_adapter(cfg)
    result = evaluate_adapters(model, TOKENIZER, [cfg]).result("x", "arc-e")
    assert result.scores[0] == pytest.approx([-math.log(VOCAB), -4 * math.log(VOCAB)], abs=1e-4)
    assert result.lengths[0] == [3, 18]
    assert (result.acc, result.acc_norm) == (0.0, 1.0)


def test_choice_refuses_labels_the_tokenizer_cannot_tell_apart(tmp_path):
    letterless = vocab_tokenizer(all_texts(), leave_out=("A", "B", "C", "D", "E"))  # letters -> <unk>
    model = MultiAdapterModel(tiny_model(vocab=len(letterless)))
    cfg = lora("x", task_name="arc-c")
    model.add_adapter(cfg)
    with pytest.raises(EvaluationError, match="cannot tell them apart.*loglikelihood"):
        evaluate_adapters(model, letterless, [cfg])


# --------------------------------------------------------- parity with an independent loop


@pytest.fixture(scope="module")
def two_models():
    """A random tiny base with a trained-looking LoRA adapter, and independent plain HF copies."""
    hf = tiny_model(vocab=VOCAB, seed=1)
    plain_base = copy.deepcopy(hf)
    model = MultiAdapterModel(hf)
    cfg = lora("ad")
    model.add_adapter(cfg, seed=2)
    randomise_b(model, "ad", std=0.3)
    return model, cfg, {"ad": merged_model(model, "ad"), BASE: plain_base}


@functools.cache
def reference_scores(hf, task, protocol, limit, max_length=None):
    """One item at a time, one choice at a time, no padding, log-softmax written out by hand."""
    out = []
    for item in fixture_items(task, limit):
        if protocol == "choice":
            ids = TOKENIZER.encode(item.prompt)[-max_length:] if max_length else TOKENIZER.encode(item.prompt)
            logits = hf(input_ids=torch.tensor([ids])).logits[0, -1].double()
            labels = logits[[TOKENIZER.convert_tokens_to_ids(lab) for lab in item.labels]]
            out.append((labels - labels.exp().sum().log()).tolist())
            continue
        scores = []
        for context, continuation in item.loglikelihood.pairs():
            ctx = TOKENIZER.encode(context)
            cont = TOKENIZER.encode(continuation, add_special_tokens=False)
            assert ctx + cont == TOKENIZER.encode(context + continuation)
            ids = (ctx + cont)[:-1]
            cut = max(0, len(ids) - max_length) if max_length else 0
            logits = hf(input_ids=torch.tensor([ids[cut:]])).logits[0].double()
            log_probs = logits - logits.exp().sum(-1, keepdim=True).log()
            scores.append(sum(log_probs[len(ctx) - 1 + j - cut, t].item() for j, t in enumerate(cont)))
        out.append(scores)
    return out


@pytest.mark.parametrize("protocol", ["choice", "loglikelihood"])
@pytest.mark.parametrize("padding_side,batch_size,share_context", [
    ("left", 3, True), ("right", 1, True), ("right", 3, False), ("left", 3, False)])
def test_scores_equal_an_unpadded_per_item_loop(two_models, protocol, padding_side, batch_size, share_context):
    model, cfg, plain = two_models
    cfg = dataclasses.replace(cfg, evaluate_batch_size=batch_size)
    results = evaluate_adapters(model, TOKENIZER, [cfg], protocol, limit=4, include_base=True,
                                simultaneous=2, padding_side=padding_side, share_context=share_context)
    assert results.adapters == ["ad", BASE]
    # fp32 sums of ~30 tokens. The plain layout with left padding shifts rotary positions (no
    # explicit positions there), so rounding differs more.
    shifted = padding_side == "left" and not share_context
    tol = {"abs": 1e-4, "rel": 1e-5} if shifted else {"abs": 1e-5, "rel": 2e-6}
    for name in ("ad", BASE):
        for task in TASKS:
            result = results.result(name, task)
            expected = reference_scores(plain[name], task, protocol, limit=4)
            assert len(result.scores) == len(expected) == 4
            for got, want in zip(result.scores, expected):
                assert got == pytest.approx(want, **tol)
            assert result.protocol == protocol
    # The adapter changes the scores: the parity above is not a base-vs-base tautology.
    assert results.result("ad", "hellaswag").scores != results.result(BASE, "hellaswag").scores


def test_an_items_choices_share_one_row(two_models):
    model, cfg, _ = two_models
    spec = adapter_spec(cfg, "loglikelihood")
    items = [fixture_items(task, 3) for task in TASKS]  # the adapter's tasks, in order
    for share in (True, False):
        _, queues = _prepare(model, TOKENIZER, [spec], "eval", 3, 256, share)
        rows = [row for batch in queues[0] for row in batch]
        assert len(rows) == sum(len(it.labels) if not share else 1 for task in items for it in task)
        if not share:
            assert all(not row.blocks and len(row.reads) == 1 for row in rows)
            continue
        for row in rows:
            item = items[row.owner][row.item]
            assert sorted(read.choice for read in row.reads) == list(range(len(item.labels)))
            # Each choice reads exactly what its own plain request reads: same tokens before the
            # read position, at the same positions.
            positions, segments = row.positions(), row.segments()
            for read, (context, continuation) in zip(row.reads, item.loglikelihood.pairs()):
                whole = TOKENIZER.encode(context + continuation)
                for column, target in zip(read.columns, read.targets):
                    seen = [row.ids[j] for j in range(column + 1) if segments[j] in (0, segments[column])]
                    assert seen == whole[:positions[column] + 1] and whole[positions[column] + 1] == target


def test_switch_routing_and_flash_attention_keep_one_row_per_choice(two_models):
    model, cfg, _ = two_models
    switch = MixLoraConfig(name="sw", task_name="arc-c", data=str(FIXTURES / "arc-c"), num_experts=2,
                           routing_strategy="mixlora-switch", r=4, protocol="loglikelihood")
    model.add_adapter(switch)
    try:
        # Expert capacity is counted per row, so sharing a row would change the routing.
        assert _share_within(model, adapter_spec(switch), 256) is None
        assert _share_within(model, adapter_spec(cfg), 256) == 256
        assert _share_within(model, adapter_spec(cfg), None) == NO_LIMIT
    finally:
        model.remove_adapter("sw")
    config = model.model.config
    saved = config._attn_implementation
    try:
        config._attn_implementation = "flash_attention_2"  # no custom 4-D masks there
        assert _share_within(model, adapter_spec(cfg), 256) is None
    finally:
        config._attn_implementation = saved


@pytest.mark.parametrize("arch,overrides", [
    ("gemma2", {}),  # eager attention, logit soft-capping
    ("mistral", {"sliding_window": 12}),  # requests longer than the window keep plain rows
    ("gemma2", {"sliding_window": 12}),
    ("qwen2", {}),
])
def test_shared_rows_equal_an_unpadded_loop_on_other_models(arch, overrides):
    hf = tiny_model(arch, vocab=VOCAB, seed=5, **overrides)
    plain = copy.deepcopy(hf)
    spec = base_spec([lora("x")], "loglikelihood")
    results = evaluate(MultiAdapterModel(hf), TOKENIZER, [spec], limit=3)
    for task in TASKS:
        for got, want in zip(results.result(BASE, task).scores, reference_scores(plain, task, "loglikelihood", 3)):
            assert got == pytest.approx(want, abs=1e-5, rel=2e-6)


def test_a_windowed_model_runs_shared_rows_apart_from_long_plain_rows(tmp_path):
    # Window 10: the short items share rows, the long ones cannot, and the switch-routed adapter
    # has plain rows only. Its long rows, scheduled beside the base's shared rows, must still get
    # the model's windowed mask: the same scores as when it is scored alone.
    short, long = "which is hot ?", "which of the cat dog tree moon sky water fire is the hot one ?"
    data = write_arc(tmp_path / "arc", [(short, ["fire", "water", "sky"], 0)] * 2 + [(long, ["fire", "dog"], 0)] * 2)
    model = MultiAdapterModel(tiny_model("mistral", vocab=VOCAB, seed=6, sliding_window=10))
    switch = MixLoraConfig(name="sw", task_name="arc-e", data=str(data), num_experts=2, r=4, lora_dropout=0.0,
                           routing_strategy="mixlora-switch", protocol="loglikelihood", evaluate_batch_size=4)
    model.add_adapter(switch, seed=0)
    _, queues = _prepare(model, TOKENIZER, [adapter_spec(switch), base_spec([switch])], "eval", None, 256, True)
    assert [bool(batch[0].blocks) for batch in queues[1]] == [True, False]  # the base: shared rows first
    together = evaluate(model, TOKENIZER, [adapter_spec(switch), base_spec([switch])], simultaneous=2)
    alone = evaluate(model, TOKENIZER, [adapter_spec(switch)], share_context=False)
    for got, want in zip(together.result("sw", "arc-e").scores, alone.result("sw", "arc-e").scores):
        assert got == pytest.approx(want, abs=1e-5)


def test_letters_of_several_tokens_are_scored_as_sequences():
    # A small BPE writes some letters after "Answer:" as two tokens ("▁", "D"): those items are
    # scored by each letter's log-likelihood, restricted to the item's letters by a log-softmax;
    # the others by the logits at the answer position. The reference does every item the long way.
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(all_texts() * 3, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                                           show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    assert len(tok.tokenize(" D")) == 2 and len(tok.tokenize(" A")) == 1
    hf = tiny_model(vocab=len(tok), seed=4)
    cfg = lora("x", task_name="obqa;arc-c", evaluate_batch_size=3)
    results = evaluate(MultiAdapterModel(copy.deepcopy(hf)), tok, [base_spec([cfg])], limit=5)
    for task in ("obqa", "arc-c"):
        for item, got in zip(fixture_items(task, 5), results.result(BASE, task).scores):
            sums = []
            for target in item.label_targets:
                context, whole = tok.encode(item.prompt), tok.encode(item.prompt + target)
                assert whole[:len(context)] == context
                logits = hf(input_ids=torch.tensor([whole[:-1]])).logits[0].double()
                log_probs = logits - logits.exp().sum(-1, keepdim=True).log()
                sums.append(sum(log_probs[j - 1, whole[j]] for j in range(len(context), len(whole))))
            sums = torch.stack(sums)
            assert got == pytest.approx((sums - sums.exp().sum().log()).tolist(), abs=1e-5)


def test_long_rows_lose_tokens_on_the_left(two_models):
    model, cfg, plain = two_models
    spec = adapter_spec(cfg, "loglikelihood")
    results = evaluate(model, TOKENIZER, [spec], limit=2, max_length=12)
    result = results.result("ad", "hellaswag")
    assert result.truncated > 0
    expected = reference_scores(plain["ad"], "hellaswag", "loglikelihood", limit=2, max_length=12)
    for got, want in zip(result.scores, expected):
        assert got == pytest.approx(want, abs=1e-5, rel=2e-6)


# ------------------------------------------------------------ several adapters in one pass


def test_adapters_in_one_pass_equal_each_alone():
    model = MultiAdapterModel(tiny_model(vocab=VOCAB, seed=3))
    cfgs = [lora("l1", evaluate_batch_size=2),
            lora("d1", task_name="arc-c", use_dora=True, evaluate_batch_size=3, protocol="loglikelihood"),
            MixLoraConfig(name="m1", task_name="winogrande;hellaswag", num_experts=3, top_k=2, r=4,
                          lora_dropout=0.0, router_init_range=0.5, evaluate_batch_size=4,
                          data=f"{FIXTURES / 'winogrande'};{FIXTURES / 'hellaswag'}")]
    gen = torch.Generator().manual_seed(0)
    for i, cfg in enumerate(cfgs):
        model.add_adapter(cfg, seed=i)
        with torch.no_grad():
            for key, p in model.adapter_parameters(cfg.name).items():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    together = evaluate_adapters(model, TOKENIZER, cfgs, limit=5, simultaneous=3, include_base=True)
    assert together.adapters == ["l1", "d1", "m1", BASE]
    assert [(r.adapter, r.task) for r in together.tasks] == [
        ("l1", "arc-c"), ("l1", "winogrande"), ("l1", "hellaswag"), ("d1", "arc-c"),
        ("m1", "winogrande"), ("m1", "hellaswag"), (BASE, "arc-c"), (BASE, "winogrande"), (BASE, "hellaswag")]
    # Alone, in the plain layout (one row per choice): the shared rows of the mixed batch score
    # the same.
    alone = [evaluate_adapters(model, TOKENIZER, [cfg], limit=5, share_context=False) for cfg in cfgs]
    alone.append(evaluate(model, TOKENIZER, [base_spec(cfgs)], limit=5, share_context=False))
    for result in together.tasks:
        single = next(r for res in alone for r in res.tasks if (r.adapter, r.task) == (result.adapter, result.task))
        assert result.protocol == single.protocol
        for got, want in zip(result.scores, single.scores):
            assert got == pytest.approx(want, abs=1e-5)
    assert together.result("m1", "hellaswag").scores != together.result(BASE, "hellaswag").scores


def test_schedule_fills_freed_places_with_waiting_adapters():
    queues = [[["a0"], ["a1"], ["a2"]], [["b0"]], [], [["c0"], ["c1"]]]
    forwards = list(_schedule(queues, 2))
    assert forwards == [[(0, ["a0"]), (1, ["b0"])], [(0, ["a1"]), (3, ["c0"])], [(0, ["a2"]), (3, ["c1"])]]


def test_evaluation_leaves_a_training_model_in_training_mode(two_models):
    model, cfg, _ = two_models
    model.train()
    try:
        evaluate_adapters(model, TOKENIZER, [cfg], limit=1)
        assert model.training
    finally:
        model.eval()


def test_casual_tasks_are_skipped_and_no_benchmark_is_an_error(two_models):
    model, _, _ = two_models
    chat = LoraConfig(name="chat", task_name="casual", data=str(FIXTURES / "alpaca" / "train.json"))
    with pytest.raises(EvaluationError, match="nothing to evaluate"):
        evaluate_adapters(model, TOKENIZER, [chat])
    assert adapter_spec(chat) is None and base_spec([chat]) is None


# ------------------------------------------------------------------------- table and files


def made_up_results():
    def result(adapter, task, protocol, answers, scores, lengths=(), metrics=("acc",)):
        return TaskResult(adapter, task, protocol, "test", list(answers), [list(s) for s in scores],
                          [list(n) for n in lengths], metrics=metrics)

    return EvalResults([
        result("a", "arc-c", "choice", [0, 1], [[-0.1, -2.0], [-0.2, -1.0]]),  # 1 of 2
        result("a", "boolq", "choice", [1, 1, 0, 0], [[-1, -0.1]] * 4),  # 2 of 4
        result("b", "arc-c", "loglikelihood", [1, 1], [[-3.0, -4.0], [-5.0, -4.0]], [[1, 8], [1, 1]],
               ("acc", "acc_norm")),
    ], model="tiny-llama", split="eval", limit=4)


def test_table_and_files_report_every_score(tmp_path):
    results = made_up_results()
    a_arc, a_boolq, b_arc = results.tasks
    assert (a_arc.acc, a_boolq.acc, b_arc.acc, b_arc.acc_norm) == (0.5, 0.5, 0.5, 1.0)
    table = format_table(results)
    lines = table.splitlines()
    assert "model tiny-llama" in lines[0] and "first 4 items" in lines[0]
    assert lines[1].split() == ["adapter", "metric", "arc-c", "boolq", "avg"]
    assert lines[2].split() == ["a", "acc", "50.0", "50.0", "50.0"]
    assert lines[3].split() == ["b", "acc", "50.0", "-", "50.0"]
    assert lines[4].split() == ["acc_norm", "100.0", "-", "100.0"]
    assert lines[5] == "items: arc-c 2 (test), boolq 4 (test)"

    json_path, csv_path = save_results(results, tmp_path / "out")
    doc = json.loads(json_path.read_text())
    assert doc["model"] == "tiny-llama" and doc["split"] == "eval" and doc["limit"] == 4
    assert doc["results"][1] == {"adapter": "a", "task": "boolq", "protocol": "choice", "split": "test",
                                 "items": 4, "correct": 2, "acc": 0.5, "acc_norm": None, "truncated": 0}
    assert doc["averages"][1] == {"adapter": "b", "protocol": "loglikelihood", "tasks": 1, "items": 2,
                                  "acc": 0.5, "acc_norm": 1.0}
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["adapter"], r["task"]) for r in rows] == [("a", "arc-c"), ("a", "boolq"), ("b", "arc-c"),
                                                         ("a", "average"), ("b", "average")]
    assert rows[2]["acc_norm"] == "1.0" and rows[0]["acc_norm"] == "" and rows[3]["items"] == "6"
