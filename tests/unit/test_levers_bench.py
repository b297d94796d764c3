"""bench/levers.py: the variants are the default run's model with the named keys changed, timed in turn."""

from __future__ import annotations

import pytest

from bench.levers import VARIANTS, measure, table


@pytest.mark.slow
def test_levers_times_each_variant_against_the_default() -> None:
    record = measure({"default": {}, "off": {"conv_width": 0}, "conv_width=2": {"conv_width": 2}}, rounds=2,
                     round_steps=1)
    default, off, conv = (record["variants"][name] for name in ("default", "off", "conv_width=2"))
    assert default["speed_ratio"] == 1.0 and conv["speed_ratio"] > 0
    assert conv["parameters"] - off["parameters"] == 4 * 256 * 3  # per block: [2D, 1, 2] taps + [2D] bias
    assert default["tokens_per_s"] * default["s_per_step"] == pytest.approx(record["batch"] * record["seq_len"])
    assert "| conv_width=2 | model.conv_width=2 |" in table(record)
    assert VARIANTS["default"] == {} and all(isinstance(keys, dict) for keys in VARIANTS.values())


@pytest.mark.slow
def test_a_variant_of_other_tokens_per_step_is_compared_per_token() -> None:
    record = measure({"default": {}, "short": {"data.seq_len": 64, "data.batch_size": 8}}, rounds=2, round_steps=1)
    short = record["variants"]["short"]
    assert short["tokens_per_s"] * short["s_per_step"] == pytest.approx(8 * 64)
    # half the tokens per step in about half the time: a ratio near 1, not near 2
    assert 0.3 < short["speed_ratio"] < 3.0
    assert "| short | data.seq_len=64 data.batch_size=8 |" in table(record)
