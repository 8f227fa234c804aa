"""scripts/bench_maml.py: rounds pooled into one row per implementation, ratios within rounds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_maml.py"
spec = importlib.util.spec_from_file_location("bench_maml", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def result(impl: str, times: list[float], peak: int = 100) -> dict:
    return {"impl": impl, "config": "omniglot", "median_s": sorted(times)[len(times) // 2],
            "times": times, "peak_bytes": peak * 2**20}


def test_rounds_pool_times_and_ratios_come_from_within_a_round() -> None:
    rounds = [
        [result("fewshot-auto", [1.0, 1.0, 1.0]), result("learn2learn", [2.0, 2.0, 2.0], 50),
         {"impl": "higher", "config": "omniglot", "skipped": "not importable"}],
        # a slow spell of the machine: both twice as slow, the ratio within the round unchanged
        [result("fewshot-auto", [2.0, 2.0, 2.0], 120), result("learn2learn", [4.0, 4.0, 4.0]),
         {"impl": "higher", "config": "omniglot", "skipped": "not importable"}],
    ]
    pooled = {r["impl"]: r for r in bench.pooled(rounds)}
    assert pooled["fewshot-auto"]["median_s"] == pytest.approx(1.5)
    assert pooled["fewshot-auto"]["ratio_range"] == pytest.approx((2.0, 2.0))
    assert pooled["fewshot-auto"]["peak_bytes"] == 120 * 2**20
    assert pooled["higher"]["skipped"] == "not importable"
    text = bench.table(list(pooled.values()), "cpu", "fp32")
    assert "| fewshot-auto | 1500.0 | 120 | 2.00× | 2.00–2.00× | 1.20× |" in text
    assert "| higher | not importable | | | | |" in text
