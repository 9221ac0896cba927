"""All-reduce, all-gather and send/recv through torch.distributed: gloo on CPU, NCCL (RCCL on ROCm) on GPUs.

One process per worker, on this machine (``devices_per_node == num_workers``). Each repetition starts after a
barrier, so rank 0's wall time covers the whole collective. send/recv is timed as a ping-pong between ranks 0 and
1 and halved, so the two processes' clocks never need to agree.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from queue import Empty

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROUNDS = 3


def _worker(rank: int, world: int, port: int, device_kind: str, sizes: list[int], warmup: int, reps: int,
            queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    gpu = device_kind != "cpu"
    if gpu:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    def timed(fn, warmup: int, reps: int) -> list[float]:
        times = []
        for i in range(warmup + reps):
            dist.barrier()
            sync()
            start = time.perf_counter_ns()
            fn()
            sync()
            if i >= warmup:
                times.append((time.perf_counter_ns() - start) / 1e6)
        return times

    # Sizes are visited in several interleaved rounds, so a slow spell of the machine (another process, a
    # frequency drop) spreads over many sizes' samples, where the median discards it, instead of shifting
    # every sample of one size.
    samples: dict[tuple[str, int], list[float]] = {}
    per_round = -(-reps // ROUNDS)
    for round_index in range(ROUNDS):
        round_warmup = warmup if round_index == 0 else 1
        for size in sizes:
            numel = max(world, size // 4)
            data = torch.ones(numel, dtype=torch.float32, device=device)
            samples.setdefault(("all_reduce", size), []).extend(
                timed(lambda: dist.all_reduce(data), round_warmup, per_round))
            shard = torch.ones(numel // world, dtype=torch.float32, device=device)
            gathered = [torch.empty_like(shard) for _ in range(world)]
            samples.setdefault(("all_gather", size), []).extend(
                timed(lambda: dist.all_gather(gathered, shard), round_warmup, per_round))
            if world == 2:
                def ping_pong():
                    if rank == 0:
                        dist.send(data, 1)
                        dist.recv(data, 1)
                    else:
                        dist.recv(data, 0)
                        dist.send(data, 0)
                samples.setdefault(("send_recv", size), []).extend(
                    t / 2 for t in timed(ping_pong, round_warmup, per_round))
    results = [(op, size, times) for (op, size), times in samples.items()]
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def measure_collectives(device_kind: str, world: int, sizes: list[int], warmup: int, reps: int) -> list[dict]:
    """Rows of the measurements schema for every collective and message size over ``world`` local workers."""
    if device_kind != "cpu" and torch.cuda.device_count() < world:
        return []
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, device_kind, sizes, warmup, reps, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = None
    while results is None:
        try:
            results = queue.get(timeout=1.0)
        except Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"collective benchmark worker exited with code {failed[0]}") from None
    for p in procs:
        p.join(timeout=60)
    rows = []
    for op, size, times in results:
        rows.append({"op": op, "dtype": "fp32", "size_bytes": size, "num_workers": world, "devices_per_node": world,
                     "median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
                     "std_ms": statistics.stdev(times) if len(times) > 1 else 0.0, "min_ms": min(times),
                     "max_ms": max(times), "repetitions": len(times)})
    return rows
