"""``llmsim validate-e2e`` on a slice of a measured vLLM run: the interface, and an error bound."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd

from llmsim.cli import main
from llmsim.e2e.replay import requests_of
from llmsim.e2e.runs import load_run

SLICE = Path(__file__).parent / "data" / "e2e_slice"
RUN = "20260217-155451-llama-2-7b-tp1-codegen"


def test_validate_e2e_writes_the_stable_table_and_meets_its_bound(tmp_path, capsys):
    assert main(["validate-e2e", str(SLICE), "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "e2e_errors.csv")
    assert list(table.columns) == ["experiment", "stage", "metric", "predicted", "measured", "rel_error"]
    assert set(table["stage"].astype(str)) == {"0", "all"}  # the slice ends inside the first load stage
    assert set(table["metric"]) == {"ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99", "e2e_mean", "e2e_p50",
                                    "e2e_p90", "e2e_p99", "tpot_mean", "request_throughput", "errors"}
    got = table[table["stage"].astype(str) == "all"].set_index("metric")
    assert got.loc["errors", "measured"] == 0 and got.loc["errors", "predicted"] == 0
    assert got.loc["request_throughput", "rel_error"] == 0  # every request of the slice succeeds on both sides
    rel = (got["predicted"] / got["measured"] - 1).abs()
    assert (rel - got["rel_error"].abs()).abs().max() < 1e-12
    # Light load (5 req/s on one H100); this slice measures E2E +3%, TPOT +3%, TTFT -22% (bounds with room).
    assert rel["e2e_mean"] <= 0.12 and rel["tpot_mean"] <= 0.12 and rel["ttft_mean"] <= 0.25, rel.to_dict()
    assert (tmp_path / "e2e_report.md").read_text().count(RUN) >= 2
    assert (tmp_path / "e2e_parity.png").stat().st_size > 5_000


def test_forced_lengths_the_data_miscounted_are_replayed_as_forced():
    run = load_run(SLICE, RUN)
    requests, filled = requests_of(run)
    recorded = [r["output_tokens"] for r in run.requests]
    assert filled == sum(1 for n in recorded if n < 0.9 * 247)
    assert all(r.num_output_tokens == (247 if n < 0.9 * 247 else n) for r, n in zip(requests, recorded))
    assert requests[5].prefix_segments == ((5 % 11, 100),)  # 11 system prompts of 100 tokens


def test_bad_run_folders_are_clear_errors(tmp_path, capsys):
    assert main(["validate-e2e", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no replay/ folder" in capsys.readouterr().err
    broken = tmp_path / "d"
    shutil.copytree(SLICE, broken)
    (broken / "replay" / f"{RUN}_ground_truth.json.gz").unlink()
    assert main(["validate-e2e", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "no ground truth beside it" in capsys.readouterr().err
    with gzip.open(broken / "replay" / f"{RUN}_ground_truth.json.gz", "wt") as f:
        json.dump([{"ttft_s": 0.1, "e2e_s": 1.0}], f)
    assert main(["validate-e2e", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "1 measurements for 400 requests" in capsys.readouterr().err
    assert main(["validate-e2e", str(SLICE), "--runs", "mixtral", "--out", str(tmp_path / "o")]) == 2
    assert "matches no run" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the checks pass


def test_max_requests_slices_each_run(tmp_path):
    assert main(["validate-e2e", str(SLICE), "--max-requests", "50", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "e2e_errors.csv").set_index(["stage", "metric"])
    # 50 requests over their own span: the throughput is theirs, not the stage's nominal one.
    assert table.loc[("all", "request_throughput"), "measured"] > 4.0
