"""The training loop on tiny random models: learning, an independent reference loop, mixed
batches, accumulation, precision paths, gradient checkpointing and non-finite losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import mlora.train.trainer as trainer_module
from mlora.data.casual import ALPACA
from mlora.model.adapted import MultiAdapterModel
from mlora.train.data import adapter_seed
from tests.train.helpers import FIXTURES, PAIRS, adapter, metrics, run_config, train, weights, write_template

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def response_loss(model, tokenizer, pairs) -> float:
    """Mean cross-entropy over the answer tokens (answer + EOS) under the test template, written
    independently of the trainer: the prompt is tokenized alone to find where the answer starts."""
    total, count = 0.0, 0
    with torch.no_grad():
        for question, answer in pairs:
            prompt = f"### instruction :\nwhat is the {question}\n### response :\n"
            prompt_ids = tokenizer.encode(prompt)
            ids = tokenizer.encode(prompt + answer) + [tokenizer.eos_token_id]
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            targets = torch.tensor(ids[len(prompt_ids):])
            total += F.cross_entropy(logits[len(prompt_ids) - 1:-1], targets, reduction="sum").item()
            count += len(targets)
    return total / count


def test_loss_falls_on_a_learnable_task(base_model, pairs_file, tmp_path):
    cfg = run_config([adapter("pairs", pairs_file, batch_size=8, micro_batch_size=4, num_epochs=30, lr=2e-2, r=8,
                              lora_alpha=16, target_modules=ALL7, prompt=write_template(tmp_path))])
    summary = train(cfg, base_model, tmp_path / "out")
    result = summary.adapters["pairs"]
    assert result.status == "finished" and result.steps == 30
    assert result.folder == tmp_path / "out" / "pairs"

    # Scored by PEFT on a freshly loaded base: independent of our engine and loss code.
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    before = response_loss(AutoModelForCausalLM.from_pretrained(base_model).eval(), tokenizer, PAIRS)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), str(result.folder)).eval()
    after = response_loss(tuned, tokenizer, PAIRS)
    assert after < 0.3 * before, (before, after)

    logged = [r for r in metrics(tmp_path / "out", "pairs") if "event" not in r]
    assert [r["step"] for r in logged] == list(range(1, 31))
    assert logged[-1]["loss"] < 0.3 * logged[0]["loss"]
    assert set(logged[0]) >= {"step", "loss", "aux_loss", "lr", "grad_norm", "tokens", "seconds"}
    # The first batch's logged loss is the base model's loss on the same tokens.
    assert logged[0]["loss"] == pytest.approx(before, rel=1e-4)


def test_matches_an_independent_reference_loop(base_model, pairs_file, tmp_path):
    """AdamW + weight decay + clipping + linear warm-up, with 4 accumulated micro-batches,
    against a plain loop over one full batch that computes everything itself."""
    cfg = run_config([adapter("ref", pairs_file, batch_size=8, micro_batch_size=2, num_epochs=3, lr=1e-2,
                              weight_decay=0.1, max_grad_norm=0.05, scheduler_type="linear", warmup_steps=1)])
    summary = train(cfg, base_model, tmp_path / "out", seed=7)
    trained = weights(summary.adapters["ref"].folder)

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = MultiAdapterModel(AutoModelForCausalLM.from_pretrained(base_model))
    model.add_adapter(cfg.lora[0], seed=adapter_seed(7, "ref"))  # the same initial weights
    model.train()
    params = model.adapter_parameters("ref")
    rows, labels = [], []
    for question, answer in PAIRS:
        prompt_ids = tokenizer.encode(ALPACA.render(f"what is the {question}"))
        ids = tokenizer.encode(ALPACA.render(f"what is the {question}") + answer) + [tokenizer.eos_token_id]
        rows.append(ids)
        labels.append([-100] * len(prompt_ids) + ids[len(prompt_ids):])
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels])
    from mlora.model.context import BatchLayout

    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    for lr in (0.0, 1e-2, 5e-3):  # linear schedule, 1 warm-up step of 3: 0/1, (3-1)/2, (3-2)/2
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(ids, mask, BatchLayout.from_sizes([("ref", len(rows))])).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        grads = [p.grad for p in params.values()]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        for g in grads:
            g.mul_(min(1.0, 0.05 / (norm.item() + 1e-6)))
        optimizer.step()
        optimizer.zero_grad()

    peft_names = {k.removeprefix("base_model.model."): v for k, v in trained.items()}
    assert set(peft_names) == set(params)
    for key, p in params.items():
        # Adam divides by the gradient's own size, so fp32 rounding in a tiny gradient entry
        # (the loss sums in another order than F.cross_entropy) moves a weight by ~1e-6.
        torch.testing.assert_close(peft_names[key], p.detach(), rtol=1e-4, atol=1e-5)
    assert any(p.abs().sum() > 0 for k, p in params.items() if "lora_B" in k)


def test_adapters_trained_together_equal_each_trained_alone(base_model, pairs_file, other_pairs_file, tmp_path):
    a = adapter("a", pairs_file, batch_size=4, micro_batch_size=2, num_epochs=2)
    b = adapter("b", other_pairs_file, batch_size=2, micro_batch_size=1, num_epochs=2, optim="sgd", momentum=0.9,
                lr=5e-2, expand_side="left", r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "gate_proj"])
    together = train(run_config([a, b]), base_model, tmp_path / "both")
    alone_a = train(run_config([a]), base_model, tmp_path / "a")
    alone_b = train(run_config([b]), base_model, tmp_path / "b")
    for name, alone in (("a", alone_a), ("b", alone_b)):
        mixed, single = weights(together.adapters[name].folder), weights(alone.adapters[name].folder)
        assert set(mixed) == set(single)
        for key in single:
            torch.testing.assert_close(mixed[key], single[key], rtol=1e-4, atol=1e-6)
        assert any(single[k].abs().sum() > 0 for k in single if "lora_B" in k)


def test_dropout_and_jitter_do_not_depend_on_batch_neighbours(base_model, pairs_file, other_pairs_file, tmp_path):
    """Each adapter draws dropout masks and router jitter from its own stream, so with dropout on
    an adapter trained beside another still ends exactly where it ends alone."""
    a = adapter("a", pairs_file, lora_dropout=0.2)
    b = adapter("b", other_pairs_file, lora_dropout=0.3, routing_strategy="mixlora", num_experts=3, top_k=2,
                jitter_noise=0.1, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    together = train(run_config([b, a]), base_model, tmp_path / "both")
    alone_a = train(run_config([a]), base_model, tmp_path / "a")
    alone_b = train(run_config([b]), base_model, tmp_path / "b")
    for name, alone in (("a", alone_a), ("b", alone_b)):
        mixed, single = weights(together.adapters[name].folder), weights(alone.adapters[name].folder)
        for key in single:
            torch.testing.assert_close(mixed[key], single[key], rtol=1e-4, atol=1e-6)
    # and dropout is really on: without it the weights differ
    no_drop = train(run_config([adapter("a", pairs_file)]), base_model, tmp_path / "nodrop")
    key = next(k for k in weights(no_drop.adapters["a"].folder) if "lora_B" in k)
    assert not torch.allclose(weights(no_drop.adapters["a"].folder)[key], weights(alone_a.adapters["a"].folder)[key])


def test_accumulation_weights_micro_batches_like_one_batch(base_model, pairs_file, tmp_path):
    micro = train(run_config([adapter("acc", pairs_file, batch_size=8, micro_batch_size=2, num_epochs=3)]),
                  base_model, tmp_path / "micro")
    whole = train(run_config([adapter("acc", pairs_file, batch_size=8, micro_batch_size=8, num_epochs=3)]),
                  base_model, tmp_path / "whole")
    w_micro, w_whole = weights(micro.adapters["acc"].folder), weights(whole.adapters["acc"].folder)
    for key in w_whole:
        torch.testing.assert_close(w_micro[key], w_whole[key], rtol=1e-4, atol=1e-6)
    loss_micro = [r["loss"] for r in metrics(tmp_path / "micro", "acc")]
    loss_whole = [r["loss"] for r in metrics(tmp_path / "whole", "acc")]
    assert loss_micro == pytest.approx(loss_whole, rel=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_bases_train(base_model, pairs_file, tmp_path, dtype):
    cfg = run_config([adapter("lowp", pairs_file, batch_size=4, micro_batch_size=2, num_epochs=6, lr=2e-2)])
    summary = train(cfg, base_model, tmp_path / "out", dtype=dtype)
    assert summary.adapters["lowp"].status == "finished"
    assert next(summary.model.model.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    saved = weights(summary.adapters["lowp"].folder)
    assert all(t.dtype == torch.float32 for t in saved.values())  # adapters stay fp32
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)
    records = metrics(tmp_path / "out", "lowp")
    stepped = [r for r in records if "event" not in r]
    assert stepped and all(math.isfinite(r["loss"]) for r in stepped)
    assert stepped[-1]["loss"] < stepped[0]["loss"]
    if dtype == "bf16":
        assert len(stepped) == len(records)  # no loss scaling, nothing skipped


def test_gradient_checkpointing_gives_the_same_weights(base_model, pairs_file, tmp_path):
    """With dropout on: the recomputed forward must replay the same layout and dropout masks."""
    cfg = run_config([adapter("gc", pairs_file, lora_dropout=0.2, num_epochs=2)])
    plain = train(cfg, base_model, tmp_path / "plain")
    checkpointed = train(cfg, base_model, tmp_path / "gc", gradient_checkpointing=True)
    a, b = weights(plain.adapters["gc"].folder), weights(checkpointed.adapters["gc"].folder)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_non_finite_losses_skip_steps_and_stop_only_that_adapter(base_model, pairs_file, other_pairs_file,
                                                                 tmp_path, monkeypatch, caplog):
    real_loss = trainer_module.adapter_loss
    calls = {"flaky": 0}

    def poisoned(ar, *args):
        loss, aux = real_loss(ar, *args)
        if ar.name == "bad":
            return loss * float("nan"), aux
        if ar.name == "flaky":
            calls["flaky"] += 1
            if calls["flaky"] == 2:  # the second micro-batch: poisons optimizer step 1
                return loss * float("inf"), aux
        return loss, aux

    monkeypatch.setattr(trainer_module, "adapter_loss", poisoned)
    cfg = run_config([adapter("bad", other_pairs_file, num_epochs=3), adapter("flaky", pairs_file, num_epochs=3)])
    with caplog.at_level("WARNING", logger="mlora.train"):
        summary = train(cfg, base_model, tmp_path / "out")

    bad, flaky = summary.adapters["bad"], summary.adapters["flaky"]
    assert bad.status == "failed" and "3 steps in a row" in bad.message and bad.folder is None
    assert not (tmp_path / "out" / "bad").exists()
    bad_events = [r["event"] for r in metrics(tmp_path / "out", "bad")]
    assert bad_events == ["nan_loss", "nan_loss", "nan_loss", "stopped"]

    assert flaky.status == "finished" and flaky.steps == 6
    records = metrics(tmp_path / "out", "flaky")
    assert records[0]["event"] == "nan_loss" and records[0]["step"] == 1
    assert [r["step"] for r in records[1:]] == [2, 3, 4, 5, 6]
    assert "bad: stopped" in caplog.text and "flaky: step 1 skipped" in caplog.text


def test_mixlora_adapter_learns_with_router_loss(base_model, pairs_file, tmp_path):
    from mlora.config import MixLoraConfig
    from tests.tiny import tiny_model

    try:
        MultiAdapterModel(tiny_model()).add_adapter(MixLoraConfig(name="probe", task_name="arc-e"))
    except NotImplementedError as err:
        pytest.skip(f"MixLoRA is not built yet: {err}")
    moe = adapter("moe", pairs_file, batch_size=8, micro_batch_size=4, num_epochs=30, lr=2e-2, r=8, lora_alpha=16,
                  routing_strategy="mixlora", num_experts=4, top_k=2, router_aux_loss_coef=0.01,
                  target_modules=ALL7, prompt=write_template(tmp_path))
    summary = train(run_config([moe]), base_model, tmp_path / "out")
    assert summary.adapters["moe"].status == "finished"
    logged = [r for r in metrics(tmp_path / "out", "moe") if "event" not in r]
    assert logged[-1]["loss"] < 0.3 * logged[0]["loss"]
    # The balance loss coef * E * sum_e f_e P_e lies in (0, coef * E] (f_e <= 1, sum_e P_e = 1).
    assert all(0.0 < r["aux_loss"] <= 0.01 * 4 + 1e-6 for r in logged)


def test_evaluate_steps_scores_during_training_without_changing_it(base_model, tmp_path):
    # The fixture folder holds train.jsonl (12 rows: 3 steps per epoch) and test.jsonl (8 items).
    arc = adapter("arc", str(FIXTURES / "arc-e"), task_name="arc-e", num_epochs=2, lora_dropout=0.1)
    scored = train(run_config([{**arc, "evaluate_steps": 2}]), base_model, tmp_path / "scored")
    plain = train(run_config([arc]), base_model, tmp_path / "plain")
    evals = [r for r in metrics(tmp_path / "scored", "arc") if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["task"] == "arc-e" and r["items"] == 8 and 0.0 <= r["acc"] <= 1.0 for r in evals)
    a, b = weights(scored.adapters["arc"].folder), weights(plain.adapters["arc"].folder)
    assert all(torch.equal(a[k], b[k]) for k in a)  # scoring draws no randomness, touches no weights


@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantized_bases_train(base_model, pairs_file, tmp_path, quantize):
    pytest.importorskip("bitsandbytes")
    cfg = run_config([adapter("quant", pairs_file, num_epochs=3, use_dora=quantize == "4bit")])
    summary = train(cfg, base_model, tmp_path / "out", quantize=quantize)
    layer = summary.model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[quantize]
    assert summary.adapters["quant"].status == "finished"
    saved = weights(summary.adapters["quant"].folder)
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)
    losses = [r["loss"] for r in metrics(tmp_path / "out", "quant")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)


def test_tensorboard_event_files_when_installed(base_model, pairs_file, tmp_path):
    pytest.importorskip("tensorboard")
    train(run_config([adapter("tb", pairs_file, num_epochs=1)]), base_model, tmp_path / "out")
    assert list((tmp_path / "out" / "_mlora" / "tensorboard" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_on_gpu(base_model, pairs_file, tmp_path, dtype):
    cfg = run_config([adapter("gpu", pairs_file, batch_size=8, micro_batch_size=4, num_epochs=20, lr=2e-2)])
    summary = train(cfg, base_model, tmp_path / "out", dtype=dtype, device="cuda")
    assert summary.adapters["gpu"].status == "finished"
    assert next(summary.model.parameters()).device.type == "cuda"
    stepped = [r for r in metrics(tmp_path / "out", "gpu") if "event" not in r]
    assert stepped and stepped[-1]["loss"] < 0.7 * stepped[0]["loss"]
