"""One benchmark configuration trained by N processes under torchrun (data parallelism).

    torchrun --nproc_per_node N -m bench.dist_workload JOB.json OUT.json

`train_throughput.py --torchrun N` starts this. Each rank builds the same random-weight model
and adapter as `bench.workload` (`OurTrainer`), trains ``micro_batch / N`` rows of every
global micro-batch of ``micro_batch`` rows (the same global batch as the 1-process figure next
to it), sums the adapter gradients over the ranks with the trainer's own `GradReducer`
(buckets all-reduced from gradient hooks while backward runs), then steps AdamW. Rank 0 writes
the result: the median step time, tokens/s of the global batch, and the all-reduce share of
the step: the time spent waiting for the gradient sums after backward (what backward did not
hide), over the step time.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import workload


def run_job(job: dict) -> dict | None:
    """Measure `job` on this rank; rank 0 returns the result, the others None."""
    from mlora.train import distributed

    world = distributed.init_world(job["device"], timeout_s=600)
    size = 1 if world is None else world.size
    rank = 0 if world is None else world.rank
    torch.set_num_threads(job["threads"])
    result = {key: job[key] for key in ("config", "shape", "dtype", "seq", "micro_batch", "device", "threads",
                                        "steps", "warmup")}
    result.update(processes=size, rows_per_process=job["micro_batch"] // size)
    if job["micro_batch"] % size:
        return {**result, "status": "skipped",
                "reason": f"micro-batch {job['micro_batch']} is not divisible by {size} processes"}
    device = distributed.rank_device(job["device"], world) or "cpu"
    base = workload.build_base(job["shape"], workload.DTYPES[job["dtype"]], job["seq"], device, job["seed"])
    trainer = workload.OurTrainer(base, {**job, "micro_batch": job["micro_batch"] // size, "device": device})
    reducer = distributed.GradReducer(world) if world is not None else None
    names = [cfg.name for cfg in trainer.cfgs]
    if reducer is not None:
        for cfg in trainer.cfgs:
            reducer.add(cfg.name, trainer.model.adapter_parameters(cfg.name))
    rows = slice(rank * job["micro_batch"] // size, (rank + 1) * job["micro_batch"] // size)
    batches = [tuple(t[rows] for t in b) for b in workload.make_batches(
        min(job["steps"] + job["warmup"], 4), job["micro_batch"], job["seq"], base.config.vocab_size, device,
        job["seed"])]

    def step(batch) -> tuple[float, float]:
        waited = reducer.wait_s if reducer is not None else 0.0
        start = time.perf_counter()
        loss = trainer.forward_loss(*batch)
        if reducer is not None:
            reducer.arm(names)
        loss.backward()
        if reducer is not None:
            reducer.finish()
        for opt in trainer.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        workload._sync(device)
        return time.perf_counter() - start, (reducer.wait_s - waited) if reducer is not None else 0.0

    for i in range(job["warmup"]):
        step(batches[i % len(batches)])
    times, waits = [], []
    for i in range(job["steps"]):
        spent, waited = step(batches[(job["warmup"] + i) % len(batches)])
        times.append(spent)
        waits.append(waited)
    # The slowest rank sets the pace: every rank's median, the largest counts.
    medians = distributed.all_gather_object(world, (statistics.median(times), statistics.median(waits))) \
        if world is not None else [(statistics.median(times), statistics.median(waits))]
    step_s, wait_s = max(medians)
    distributed.close_world(world)
    if rank != 0:
        return None
    return {**result, "status": "ok", "step_time_s": step_s, "tokens_per_s": job["micro_batch"] * job["seq"] / step_s,
            "allreduce_wait_s": wait_s, "allreduce_share": wait_s / step_s, "step_times_s": times,
            "trainable_params": trainer.trainable()}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = run_job(job)
    except Exception as err:  # noqa: BLE001 -- reported as the configuration's status
        result = {"config": job["config"], "dtype": job["dtype"], "status": "error",
                  "reason": f"rank {os.environ.get('RANK', '0')}: {type(err).__name__}: {err}"}
        if os.environ.get("RANK", "0") != "0":
            raise
    if result is not None:
        Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
