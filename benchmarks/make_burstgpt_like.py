"""Write a BurstGPT-shaped CSV (the real file is not redistributable here) for the 1M-request speed benchmark.

Shape, after the BurstGPT paper (Wang et al., 2024): bursty arrivals (Gamma inter-arrival times, CV 3),
Zipf-distributed request lengths, lognormal response lengths, two models, ~2% failed requests (Response tokens 0),
conversation and API log types. Columns: Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type.

    python benchmarks/make_burstgpt_like.py --rows 1000000 --rate 50 --out results/burstgpt_like_1m.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from llmsim.config import LogNormal, Zipf
from llmsim.workload.lengths import sample_lengths


def make(rows: int, rate: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cv = 3.0
    shape = 1.0 / cv**2  # Gamma with this shape and mean 1/rate has the wanted CV
    gaps = rng.gamma(shape, 1.0 / (rate * shape), rows)
    timestamps = np.cumsum(gaps)
    prompts = sample_lengths(Zipf(kind="zipf", a=0.7, min=16, max=3000), rng, rows)
    responses = sample_lengths(LogNormal(kind="lognormal", median=180, sigma=0.8, min=1, max=1500), rng, rows)
    responses[rng.random(rows) < 0.02] = 0  # failures
    model = np.where(rng.random(rows) < 0.9, "ChatGPT", "GPT-4")
    log_type = np.where(rng.random(rows) < 0.6, "Conversation log", "API log")
    return pd.DataFrame({"Timestamp": np.round(timestamps, 3), "Model": model, "Request tokens": prompts,
                         "Response tokens": responses, "Total tokens": prompts + responses, "Log Type": log_type})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=50.0, help="mean arrivals per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/burstgpt_like_1m.csv")
    args = ap.parse_args()
    df = make(args.rows, args.rate, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"{args.out}: {len(df)} rows over {df['Timestamp'].iloc[-1]:.0f} s; mean request "
          f"{df['Request tokens'].mean():.0f} tokens, mean response {df['Response tokens'].mean():.0f}")


if __name__ == "__main__":
    main()
