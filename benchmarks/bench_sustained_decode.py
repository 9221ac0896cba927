"""Does a decode step slow down over minutes of sustained load? (needs a CUDA GPU; NVML through ``nvidia-ml-py``
for clocks, temperature and power).

The end-to-end step check found Mixtral-8x7B's steps on its TP 2 H100 server growing from 1.39x to 1.71x the
modelled ones during a 20-minute run at a constant operating point (128 running requests of ~1,800 KV tokens).
A kernel model evaluated at a fixed batch and KV length cannot produce a drift, but the GPU's clocks can: HBM and
SM clocks fall when the card heats up or reaches its power limit. This replays one decode step of that shard
(32 layers: RMSNorm, QKV, GQA decode attention over contiguous KV, out-projection, RMSNorm, router, top-2 of 8
experts, the LM head) as a CUDA graph back to back, with every layer's weights and KV in their own memory as on
the server (about 62 GB), and records the step time and NVML's clocks, temperature, power and throttle reasons
over time: a short phase at the light operating point (84 running requests of 694 KV tokens, where the model held
to 1%), the heavy one for ``--seconds``, the light one again.

The kernels are torch's (cuBLAS GEMMs, SDPA's flash attention, the experts as one GEMM pair per expert over a fixed
routing), not vLLM's: what this measures is how one fixed amount of work per step changes in time, and how much
more the heavy point costs than the light one, not vLLM's latency. No all-reduce (one GPU). ``--model
codellama-34b-tp2`` runs CodeLlama-34B's TP 2 shard at its runs' points instead (128 of 1,806; 69 of 699).

    python benchmarks/bench_sustained_decode.py --seconds 240 --out sustained.csv [--model codellama-34b-tp2]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time

import torch
import torch.nn.functional as F

from llmsim.microbench.kernels import capture_cuda_graph


# Per GPU of a TP 2 pair, and the operating points of the measured runs' step check (running requests, KV tokens
# each): Mixtral-8x7B (32/8 heads of 128, 8 experts of 14,336, top 2) and CodeLlama-34B (64/8 heads, a gated MLP
# of 22,016), vocabulary 32,000 split in two.
SHARDS = {
    "mixtral-8x7b-tp2": (dict(layers=32, hidden=4096, q_heads=16, kv_heads=4, head_dim=128, experts=8, top_k=2,
                              inter=7168, vocab=16000), "128,1792", "84,694"),
    "codellama-34b-tp2": (dict(layers=48, hidden=8192, q_heads=32, kv_heads=4, head_dim=128, experts=1, top_k=1,
                               inter=11008, vocab=16000), "128,1806", "69,699"),
}


def build_step(batch: int, kv_len: int, layers: int, hidden: int, q_heads: int, kv_heads: int, head_dim: int,
               experts: int, top_k: int, inter: int, vocab: int, device, dtype, weights=None):
    """One decode step as a closure over its tensors; ``weights`` (from a previous call) shares the model."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=0.02):
        return (torch.randn(*shape, device=device, dtype=dtype, generator=gen) * scale)

    if weights is None:
        weights = [dict(norm1=torch.ones(hidden, device=device, dtype=dtype),
                        norm2=torch.ones(hidden, device=device, dtype=dtype),
                        qkv=rand(hidden, (q_heads + 2 * kv_heads) * head_dim),
                        out=rand(q_heads * head_dim, hidden),
                        router=rand(hidden, experts),
                        w13=[rand(hidden, 2 * inter) for _ in range(experts)],
                        w2=[rand(inter, hidden) for _ in range(experts)])
                   for _ in range(layers)]
        weights.append(dict(lm_head=rand(hidden, vocab)))
    group = q_heads // kv_heads
    kv = [(rand(batch, kv_heads, kv_len, head_dim, scale=1.0), rand(batch, kv_heads, kv_len, head_dim, scale=1.0))
          for _ in range(layers)]
    # A fixed routing (uniform over experts, as a balanced router gives), so the step has static shapes and can be
    # captured as a graph; each expert's token rows as an index tensor.
    routing = []
    for _ in range(layers):
        ids = torch.stack([torch.randperm(experts, generator=torch.Generator().manual_seed(b))[:top_k]
                           for b in range(batch)]).to(device)
        gates = torch.full((batch, top_k), 1.0 / top_k, device=device, dtype=dtype)
        rows = [(ids == e).nonzero()[:, 0] for e in range(experts)]
        routing.append((rows, [gates[r, 0:1] for r in rows]))
    x0 = rand(batch, hidden, scale=1.0)

    def rms(x, w):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * w

    def step():
        x = x0
        for layer, (k, v), (rows, gate) in zip(weights, kv, routing):
            h = rms(x, layer["norm1"]) @ layer["qkv"]
            q = h[:, :q_heads * head_dim].reshape(batch, kv_heads, group, head_dim)  # a group's heads as queries
            a = F.scaled_dot_product_attention(q, k, v)
            x = x + a.reshape(batch, q_heads * head_dim) @ layer["out"]
            hn = rms(x, layer["norm2"])
            if experts == 1:  # a dense gated MLP
                up = hn @ layer["w13"][0]
                x = x + (F.silu(up[:, :inter]) * up[:, inter:]) @ layer["w2"][0]
                continue
            _ = hn @ layer["router"]  # the router's GEMM (its top-2 is the fixed routing)
            y = torch.zeros_like(x)
            for e in range(experts):
                up = hn.index_select(0, rows[e]) @ layer["w13"][e]
                act = F.silu(up[:, :inter]) * up[:, inter:]
                y.index_add_(0, rows[e], (act @ layer["w2"][e]) * gate[e])
            x = x + y
        return x @ weights[-1]["lm_head"]

    return step, weights


class Nvml:
    def __init__(self, enabled: bool = True) -> None:
        self.nvml = None
        if not enabled:
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception as e:  # noqa: BLE001 -- clocks are context; the timing stands without them
            print(f"NVML unavailable ({e}); clocks not recorded")
            self.nvml = None

    def read(self) -> dict:
        if self.nvml is None:
            return {}
        n, h = self.nvml, self.handle
        return dict(sm_clock_mhz=n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
                    mem_clock_mhz=n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
                    temp_c=n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
                    power_w=n.nvmlDeviceGetPowerUsage(h) / 1e3,
                    throttle_reasons=hex(n.nvmlDeviceGetCurrentClocksThrottleReasons(h)))


def run_phase(name: str, graph, seconds: float, window_s: float, nvml: Nvml, t_origin: float, rows: list) -> None:
    start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0, n = time.perf_counter(), 0
        start_ev.record()
        while time.perf_counter() - t0 < window_s:
            graph.replay()
            n += 1
            if n % 8 == 0:
                torch.cuda.synchronize()  # keep the queue short so windows end on time
        end_ev.record()
        torch.cuda.synchronize()
        rows.append(dict(phase=name, t_s=round(time.perf_counter() - t_origin, 2), steps=n,
                         step_ms=round(start_ev.elapsed_time(end_ev) / n, 4), **nvml.read()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="the heavy phase")
    ap.add_argument("--light-seconds", type=float, default=15.0)
    ap.add_argument("--window-s", type=float, default=2.0)
    ap.add_argument("--model", choices=sorted(SHARDS), default="mixtral-8x7b-tp2")
    ap.add_argument("--layers", type=int, help="default: the model's")
    ap.add_argument("--heavy", help="running requests,KV tokens each (default: the model's reasoning run)")
    ap.add_argument("--light", help="the same at a light point (default: the model's general run)")
    ap.add_argument("--no-nvml", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape, heavy, light = SHARDS[args.model]
    shape = dict(shape, layers=args.layers or shape["layers"])
    args.heavy, args.light = args.heavy or heavy, args.light or light
    graphs, steps, weights = {}, [], None  # a graph reads its captured tensors: keep them alive
    for name, point in (("heavy", args.heavy), ("light", args.light)):
        batch, kv_len = (int(v) for v in point.split(","))
        step, weights = build_step(batch, kv_len, device=device, dtype=dtype, weights=weights, **shape)
        steps.append(step)
        graphs[name], _ = capture_cuda_graph(step, warmups=3)
        torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated", flush=True)
    nvml, rows, t_origin = Nvml(not args.no_nvml), [], time.perf_counter()
    run_phase("light_before", graphs["light"], args.light_seconds, args.window_s, nvml, t_origin, rows)
    run_phase("heavy", graphs["heavy"], args.seconds, args.window_s, nvml, t_origin, rows)
    run_phase("light_after", graphs["light"], args.light_seconds, args.window_s, nvml, t_origin, rows)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("phase          from-to s   step ms (median)  SM MHz  mem MHz  temp C  power W")
    heavy = [r for r in rows if r["phase"] == "heavy"]
    thirds = [heavy[i * len(heavy) // 3:(i + 1) * len(heavy) // 3] for i in range(3)]
    parts = [("light_before", [r for r in rows if r["phase"] == "light_before"])] + \
        [(f"heavy {i + 1}/3", part) for i, part in enumerate(thirds)] + \
        [("light_after", [r for r in rows if r["phase"] == "light_after"])]
    for name, part in parts:
        if not part:
            continue
        med = {key: statistics.median(r[key] for r in part) if key in part[0] else float("nan")
               for key in ("step_ms", "sm_clock_mhz", "mem_clock_mhz", "temp_c", "power_w")}
        print(f"{name:<14} {part[0]['t_s']:>5.0f}-{part[-1]['t_s']:<5.0f} {med['step_ms']:>12.3f}     "
              f"{med['sm_clock_mhz']:>6.0f}  {med['mem_clock_mhz']:>7.0f}  {med['temp_c']:>6.0f}  "
              f"{med['power_w']:>7.0f}  reasons {sorted({r.get('throttle_reasons') for r in part})}")


if __name__ == "__main__":
    main()
