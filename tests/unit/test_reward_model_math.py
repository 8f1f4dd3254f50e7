"""Bradley-Terry loss (margins, ties), pairwise accuracy, reward combination and running
normalisation — against hand-computed numbers."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch.testing import assert_close

from lorafleet.learner.algorithms.reward_model import bradley_terry_loss, pairwise_accuracy
from lorafleet.reward.normalize import RunningMoments, combine_rewards, normalize_rewards

CHOSEN = torch.tensor([1.0, 0.0])
REJECTED = torch.tensor([0.0, 0.0])


def test_bradley_terry_loss():
    # -log sigmoid(1) = 0.313262, -log sigmoid(0) = log 2 = 0.693147
    loss, diff = bradley_terry_loss(CHOSEN, REJECTED)
    assert_close(loss, torch.tensor((0.313262 + 0.693147) / 2), atol=1e-5, rtol=0)
    assert_close(diff, torch.tensor([1.0, 0.0]))


def test_bradley_terry_margin_asks_for_a_gap():
    # pair 0 with margin 0.5: -log sigmoid(1 - 0.5) = 0.474077
    loss, _ = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([0.5, 0.0]))
    assert_close(loss, torch.tensor((0.474077 + 0.693147) / 2), atol=1e-5, rtol=0)


def test_bradley_terry_tie_targets_one_half():
    # pair 0 a tie: -(log sigmoid(1) + log sigmoid(-1)) / 2 = (0.313262 + 1.313262) / 2
    tie = torch.tensor([True, False])
    loss, _ = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([0.5, 0.0]), tie=tie)
    assert_close(loss, torch.tensor((0.813262 + 0.693147) / 2), atol=1e-5, rtol=0)
    # a tie's loss is smallest at equal scores, and its gradient pulls the scores together
    scores = torch.tensor([2.0], requires_grad=True)
    tie_loss, _ = bradley_terry_loss(scores, torch.zeros(1), tie=torch.tensor([True]))
    tie_loss.backward()
    assert scores.grad.item() > 0


def test_pairwise_accuracy_leaves_ties_out():
    diff = torch.tensor([1.0, -0.5, 0.0, 2.0])
    assert pairwise_accuracy(diff).item() == 0.5  # a zero difference is not a right ranking
    assert pairwise_accuracy(diff, torch.tensor([False, False, True, True])).item() == 0.5


def test_combine_rewards():
    assert combine_rewards(1.0, 0.25, 0.5, 2.0) == 1.0
    assert combine_rewards(1.0, None, 1.0, 0.0) == 1.0  # a part with weight 0 may be absent
    with pytest.raises(ValueError, match="'model' has weight 2.0 but was not computed"):
        combine_rewards(1.0, None, 1.0, 2.0)


def test_running_moments_match_the_whole_stream():
    batches = [[1.0, 2.0, 4.0], [0.0], [3.0, 5.0]]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    flat = [v for b in batches for v in b]
    assert moments.count == 6
    assert moments.mean == pytest.approx(statistics.mean(flat))  # 2.5
    assert moments.std == pytest.approx(statistics.stdev(flat))  # sqrt(17.5 / 5)
    assert RunningMoments(**moments.state()) == moments  # checkpoint round trip


def test_normalize_rewards():
    moments = RunningMoments(count=3, mean=1.0, m2=8.0)  # std = sqrt(8 / 2) = 2
    assert normalize_rewards([5.0, 1.0, -1.0], moments, None, eps=0.0) == [2.0, 0.0, -1.0]
    assert normalize_rewards([5.0, 1.0, -1.0], moments, 1.5, eps=0.0) == [1.5, 0.0, -1.0]
    assert normalize_rewards([5.0, -9.0], None, 3.0) == [3.0, -3.0]
