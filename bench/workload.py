"""One benchmark configuration, measured: build the model, train a few steps, time them.

`run_job(job)` is what a worker process runs (`python -m bench.workload JOB.json OUT.json`);
`train_throughput.py` starts one fresh process per configuration so that peak memory
figures do not mix. Every configuration trains the same random-weight Llama shape on the
same random batches:

    step = forward + cross-entropy on random labels (the trainer's `token_losses`, one over
           the whole batch, each adapter the mean over its rows) (+ router aux loss for MixLoRA)
           + backward + AdamW step over the adapter parameters (one optimizer per adapter)

Configurations:
    peft         plain `peft.get_peft_model` LoRA + `torch.optim.AdamW` (the reference)
    lora         our engine, 1 LoRA adapter x B rows
    lora-kK      our engine, K LoRA adapters x B/K rows each (same total batch as `lora`)
    mixlora      our MixLoRA (8 experts top-2), shared-base path
    mixlora-ref  our MixLoRA, the per-expert reference path the tests check it against
                 (``tests/model/reference_moe.py``)

``quant: "4bit"`` replaces the decoder layers' frozen projections by bitsandbytes NF4 layers
(double quantization, compute dtype = the job's dtype; lm_head and embeddings stay as built),
what `mlora.model.loading` asks transformers for when it loads a model with ``--quantize 4bit``.

dtype rules: ``fp32`` builds the base in fp32; ``bf16`` builds the base weights in bf16 and
keeps the adapters in fp32 (ours always, peft through its default
``autocast_adapter_dtype=True``), with autocast off: the frozen projections run bf16 GEMMs,
adapter math runs in fp32 and is cast back, as DESIGN.md section 5 prescribes. The loss is
taken on fp32 logits in both.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench.interference import cpu_seconds, other_cpu_share
from mlora.config import DEFAULT_TARGET_MODULES

ALL_PROJECTIONS = list(DEFAULT_TARGET_MODULES)  # every projection an adapter can target

# Random-weight Llama shapes (nothing is downloaded). `tiny` keeps a small vocabulary so that
# the smoke test stays fast, `nano` is the GPU check's dry run (its whole step is overhead);
# the others use the vocabulary of the model they imitate.
SHAPES = {
    "nano": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=4096),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=16, vocab_size=32000),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama7b-2l": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def adapters_of(config: str, micro_batch: int) -> int:
    """How many adapters share the batch in `config` (``lora-k4`` -> 4, others 1)."""
    return int(config.split("-k", 1)[1]) if config.startswith("lora-k") else 1


# ----------------------------------------------------------------------------- building
def build_base(shape: str, dtype: torch.dtype, seq: int, device: str, seed: int) -> nn.Module:
    """A random-weight `LlamaForCausalLM` of `shape`, in `dtype`, SDPA attention, train mode.

    The weights are created and initialised on `device` itself: a 7B shape built on the CPU
    first would take longer to initialise than its whole GPU measurement.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 2048))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.train()


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Replace every `nn.Linear` inside the decoder layers by a bitsandbytes NF4 `Linear4bit`, in place.

    Quantization happens where the weight lives (`Params4bit.to`); the full-precision weight
    is dropped as each layer is replaced, so the peak while quantizing is the built model.
    """
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                        device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                               quant_type="nf4", module=new)
                if child.bias is not None:
                    new.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, new.to(child.weight.device))  # quantizes here


def model_flops_per_token(model: nn.Module, seq: int) -> tuple[float, int]:
    """Useful FLOPs of one training token for a frozen base, and the matmul parameter count N.

    Every frozen linear layer (lm_head included, the embedding lookup not) costs 2 N forward
    and 2 N backward for the activation gradient; frozen weights get no weight gradient, so
    4 N. Attention scores and the weighted sum cost ``4 T d`` per token and layer forward for
    a full ``T x T`` map; causal masking halves that (each query sees ``(T+1)/2`` keys on
    average) and backward doubles it: ``6 L T d`` in all. Adapter FLOPs are not counted:
    they are overhead, and MixLoRA does the same useful work as LoRA.
    """
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    c = model.config
    attention = 6 * c.num_hidden_layers * seq * c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    return 4.0 * n + attention, n


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The trainer's loss, ``(B, T)`` fp32: one cross-entropy over the whole batch, labels shifted.

    Ours and peft both use it, so the loss costs the same in every configuration.
    """
    from mlora.train.trainer import token_losses as trainer_token_losses

    return trainer_token_losses(logits, labels)


def _our_configs(config: str, k: int, lora_dropout: float):
    from mlora.config import LoraConfig, MixLoraConfig

    common = dict(r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules=list(ALL_PROJECTIONS))
    if config.startswith("mixlora"):
        return [MixLoraConfig(name="mixlora", routing_strategy="mixlora", num_experts=8, top_k=2, **common)]
    return [LoraConfig(name=f"lora{i}", **common) for i in range(k)]


class OurTrainer:
    """Our engine: a `MultiAdapterModel` with K adapters, each on B/K contiguous rows."""

    def __init__(self, base: nn.Module, job: dict):
        from mlora.model.adapted import MultiAdapterModel

        k = adapters_of(job["config"], job["micro_batch"])
        self.model = MultiAdapterModel(base)
        self.cfgs = _our_configs(job["config"], k, job["lora_dropout"])
        for i, cfg in enumerate(self.cfgs):
            self.model.add_adapter(cfg, seed=job["seed"] + i)
        if job["config"] == "mixlora-ref":
            from tests.model.reference_moe import use_reference  # the reference lives with the tests

            use_reference(self.model)
        if job["grad_ckpt"]:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        rows = job["micro_batch"] // k
        self.sizes = [(cfg.name, rows) for cfg in self.cfgs]
        self.params = [list(self.model.adapter_parameters(cfg.name).values()) for cfg in self.cfgs]
        self.optimizers = [torch.optim.AdamW(p, lr=1e-4) for p in self.params]

    def trainable(self) -> int:
        return sum(p.numel() for group in self.params for p in group)

    def forward_loss(self, input_ids, attention_mask, labels) -> torch.Tensor:
        from mlora.model.context import BatchLayout
        from mlora.model.router import router_aux_loss

        layout = BatchLayout.from_sizes(self.sizes)
        out = self.model(input_ids, attention_mask, layout)
        per_token = token_losses(out.logits, labels)
        losses = []
        for cfg, seg in zip(self.cfgs, layout.segments):
            loss = per_token[seg.start:seg.end].mean()  # slicing (B, T) losses, not (B, T, V) logits
            if cfg.name in out.router_logits:
                loss = loss + router_aux_loss(cfg, out.router_logits[cfg.name])
            losses.append(loss)
        return torch.stack(losses).sum()  # each adapter its own mean loss, one backward


class PeftTrainer:
    """The reference: `peft` LoRA on the same HF model, one `torch.optim.AdamW`."""

    def __init__(self, base: nn.Module, job: dict):
        import peft

        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=job["lora_dropout"],
                              target_modules=list(ALL_PROJECTIONS), task_type="CAUSAL_LM")
        if job["grad_ckpt"]:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(job["seed"])
        self.model = peft.get_peft_model(base, cfg)
        self.model.train()
        self.params = [[p for p in self.model.parameters() if p.requires_grad]]
        self.optimizers = [torch.optim.AdamW(self.params[0], lr=1e-4)]

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params[0])

    def forward_loss(self, input_ids, attention_mask, labels) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return token_losses(out.logits, labels).mean()


def train_step(trainer, batch) -> float:
    """One full training step; returns the loss."""
    from torch.profiler import record_function

    with record_function("## forward+loss"):
        loss = trainer.forward_loss(*batch)
    with record_function("## backward"):
        loss.backward()
    with record_function("## optimizer"):
        for opt in trainer.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def make_batches(count: int, micro_batch: int, seq: int, vocab: int, device: str, seed: int):
    """`count` random ``(input_ids, attention_mask, labels)`` batches, identical for every configuration."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (micro_batch, seq), generator=gen)
        labels = torch.randint(0, vocab, (micro_batch, seq), generator=gen)
        mask = torch.ones(micro_batch, seq, dtype=torch.long)
        batches.append((ids.to(device), mask.to(device), labels.to(device)))
    return batches


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory over a region: process RSS on CPU, `max_memory_allocated` on CUDA.

    On Linux the RSS high-water mark is reset at `start` (``/proc/self/clear_refs``), so the
    peak covers the training steps only, not model construction; where that reset is not
    possible the lifetime peak is reported and `reset_ok` says so.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.reset_ok = True

    @staticmethod
    def _status_mb(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        raise KeyError(key)

    def current_mb(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        try:
            return self._status_mb("VmRSS")
        except OSError:
            return float("nan")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.reset_ok = False

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            return self._status_mb("VmHWM")
        except OSError:
            import resource

            self.reset_ok = False
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def reserved_peak_mb(self) -> float | None:
        """CUDA only: the caching allocator's peak reservation (allocated plus its free blocks)."""
        return torch.cuda.max_memory_reserved() / 2**20 if self.cuda else None


# ----------------------------------------------------------------------------- profiling
def _annotate_modules(model: nn.Module) -> list:
    """Forward ranges per attention and FFN block, so the profile splits forward time by block."""
    from torch.profiler import record_function

    handles = []
    for name, module in model.named_modules():
        label = None
        if name.endswith("self_attn"):
            label = "## attention fwd"
        elif name.endswith(".mlp"):
            label = f"## ffn fwd ({type(module).__name__})"
        if label is None:
            continue

        def pre(mod, args, label=label):
            mod._bench_range = record_function(label)
            mod._bench_range.__enter__()

        def post(mod, args, out):
            mod._bench_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def profile_steps(trainer, batches, job: dict, path: Path, steps: int = 2) -> float | None:
    """Profile `steps` training steps; write the op tables (self time, then total time) to `path`.

    Returns the CPU share other processes took meanwhile (also written in the file's header).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if job["device"].startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    handles = _annotate_modules(trainer.model)
    cpu_before, wall_before = cpu_seconds(), time.perf_counter()
    try:
        with profile(activities=activities) as prof:
            for i in range(steps):
                train_step(trainer, batches[i % len(batches)])
                _sync(job["device"])
    finally:
        for h in handles:
            h.remove()
    other = other_cpu_share(cpu_before, cpu_seconds(), time.perf_counter() - wall_before)
    key = "self_cuda_time_total" if job["device"].startswith("cuda") else "self_cpu_time_total"
    averages = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {job['config']} {job['shape']} {job['dtype']} seq={job['seq']} "
                f"micro_batch={job['micro_batch']} threads={job['threads']}: {steps} profiled steps; "
                f"other processes took {other} of the CPUs meanwhile\n\n")
        f.write("## ops by self time\n")
        f.write(averages.table(sort_by=key, row_limit=30))
        f.write("\n\n## ranges and ops by total time (## rows are annotated phases and blocks)\n")
        f.write(averages.table(sort_by=key.replace("self_", ""), row_limit=30))
        f.write("\n")
    return other


# ----------------------------------------------------------------------------- the job
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_job(job: dict) -> dict:
    """Measure one configuration; returns a JSON-ready dict (see `train_throughput.py`)."""
    torch.set_num_threads(job["threads"])
    from mlora.runtime import tune_cpu_allocator

    result = {key: job[key] for key in ("config", "shape", "dtype", "seq", "micro_batch", "device",
                                        "threads", "steps", "warmup", "grad_ckpt")}
    result["quant"] = job.get("quant")
    # As the training CLI does, for every configuration alike (peft included).
    result["malloc_tuned"] = tune_cpu_allocator()
    k = adapters_of(job["config"], job["micro_batch"])
    result.update(adapters=k, rows_per_adapter=job["micro_batch"] // k)
    if job["micro_batch"] % k:
        return {**result, "status": "skipped",
                "reason": f"micro-batch {job['micro_batch']} is not divisible by K={k}"}
    memory = PeakMemory(job["device"])
    base = build_base(job["shape"], DTYPES[job["dtype"]], job["seq"], job["device"], job["seed"])
    flops, n_matmul = model_flops_per_token(base, job["seq"])  # before quantizing: packed weights count half
    if job.get("quant") == "4bit":
        quantize_4bit(base, DTYPES[job["dtype"]])
    if memory.cuda:
        torch.cuda.empty_cache()  # the full-precision weights a quantized base dropped
    trainer = PeftTrainer(base, job) if job["config"] == "peft" else OurTrainer(base, job)
    vocab = base.config.vocab_size
    batches = make_batches(min(job["steps"] + job["warmup"], 4), job["micro_batch"], job["seq"], vocab,
                           job["device"], job["seed"])

    losses = []
    for i in range(job["warmup"]):
        losses.append(train_step(trainer, batches[i % len(batches)]))
    _sync(job["device"])
    built_mb = memory.current_mb()  # model, adapters, optimizer state and allocator caches
    memory.start()
    cpu_before, wall_before = cpu_seconds(), time.perf_counter()
    times = []
    for i in range(job["steps"]):
        batch = batches[(job["warmup"] + i) % len(batches)]
        _sync(job["device"])
        t0 = time.perf_counter()
        losses.append(train_step(trainer, batch))
        _sync(job["device"])
        times.append(time.perf_counter() - t0)
    peak = memory.peak_mb()
    other = other_cpu_share(cpu_before, cpu_seconds(), time.perf_counter() - wall_before)

    step = statistics.median(times)
    tokens = job["micro_batch"] * job["seq"]
    result.update(
        status="ok",
        step_time_s=step,
        step_time_min_s=min(times),
        step_times_s=times,
        tokens_per_s=tokens / step,
        peak_mem_mb=peak,
        peak_reserved_mb=memory.reserved_peak_mb(),
        mem_before_steps_mb=built_mb,
        peak_mem_kind="cuda max_memory_allocated" if memory.cuda else
        ("process peak RSS over the timed steps" if memory.reset_ok else "process lifetime peak RSS"),
        model_flops_per_token=flops,
        matmul_params=n_matmul,
        achieved_gflops=flops * tokens / step / 1e9,
        trainable_params=trainer.trainable(),
        other_cpu_share=other,
        losses=losses,
    )
    if job.get("profile_dir"):
        name = f"{job['shape']}-{job['dtype']}-seq{job['seq']}-b{job['micro_batch']}-{job['config']}.txt"
        path = Path(job["profile_dir"]) / name
        result["profile_other_cpu_share"] = profile_steps(trainer, batches, job, path)
        result["profile"] = str(path)
    return result


def measure_matmul_peak(dtype: str, sizes: list[int], device: str, threads: int, min_time: float = 0.5) -> dict:
    """Best GFLOP/s of square ``torch.mm`` over `sizes` in `dtype`: the machine's matmul peak.

    Each size runs once to warm up, then repeatedly until `min_time` seconds have passed;
    the fastest repetition counts.
    """
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=DTYPES[dtype])
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=DTYPES[dtype])
        torch.mm(a, b)
        _sync(device)
        best, spent = float("inf"), 0.0
        while spent < min_time:
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
        per_size[str(n)] = 2.0 * n**3 / best / 1e9
    return {"dtype": dtype, "gflops": max(per_size.values()), "per_size_gflops": per_size}


def main_inline(job: dict) -> dict:
    """Run one job (``kind`` "peak", "train", or "batch": a list of jobs) in this process."""
    if job["kind"] == "batch":
        return {"status": "ok", "results": [run_guarded(j) for j in job["jobs"]]}
    if job["kind"] == "peak":
        cpu_before, wall_before = cpu_seconds(), time.perf_counter()
        peaks = [measure_matmul_peak(d, job["sizes"], job["device"], job["threads"]) for d in job["dtypes"]]
        other = other_cpu_share(cpu_before, cpu_seconds(), time.perf_counter() - wall_before)
        return {"status": "ok", "peaks": peaks, "other_cpu_share": other}
    return run_job(job)


def run_guarded(job: dict) -> dict:
    """`main_inline`, with an exception turned into ``status: error`` so that the jobs after it still run."""
    try:
        return main_inline(job)
    except Exception as err:  # noqa: BLE001 -- a failed configuration must not hide the others
        keys = {k: job[k] for k in ("config", "shape", "dtype") if k in job}
        return {**keys, "status": "error", "reason": f"{type(err).__name__}: {err}"}


def main(argv: list[str]) -> int:
    """Worker entry: ``python -m bench.workload JOB.json OUT.json``."""
    job = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(main_inline(job)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
