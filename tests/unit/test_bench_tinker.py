"""`lorafleet bench tinker`'s figures and tables, from measured seconds: the latencies past the
warm-up, the API's ratio to the in-process call, the clients' rates against the first count;
and the addition datums both sides train on."""

from __future__ import annotations

from helpers import table_cells
from lorafleet.cluster.bench.tinker import addition_rows, latency_ms, rates, tables, timed
from lorafleet.cluster.cli import parse


def test_latency_is_the_median_and_p90_in_milliseconds():
    figures = latency_ms([k / 1000 for k in range(10, 0, -1)])
    assert figures["median_ms"] == 5.5
    assert abs(figures["p90_ms"] - 9.1) < 1e-9
    assert latency_ms([0.25]) == {"median_ms": 250.0, "p90_ms": 250.0}


def test_calls_are_made_in_turn_and_the_warmup_is_left_out():
    made = []
    seconds = timed({"a": lambda: made.append("a"), "b": lambda: made.append("b")}, count=3,
                    warmup=2)
    assert made == ["a", "b"] * 5
    assert [len(seconds["a"]), len(seconds["b"])] == [3, 3]


def test_rates_count_every_clients_iterations_and_samples():
    assert rates(4, 5, 3, 10.0) == {"clients": 4, "seconds": 10.0, "iterations_per_s": 2.0,
                                    "samples_per_s": 6.0}


def test_addition_datums_predict_the_next_token_and_weigh_the_answer(tokenizer):
    rows = addition_rows(tokenizer, 9)
    assert len(rows) == 9
    for row in rows:
        full = row["tokens"] + row["targets"][-1:]
        assert row["targets"] == full[1:]
        assert row["targets"][-1] == tokenizer.eos_token_id
        assert len(row["weights"]) == len(row["tokens"])
        answer = [t for t, w in zip(row["targets"], row["weights"], strict=True) if w]
        text = tokenizer.decode(full[:len(full) - len(answer)], skip_special_tokens=True)
        a, b = text.rstrip("=").split("+")
        assert tokenizer.decode(answer[:-1]) == str(int(a) + int(b))


def test_tables_give_the_api_overhead_and_the_scaling():
    def call(api_ms: float, base_ms: float) -> dict:
        return {"api": {"median_ms": api_ms, "p90_ms": 2 * api_ms},
                "in_process": {"median_ms": base_ms, "p90_ms": base_ms}}

    text = tables({
        "workload": {"calls": 30, "rounds": 3, "warmup": 5, "datums": 8, "samples": 4,
                     "max_tokens": 16, "rank": 8, "iterations": 5},
        "calls": 30,
        "latency": {"forward_backward": call(60.0, 20.0), "optim_step": call(5.0, 4.0),
                    "sample": call(30.0, 30.0)},
        "sample_tokens": {"api": 40, "in_process": 40},
        "scaling": [rates(1, 5, 4, 5.0), rates(2, 5, 4, 8.0), rates(4, 5, 4, 12.5)],
    })
    cells = table_cells(text)
    assert cells["forward_backward"] == ["60.0", "120.0", "20.0", "20.0", "3.00x"]
    assert cells["optim_step"][-1] == "1.25x"
    assert cells["sample"][-1] == "1.00x"
    assert cells["1"] == ["1.00", "4.0", "1.00x"]
    assert cells["2"] == ["1.25", "5.0", "1.25x"]
    assert cells["4"] == ["1.60", "6.4", "1.60x"]


def test_the_cli_takes_the_bench():
    args = parse(["bench", "tinker", "--clients", "1,2", "--calls", "5", "--iterations", "3",
                  "rollout.num_workers=1"])
    assert (args.what, args.clients, args.calls, args.iterations, args.items) == (
        "tinker", "1,2", 5, 3, ["rollout.num_workers=1"])
