"""`lorafleet bench memory`: peak learner memory and update time per algorithm, on one model and
one batch, each variant in a fresh process (so one peak cannot hide another).

Peak memory is the process's max RSS on CPU (`torch.cuda.max_memory_allocated` on GPU); the
ratio column uses the peak minus the RSS measured after imports, i.e. what the model, the
optimiser and the update itself cost.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# ppo_lora_rm: PPO whose learner also holds the reward adapter and scores its batch with it
# (PERL's one base); rm_actor: what a reward actor with its own base copy costs instead.
VARIANTS = ["sft_lora", "spr", "grpo", "dpo", "ppo_lora", "ppo_lora_rm", "rm_actor", "ppo_full"]
SEQ_PROMPT, SEQ_RESPONSE, PROMPTS, N_SAMPLES = 32, 32, 8, 4


def bench_model(root: Path) -> Path:
    """A random-init Llama big enough that weights and activations dominate (~100M params)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / "models" / "bench-llama-100m"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=256,
            tie_word_embeddings=False, pad_token_id=0,
        )
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _scored(version: int, vocab_size: int):
    """PROMPTS x N_SAMPLES random responses with random 0/1 rewards (seeded)."""
    import random

    from ..common.records import Prompt, Rollout, ScoredRollout

    rng = random.Random(0)
    out = []
    for i in range(PROMPTS):
        prompt = Prompt(i, "", [rng.randrange(1, vocab_size) for _ in range(SEQ_PROMPT)], "")
        for k in range(N_SAMPLES):
            ids = [rng.randrange(1, vocab_size) for _ in range(SEQ_RESPONSE)]
            rollout = Rollout(prompt, k, ids, "", [0.0] * SEQ_RESPONSE, "length", version, 0)
            out.append(ScoredRollout(rollout, float(rng.random() < 0.5)))
    return out


def one_variant(variant: str, model_path: str, steps: int = 3) -> dict:
    """Runs in the child process: build the variant, time `steps` updates, report peak memory."""
    import torch
    from transformers import AutoConfig

    from ..common.config import LoRAConfig
    from ..learner.algorithms.critic_free import dpo_loss, weighted_nll
    from ..learner.algorithms.registry import algorithm, learner_class
    from ..learner.model import REWARD, PolicyValueModel, collate_scored
    from ..learner.reward_model import score_rows

    torch.set_num_threads(2)
    baseline = _rss_mb()
    lora = LoRAConfig()
    vocab_size = AutoConfig.from_pretrained(model_path).vocab_size
    scored = _scored(0, vocab_size)
    pad = 0

    rows = [s.rollout.prompt.token_ids + s.rollout.response_ids for s in scored]
    if variant in ("spr", "grpo", "ppo_lora", "ppo_lora_rm"):
        name = {"spr": "spr", "grpo": "grpo"}.get(variant, "ppo")
        algo = algorithm(name).config(epochs=1, minibatch_size=PROMPTS * N_SAMPLES)
        learner = learner_class(algo)(
            model_path, lora, algo, dtype="float32", seed=0, threads=2, pad_token_id=pad
        )
        if variant == "ppo_lora_rm":
            learner.start_reward_model(1e-4)

        def update() -> None:
            if variant == "ppo_lora_rm":
                score_rows(learner.net, rows, pad)
            learner.train_step(_scored(learner.version, vocab_size))
    elif variant == "rm_actor":
        net = PolicyValueModel(model_path, lora, torch.float32, 0, (REWARD,))

        def update() -> None:
            score_rows(net, rows, pad)
    elif variant in ("sft_lora", "dpo"):
        net = PolicyValueModel(model_path, lora, torch.float32, 0)
        params = net.adapter_parameters("policy")
        opt = torch.optim.AdamW(params, lr=1e-4)
        batch = collate_scored(scored, pad)
        ones = torch.ones(len(scored))

        def update() -> None:
            if variant == "sft_lora":
                loss = weighted_nll(net.logprobs(batch), batch.mask, ones, False)
            else:  # pairs: even rows chosen, odd rows rejected; reference = adapter off
                logp = (net.logprobs(batch) * batch.mask).sum(-1)
                ref = (net.reference_logprobs(batch) * batch.mask).sum(-1)
                loss, _ = dpo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], beta=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        update = _full_ppo_update(model_path, scored, pad)

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        update()
        times.append(time.perf_counter() - start)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        baseline = 0.0
    else:
        peak = _rss_mb()
    return {"variant": variant, "peak_mb": peak, "baseline_mb": baseline,
            "step_seconds": statistics.median(times[1:])}


def _full_ppo_update(model_path: str, scored, pad: int):
    """Full-parameter PPO: policy, value (+ head) and reference are three full model copies;
    same losses and default hyper-parameters as PPOLearner."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..learner.algorithms.ppo import (
        gae_advantages,
        masked_whiten,
        ppo_policy_loss,
        ppo_value_loss,
        token_rewards,
    )
    from ..learner.algorithms.registry import PPOConfig
    from ..learner.model import collate_scored, gather_positions, token_logprobs

    def load():
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    policy, value, reference = load(), load(), load()
    head = torch.nn.Linear(value.config.hidden_size, 1)
    reference.requires_grad_(False)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    value_opt = torch.optim.AdamW([*value.parameters(), *head.parameters()], lr=1e-5)
    batch = collate_scored(scored, pad)
    scores = torch.tensor([s.reward for s in scored])
    algo = PPOConfig()

    def values_of() -> torch.Tensor:
        hidden = value.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return head(gather_positions(hidden.last_hidden_state, batch.positions)).squeeze(-1)

    def logp_of(model) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return token_logprobs(logits, batch, False)

    def update() -> None:
        with torch.no_grad():
            old_logp, ref_logp, old_values = logp_of(policy), logp_of(reference), values_of()
            rewards = token_rewards(scores, old_logp - ref_logp, batch.mask, algo.kl_coef)
            adv, returns = gae_advantages(rewards, old_values, batch.mask, algo.gamma, algo.lam)
            adv = masked_whiten(adv, batch.mask)
        loss, _, _ = ppo_policy_loss(logp_of(policy), old_logp, adv, batch.mask, algo.clip_eps)
        policy_opt.zero_grad(set_to_none=True)
        loss.backward()
        policy_opt.step()
        v_loss, _ = ppo_value_loss(
            values_of(), old_values, returns, batch.mask, algo.value_clip_eps
        )
        value_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        value_opt.step()

    return update


def bench_memory() -> None:
    from ..common.cache import cache_root

    model_path = bench_model(cache_root())
    results = []
    for variant in VARIANTS:
        print(f"measuring {variant} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, "-m", "lorafleet.cluster.bench_memory", variant, str(model_path)],
            check=True, capture_output=True, text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = {r["variant"]: r for r in results}["sft_lora"]
    base_own = base["peak_mb"] - base["baseline_mb"]
    print(f"\nlearner memory, ~100M-param Llama (float32), {PROMPTS} prompts x {N_SAMPLES} "
          f"samples x {SEQ_PROMPT}+{SEQ_RESPONSE} tokens, one update")
    print("| variant | peak RSS (MB) | peak - imports (MB) | vs SFT-LoRA | update (s) |"
          " vs SFT-LoRA |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        own = r["peak_mb"] - r["baseline_mb"]
        print(f"| {r['variant']} | {r['peak_mb']:.0f} | {own:.0f} | {own / base_own:.2f}x |"
              f" {r['step_seconds']:.2f} | {r['step_seconds'] / base['step_seconds']:.2f}x |")


if __name__ == "__main__":
    print(json.dumps(one_variant(sys.argv[1], sys.argv[2])))
