"""Client policies (the Tinker service's training clients) on an in-process learner: added and
removed at runtime beside the run's own, trained by their own forward_backward and optim_step
calls (gradients summed until the step), saved and loaded with or without their optimiser."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from helpers import new_learner
from lorafleet.common.client_records import AdamStep, ClientLoss, TokenDatum
from lorafleet.common.config import LoRAConfig
from lorafleet.common.records import POLICY, UpdateDiverged

A, B = "client-a", "client-b"
CE = ClientLoss("cross_entropy")
STEP = AdamStep(learning_rate=1e-2)


def client_learner(model_path, tokenizer, *clients: tuple[str, int]):
    """A learner of one run policy (no RL updater) with client policies (name, seed) added."""
    learner = new_learner(model_path, tokenizer.pad_token_id, stages=("sft",))
    for name, seed in clients:
        learner.add_client_policy(name, LoRAConfig(), seed)
    return learner


def datum(tokenizer, text: str, **inputs) -> TokenDatum:
    """`text` as tokens predicting their next one; `inputs` per target token."""
    ids = tokenizer(text).input_ids + [tokenizer.eos_token_id]
    tensors = {key: torch.tensor(values, dtype=torch.float32) for key, values in inputs.items()}
    return TokenDatum(ids[:-1], {"target_tokens": torch.tensor(ids[1:]), **tensors})


def sums(tokenizer) -> list[TokenDatum]:
    return [datum(tokenizer, text) for text in ("12+7=19", "3+45=48", "60+1=61")]


def weights(learner, name: str) -> dict[str, torch.Tensor]:
    """Policy `name`'s adapter tensors under names without the adapter's (comparable across
    adapters)."""
    adapter = learner.get_policy(name).core.adapter
    out = {n.replace(f".{adapter}.", "."): p.detach().clone()
           for n, p in learner.net.model.named_parameters() if f".{adapter}." in n}
    assert out, name
    return out


def grads(learner, name: str) -> dict[str, torch.Tensor]:
    adapter = learner.get_policy(name).core.adapter
    return {n.replace(f".{adapter}.", "."): p.grad.clone()
            for n, p in learner.net.model.named_parameters() if f".{adapter}." in n}


def forward_backward(learner, name, datums, loss, forward_only):
    """One client's call alone; its error raised."""
    [result] = learner.forward_backward([(name, datums, loss, forward_only)])
    if isinstance(result, Exception):
        raise result
    return result


def optim_step(learner, name, step):
    [result] = learner.optim_step([(name, step)])
    if isinstance(result, Exception):
        raise result
    return result


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol) for k in a)


def test_a_client_trains_its_own_adapter_alone(tiny_model_path, tokenizer):
    learner = client_learner(tiny_model_path, tokenizer)
    rng = torch.get_rng_state()
    learner.add_client_policy(A, LoRAConfig(), seed=1)
    learner.add_client_policy(B, LoRAConfig(), seed=2)
    assert torch.equal(torch.get_rng_state(), rng)  # the learner's own draws are undisturbed
    assert learner.policy_names() == [POLICY, A, B]
    untouched = {name: weights(learner, name) for name in (POLICY, B)}
    batch, losses = sums(tokenizer), []
    for version in (1, 2, 3):
        result = forward_backward(learner, A, batch, CE, forward_only=False)
        losses.append(result.metrics["loss:sum"])
        stats = optim_step(learner, A, STEP)
        assert stats["learning_rate"] == 1e-2 and stats["grad_norm"] > 0
        assert learner.get_version(A) == version
    assert losses[2] < losses[1] < losses[0]
    assert [len(lp) for lp in result.logprobs] == [len(d.tokens) for d in batch]
    assert result.logprobs[0].dtype == torch.float32 and result.logprobs[0].device.type == "cpu"
    # cross_entropy's loss is the summed negative log-probs it returns
    assert losses[2] == pytest.approx(-float(sum(lp.sum() for lp in result.logprobs)), rel=1e-5)
    assert all(same(weights(learner, name), w) for name, w in untouched.items())
    assert (learner.get_version(POLICY), learner.get_version(B)) == (0, 0)
    assert learner.publish(A).version == 3


def test_gradients_add_up_over_forward_backward_calls_until_the_step(tiny_model_path,
                                                                     tokenizer):
    learner = client_learner(tiny_model_path, tokenizer, (A, 0), (B, 0))  # same seed: same init
    first, second = sums(tokenizer)[:2], sums(tokenizer)[2:]
    loss = sum(forward_backward(learner, A, part, CE, False).metrics["loss:sum"]
               for part in (first, second))
    assert loss == pytest.approx(
        forward_backward(learner, B, first + second, CE, False).metrics["loss:sum"], rel=1e-5)
    assert close(grads(learner, A), grads(learner, B), 1e-5)
    optim_step(learner, A, STEP)
    optim_step(learner, B, STEP)
    assert close(weights(learner, A), weights(learner, B), 1e-5)
    assert all(p.grad is None for p in learner.get_policy(A).core.policy_params)


def test_rl_losses_read_the_sampler_logprobs_and_forward_only_adds_no_gradient(
        tiny_model_path, tokenizer):
    learner = client_learner(tiny_model_path, tokenizer, (A, 0))
    batch = sums(tokenizer)
    sampled = forward_backward(learner, A, batch, CE, forward_only=True)
    assert all(p.grad is None for p in learner.get_policy(A).core.policy_params)
    advantages = [[1.0 - 0.5 * t for t in range(len(d.tokens))] for d in batch]
    rl_batch = [TokenDatum(d.tokens, {**d.inputs, "logprobs": lp, "advantages": torch.tensor(a)})
                for d, lp, a in zip(batch, sampled.logprobs, advantages, strict=True)]
    # the sampler is the policy itself: every ratio 1, the loss -sum(A)
    for loss in (ClientLoss("importance_sampling"), ClientLoss("ppo"), ClientLoss("cispo")):
        result = forward_backward(learner, A, rl_batch, loss, forward_only=False)
        expected = -sum(map(sum, advantages)) if loss.name != "cispo" else float(sum(
            -(torch.tensor(a) * lp).sum() for a, lp in zip(advantages, sampled.logprobs,
                                                            strict=True)))
        assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    assert optim_step(learner, A, STEP)["grad_norm"] > 0


def test_save_and_load_a_clients_state(tiny_model_path, tokenizer, tmp_path):
    learner = client_learner(tiny_model_path, tokenizer, (A, 1), ("with-opt", 2),
                             ("fresh-opt", 3))
    batch = sums(tokenizer)
    forward_backward(learner, A, batch, CE, False)
    optim_step(learner, A, STEP)
    saved = weights(learner, A)
    learner.save_client_state(A, str(tmp_path / "with"), optimizer=True)
    learner.save_client_state(A, str(tmp_path / "without"), optimizer=False)
    learner.save_client_state(A, str(tmp_path / "with"), optimizer=True)  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["with", "without"]

    assert learner.load_client_state("with-opt", str(tmp_path / "with"), optimizer=True) == 1
    assert learner.load_client_state("fresh-opt", str(tmp_path / "without"), False) == 1
    assert same(weights(learner, "with-opt"), saved) and same(weights(learner, "fresh-opt"), saved)
    for name in (A, "with-opt", "fresh-opt"):
        forward_backward(learner, name, batch, CE, False)
        optim_step(learner, name, STEP)
    # the Adam moments came back: the same step as the never-saved client's...
    assert same(weights(learner, "with-opt"), weights(learner, A))
    # ...where a fresh optimiser takes Adam's first step
    assert not same(weights(learner, "fresh-opt"), weights(learner, A))
    fresh = learner.get_policy("fresh-opt").core.policy_opt.state.values()
    assert fresh and all(float(state["step"]) == 1 for state in fresh)
    assert learner.get_version("with-opt") == 2

    with pytest.raises(ValueError, match="saved without its optimizer state; load it without"):
        learner.load_client_state(A, str(tmp_path / "without"), optimizer=True)
    with pytest.raises(ValueError, match="holds no saved client state"):
        learner.load_client_state(A, str(tmp_path / "nothing"), optimizer=False)
    learner.add_client_policy("narrow", LoRAConfig(rank=4, target_modules=["q_proj"]), 0)
    with pytest.raises(ValueError, match=r"does not fit adapter 'narrow': it has rank 8 \(the "
                                         r"adapter's: 4\); target modules \['down_proj', "):
        learner.load_client_state("narrow", str(tmp_path / "with"), optimizer=True)


def test_a_removed_client_frees_its_adapter_and_its_name(tiny_model_path, tokenizer):
    learner = client_learner(tiny_model_path, tokenizer, (A, 0), (B, 1))
    forward_backward(learner, A, sums(tokenizer), CE, False)
    optim_step(learner, A, STEP)
    param = weakref.ref(learner.get_policy(A).core.policy_params[0])
    adapter = learner.get_policy(A).core.adapter
    b_weights = weights(learner, B)
    learner.remove_policy(A)
    gc.collect()
    assert param() is None
    assert not any(f".{adapter}." in n for n, _ in learner.net.model.named_parameters())
    assert learner.policy_names() == [POLICY, B] and same(weights(learner, B), b_weights)
    learner.add_client_policy(A, LoRAConfig(), 0)
    assert learner.get_version(A) == 0
    forward_backward(learner, B, sums(tokenizer), CE, False)  # B trains on after the removal
    optim_step(learner, B, STEP)
    with pytest.raises(ValueError, match="policy 'policy' is one the learner was built with"):
        learner.remove_policy(POLICY)
    with pytest.raises(ValueError, match="the learner has a policy 'client-b' already"):
        learner.add_client_policy(B, LoRAConfig(), 0)
    with pytest.raises(ValueError, match="the learner has no policy 'gone'"):
        learner.remove_policy("gone")


def test_bad_datums_and_diverged_steps_are_refused(tiny_model_path, tokenizer):
    learner = client_learner(tiny_model_path, tokenizer, (A, 0))
    good = sums(tokenizer)[0]
    n = len(good.tokens)
    short = TokenDatum(good.tokens, {"target_tokens": good.inputs["target_tokens"][:-1]})
    with pytest.raises(ValueError, match=rf"datum 1: input 'target_tokens' has shape \({n - 1},\)"
                                         rf"; expected \({n},\), one value per token"):
        forward_backward(learner, A, [good, short], CE, False)
    out_of_vocab = TokenDatum(good.tokens, {"target_tokens": torch.full((n,), 10_000)})
    with pytest.raises(ValueError, match=r"datum 0: target_tokens must be token ids in "
                                         rf"\[0, {len(tokenizer)}\)"):
        forward_backward(learner, A, [out_of_vocab], CE, False)
    with pytest.raises(ValueError, match="datum 0: loss 'ppo' lacks 'logprobs', 'advantages'"):
        forward_backward(learner, A, [good], ClientLoss("ppo"), False)
    with pytest.raises(ValueError, match="at least one datum"):
        forward_backward(learner, A, [], CE, False)

    before = weights(learner, A)
    params = learner.get_policy(A).core.policy_params
    nan = datum(tokenizer, "12+7=19", weights=[math.nan] * n)
    with pytest.raises(UpdateDiverged, match=r"policy 'client-a': the update at version 0 "
                                             r"diverged \(loss nan\); not applied"):
        forward_backward(learner, A, [nan], CE, False)
    assert all(p.grad is None for p in params)
    forward_backward(learner, A, [good], CE, False)
    params[0].grad[0, 0] = math.inf
    with pytest.raises(UpdateDiverged, match=r"\(grad norm inf\); not applied"):
        optim_step(learner, A, STEP)
    assert same(weights(learner, A), before) and learner.get_version(A) == 0
    assert all(p.grad is None for p in params) and learner.get_policy(A).core.policy_opt.state == {}
    # a step with no gradient since the last one leaves the weights; it is still a version
    assert optim_step(learner, A, STEP)["grad_norm"] == 0.0 and learner.get_version(A) == 1
    assert same(weights(learner, A), before)


def test_clients_calls_in_one_pass_equal_their_calls_alone(tiny_model_path, tokenizer):
    """Two clients' forward_backward calls and a forward-only one in one pass: each client's
    loss, log-probs and gradient as its call alone gives them (bitwise: every datum has the
    same padded width); a third client's bad datum fails that call alone."""
    joint, alone = (client_learner(tiny_model_path, tokenizer, (A, 0), (B, 1), ("c", 2))
                    for _ in range(2))
    a_data, b_data = sums(tokenizer), sums(tokenizer)[1:]
    bad = [TokenDatum([1, 2], {"target_tokens": torch.tensor([3])})]
    results = joint.forward_backward([(A, a_data, CE, False), (B, b_data, CE, True),
                                      ("c", bad, CE, False)])
    assert isinstance(results[2], ValueError) and "datum 0" in str(results[2])
    ours = {A: results[0], B: results[1]}
    theirs = {A: forward_backward(alone, A, a_data, CE, False),
              B: forward_backward(alone, B, b_data, CE, True)}
    for name in (A, B):
        assert ours[name].metrics == theirs[name].metrics
        assert all(torch.equal(x, y) for x, y in zip(ours[name].logprobs, theirs[name].logprobs,
                                                     strict=True))
    assert same(grads(joint, A), grads(alone, A))
    # the forward-only call and the failed one added no gradient
    for name in (B, "c"):
        assert all(p.grad is None for p in joint.get_policy(name).core.policy_params)
    steps = joint.optim_step([(A, STEP), ("gone", STEP)])
    assert steps[0]["grad_norm"] > 0 and isinstance(steps[1], ValueError)


def test_calls_cut_into_passes_by_tokens_equal_one_pass(tiny_model_path, tokenizer):
    """learner.max_tokens_per_pass on client calls: with room for two datums a pass, A's three
    datums and B's two go through three passes (A's call cut in two), each call's loss,
    log-probs and gradient as in one pass (to float32 rounding: passes of other row counts); a
    datum longer than a pass is refused naming the client and the limit; a call that diverges
    in its second pass gets back the gradient it had before (none), its first pass's share
    taken out."""
    from lorafleet.learner.client_training import client_passes
    from lorafleet.learner.client_training import forward_backward as calls_forward_backward

    cut, whole = (client_learner(tiny_model_path, tokenizer, (A, 0), (B, 1)) for _ in range(2))
    a_data, b_data = sums(tokenizer), sums(tokenizer)[:2]
    width = len(a_data[0].tokens)
    cores = {name: cut.get_policy(name).core for name in (A, B)}
    calls = [(cores[A], a_data, CE, False), (cores[B], b_data, CE, False)]
    assert client_passes(calls, 2 * width) == [[(0, slice(0, 2))], [(0, slice(2, 3)),
                                                                    (1, slice(0, 1))],
                                               [(1, slice(1, 2))]]
    ours = calls_forward_backward(calls, 2 * width)
    theirs = whole.forward_backward([(A, a_data, CE, False), (B, b_data, CE, False)])
    for mine, one, name in zip(ours, theirs, (A, B), strict=True):
        assert mine.metrics == pytest.approx(one.metrics, rel=1e-6)
        assert all(torch.allclose(x, y, atol=1e-6)
                   for x, y in zip(mine.logprobs, one.logprobs, strict=True))
        # measured: at most 6.7e-6 apart (B's, summed over two backward passes; entries ~0.2)
        assert close(grads(cut, name), grads(whole, name), 5e-5)

    [long] = calls_forward_backward([(cores[A], a_data, CE, False)], width - 1)
    assert isinstance(long, ValueError) and str(long) == (
        f"client {A}: datum 0 has {width} tokens, more than a learner pass holds "
        f"(learner.max_tokens_per_pass={width - 1}); send shorter datums or start the server "
        "with a larger learner.max_tokens_per_pass")
    nan = datum(tokenizer, "12+7=19", weights=[math.nan] * width)
    fresh = client_learner(tiny_model_path, tokenizer, (A, 0))
    core = fresh.get_policy(A).core
    [diverged] = calls_forward_backward([(core, a_data[:2] + [nan], CE, False)], 2 * width)
    assert isinstance(diverged, UpdateDiverged)
    assert all(p.grad is None for p in core.policy_params)
