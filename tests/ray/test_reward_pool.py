"""The reward pool on a real Ray cluster: batched, load-balanced, ordered, and loud on bad
rewards (naming the sample)."""

from __future__ import annotations

import math

import pytest

from lorafleet.common.records import Prompt, Rollout
from lorafleet.reward.pool import RewardPool, RewardSpec, RewardWorker, drop_failed_groups
from lorafleet.reward.registry import get_reward_fn
from lorafleet.reward.rules import exact_match


def make_rollouts(n: int) -> list[Rollout]:
    out = []
    for i in range(n):
        prompt = Prompt(i, f"{i}+0=", [1], {"reference": str(i)})
        text = str(i) if i % 3 else "x"  # every third response is wrong
        out.append(Rollout(prompt, 0, [5], text, [-0.5], "stop", 4, i % 2))
    return out


def test_exact_match_and_registry():
    assert exact_match([" 42 ", "41"], ["42", "42"]) == [1.0, 0.0]
    assert get_reward_fn("helpers:reward_nan_when_wrong")(["1"], ["1"]) == [1.0]
    with pytest.raises(ValueError, match="reward.fns='nope': unknown reward function"):
        get_reward_fn("nope")


@pytest.fixture
def pool_of(ray_cluster):
    """Builds pools of 2 real reward actors; kills them afterwards (they hold CPU shares)."""
    actors = []

    def build(fn: str, batch_size: int = 4, skip_errors: bool = False) -> RewardPool:
        remote = ray_cluster.remote(RewardWorker).options(num_cpus=0.1)
        actors.extend(remote.remote(RewardSpec((fn,), skip_errors=skip_errors)) for _ in range(2))
        return RewardPool(actors[-2:], batch_size, timeout_s=60)

    yield build
    for actor in actors:
        ray_cluster.kill(actor)


def test_pool_scores_every_rollout_in_order(pool_of):
    rollouts = make_rollouts(21)
    pool = pool_of("exact_match")
    scored = pool.score(rollouts)
    assert [s.rollout for s in scored] == rollouts
    assert [s.reward for s in scored] == [0.0 if i % 3 == 0 else 1.0 for i in range(21)]
    # the same actors score by the spec a batch comes with (another policy's rewards)
    tripled = pool.score(rollouts, RewardSpec(("exact_match",), weights=(3.0,)))
    assert [s.reward for s in tripled] == [0.0 if i % 3 == 0 else 3.0 for i in range(21)]


def test_raising_reward_names_the_sample(pool_of):
    with pytest.raises(Exception, match=r"raised on prompt 7 sample 0.*KeyError"):
        pool_of("helpers:reward_raises_on_7").score(make_rollouts(10))


def test_nan_reward_names_the_sample(pool_of):
    with pytest.raises(Exception, match=r"returned nan for prompt 0 sample 0"):
        pool_of("helpers:reward_nan_when_wrong").score(make_rollouts(5))


def test_skipped_reward_errors_are_counted_and_their_groups_dropped(pool_of):
    rollouts = make_rollouts(10)
    scored = pool_of("helpers:reward_raises_on_7", skip_errors=True).score(rollouts)
    failed = [s for s in scored if s.error is not None]
    assert len(failed) == 1 and "raised on prompt 7 sample 0" in failed[0].error
    assert math.isnan(failed[0].reward)
    kept, errors = drop_failed_groups(scored)
    assert errors == [failed[0].error]
    assert sorted(s.rollout.prompt.index for s in kept) == [i for i in range(10) if i != 7]
