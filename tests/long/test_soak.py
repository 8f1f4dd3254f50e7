"""The soak with faults, short (`lorafleet bench soak`): the default job in async mode on a Ray
head of its own, rollout and reward actors SIGKILLed every few seconds and the driver once
(during a checkpoint write when the soak catches one), then resumed: every prompt trained on
exactly once, adapter versions continuous, no checkpoint half written, a final held-out
evaluation. About 5 minutes on 2 cores."""

from __future__ import annotations

from lorafleet.cluster.bench.soak import bench_soak

ITERATIONS = 20


def test_a_soak_with_faults_keeps_the_records_whole(tmp_path):
    result = bench_soak(None, ["checkpoint_every=5"], ITERATIONS, 8.0, True, False,
                        str(tmp_path), "test")
    assert result["problems"] == {
        "driver exit": [], "every prompt trained on exactly once": [],
        "adapter versions continuous": [], "no checkpoint half written": []}, result
    assert result["actor_kills"] >= 2 and result["driver_kills"] == 1
    assert result["resumes"] == 1 and "iter_" in result["log"]["resumed_from"]
    assert result["log"]["driver_kill"] is not None
    # every death the driver saw was brought back or re-sent
    assert result["restarts handled"] + result["calls re-sent on a dead connection"] >= \
        result["deaths seen"] > 0
    assert 0 <= result["final_eval_greedy"] <= 1
