"""Write a BurstGPT-shaped CSV (the real file is not redistributable here) for the 1M-request speed benchmark.

Shape, after the BurstGPT paper (Wang et al., 2024): bursty arrivals (Gamma inter-arrival times, CV 3),
Zipf-distributed request lengths, lognormal response lengths, two models, ~2% failed requests (Response tokens 0),
conversation and API log types. Columns: Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type.

With ``--sessions`` it writes BurstGPT v1.2's ``Session ID`` too: conversation-log rows form conversations of a
geometric number of turns (mean ``--turns``), and turn ``k``'s request resends turn ``k-1``'s request and
response plus a new message of Zipf length (capped at 8k tokens; a longer conversation starts afresh).

    python benchmarks/make_burstgpt_like.py --rows 1000000 --rate 50 --out results/burstgpt_like_1m.csv
    python benchmarks/make_burstgpt_like.py --rows 20000 --rate 20 --sessions --out results/burstgpt_sessions.csv
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


MAX_CONVERSATION_TOKENS = 8192


def add_sessions(df: pd.DataFrame, mean_turns: float, seed: int) -> pd.DataFrame:
    """Group conversation-log rows into conversations; a turn's request resends the conversation so far."""
    rng = np.random.default_rng(seed + 1)
    df = df.copy()
    sessions = np.full(len(df), "", dtype=object)
    prompts = df["Request tokens"].to_numpy().copy()
    responses = df["Response tokens"].to_numpy()
    active: list[list] = []  # [session id, turns left, tokens resent next turn]
    next_id = 0
    for i in np.flatnonzero(df["Log Type"].to_numpy() == "Conversation log"):
        if active and rng.random() < 0.7:  # most conversation rows continue an open conversation
            k = int(rng.integers(len(active)))
            sid, left, history = active[k]
            if history + prompts[i] <= MAX_CONVERSATION_TOKENS:
                prompts[i] = history + prompts[i]
                sessions[i] = sid
                active[k] = [sid, left - 1, prompts[i] + responses[i]]
                if left - 1 <= 0 or responses[i] == 0:
                    active.pop(k)
                continue
            active.pop(k)
        next_id += 1
        sid = f"s{next_id}"
        sessions[i] = sid
        turns = int(rng.geometric(1.0 / mean_turns))
        if turns > 1 and responses[i] > 0:
            active.append([sid, turns - 1, prompts[i] + responses[i]])
    df["Request tokens"] = prompts
    df["Total tokens"] = prompts + responses
    df["Session ID"] = sessions
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=50.0, help="mean arrivals per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/burstgpt_like_1m.csv")
    ap.add_argument("--sessions", action="store_true", help="add BurstGPT v1.2's Session ID (conversations)")
    ap.add_argument("--turns", type=float, default=3.0, help="mean turns of a conversation (with --sessions)")
    args = ap.parse_args()
    df = make(args.rows, args.rate, args.seed)
    if args.sessions:
        df = add_sessions(df, args.turns, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"{args.out}: {len(df)} rows over {df['Timestamp'].iloc[-1]:.0f} s; mean request "
          f"{df['Request tokens'].mean():.0f} tokens, mean response {df['Response tokens'].mean():.0f}")


if __name__ == "__main__":
    main()
