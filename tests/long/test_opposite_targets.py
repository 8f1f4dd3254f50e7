"""Two policies on one fleet learning opposite targets: the default job (`exact`) and
`plus_one` (rewarded for the sum + 1), 20 iterations in one run on the session cluster; each
saved adapter answers the held-out prompts with its own target, so they disagree on most. The
long tier: the submitted default job (tests/e2e/test_jobs.py) runs one learning policy beside
a failing one."""

from __future__ import annotations

from helpers import assert_margin, fraction, hf_greedy_answers
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.trainer import Trainer
from lorafleet.common.tasks.registry import build_task

# Measured over seeds 0, 1, 2 (`lorafleet train` of this job, with a third policy whose reward
# raises, seed=S, 2 cores, AMD EPYC): held-out greedy answers that are the policy's own target
# (HF + PEFT) exact 0.904-0.916, plus_one 0.960-0.976; the two disagree on 0.996-1.000 of the
# prompts; held-out sampled reward on its own target, end - start, exact +0.564 to +0.590,
# plus_one +0.246 to +0.276 (it starts at the shipped model's habit: greedy 0.936 ->
# 0.960-0.976). Seed 0 with ATEN_CPU_CAPABILITY=avx2: 0.896, 0.968, 1.000, +0.574, +0.266.
MIN_OWN_TARGET = 0.6
MIN_DISAGREEMENT = 0.8
MIN_OWN_GAIN = {"exact": 0.3, "plus_one": 0.12}
POLICIES = ("policies=[{name: exact}, "
            "{name: plus_one, reward.fns: ['tests.helpers:exact_sum_plus_one']}]")


def test_opposite_targets_each_learn_their_own_and_disagree(ray_cluster, tmp_path,
                                                           tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_train_config("deploy/configs/default.yaml", [
        f"run_dir={tmp_path / 'run'}", "iterations=20", "eval_every=0", "checkpoint_every=0",
        POLICIES])
    with Trainer(cfg) as trainer:
        root = trainer.run()
    policy_cfg = load_train_config(root.policy("exact").config)
    gold = [e.answer for e in build_task(policy_cfg.task).examples("eval")]
    answers = {}
    for name in ("exact", "plus_one"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        model = PeftModel.from_pretrained(base, str(root.policy(name).adapter)).eval()
        answers[name] = hf_greedy_answers(model, policy_cfg, tiny_model_path)
    targets = {"exact": gold, "plus_one": [str(int(g) + 1) for g in gold]}
    for name in ("exact", "plus_one"):
        assert_margin(f"policy {name}: held-out greedy on its own target",
                      fraction(answers[name], targets[name]), MIN_OWN_TARGET)
    assert_margin("exact vs plus_one: held-out prompts they disagree on",
                  1 - fraction(answers["exact"], answers["plus_one"]), MIN_DISAGREEMENT)
    for name in ("exact", "plus_one"):  # each one's held-out reward on its own target rose
        evals = root.policy(name).read_summary()["stage_evals"]
        assert_margin(f"policy {name}: held-out sampled reward, end - start",
                      evals[-1]["eval_reward"] - evals[0]["eval_reward"], MIN_OWN_GAIN[name])
