"""Training a LoRA reward model (PERL): the "reward" adapter + scalar head of a base model,
fitted with the Bradley-Terry loss on preference pairs, and the directory format it is saved in.

The same code trains on a model built only for it (`lorafleet train-rm`) and on the learner's
own base (the `rm` stage, PERL's one-base option); the scores come from `score_rows` in both
training and serving, so a saved reward model scores exactly as it did when it was evaluated.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..common.records import OfflineStats, PreferencePair, Rollout
from .algorithms.reward_model import bradley_terry_loss, pairwise_accuracy
from .model import REWARD, PolicyValueModel, load_adapter, save_adapter

META_FILE = "reward_model.json"


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask of token rows."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def score_rows(
    net: PolicyValueModel, rows: list[list[int]], pad_id: int, batch_size: int = 64
) -> list[float]:
    """The reward adapter's score of each token row (no gradients), in chunks."""
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_rows(rows[start : start + batch_size], pad_id)
            out += net.scores(ids, mask, REWARD).float().tolist()
    return out


def rollout_rows(tokenizer, rollouts: list[Rollout]) -> list[list[int]]:
    """Prompt + response text re-tokenised the way the preference data was (`corpora.encode`:
    canonical tokens, EOS after a finished answer), whatever tokens the policy sampled."""
    rows = []
    for r in rollouts:
        prompt = tokenizer(r.prompt.text).input_ids
        response = tokenizer(r.response_text, add_special_tokens=False).input_ids
        rows.append(prompt + response + ([tokenizer.eos_token_id] if r.finish_reason == "stop"
                                         else []))
    return rows


class RewardModelTrainer:
    """Bradley-Terry steps and pairwise evaluation of the reward adapter of `net`; a step's
    stats carry the steps taken before it (the reward adapter's version it trained)."""

    def __init__(self, net: PolicyValueModel, lr: float, max_grad_norm: float, pad_id: int):
        self.net = net
        self.pad_id = pad_id
        self.max_grad_norm = max_grad_norm
        self.params = net.adapter_parameters(REWARD)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0)
        self.steps = 0

    def pair_scores(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [p.prompt_ids + p.chosen_ids for p in pairs]
        rows += [p.prompt_ids + p.rejected_ids for p in pairs]
        scores = self.net.scores(*pad_rows(rows, self.pad_id), REWARD)
        return scores[: len(pairs)], scores[len(pairs) :]

    def step(self, pairs: list[PreferencePair]) -> OfflineStats:
        chosen, rejected = self.pair_scores(pairs)
        margin = torch.tensor([p.margin for p in pairs], dtype=chosen.dtype, device=chosen.device)
        tie = torch.tensor([p.tie for p in pairs], device=chosen.device)
        loss, diff = bradley_terry_loss(chosen, rejected, margin, tie)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        stats = OfflineStats(
            self.steps, loss.item(), float(grad_norm), len(pairs),
            preference_accuracy=float(pairwise_accuracy(diff.detach(), tie)),
            reward_margin=float(diff.detach().mean()),
        )
        self.steps += 1
        return stats

    def evaluate(self, pairs: list[PreferencePair], batch_size: int = 64) -> dict[str, float]:
        """Pairwise accuracy (non-tie pairs) and mean score margin chosen - rejected."""
        chosen = score_rows(self.net, [p.prompt_ids + p.chosen_ids for p in pairs],
                            self.pad_id, batch_size)
        rejected = score_rows(self.net, [p.prompt_ids + p.rejected_ids for p in pairs],
                              self.pad_id, batch_size)
        diff = torch.tensor(chosen) - torch.tensor(rejected)
        tie = torch.tensor([p.tie for p in pairs])
        return {"pairs": len(pairs), "accuracy": float(pairwise_accuracy(diff, tie)),
                "mean_margin": float(diff.mean()),
                "score_mean": float(torch.tensor(chosen + rejected).mean()),
                "score_std": float(torch.tensor(chosen + rejected).std())}

    def state(self) -> dict:
        return {"opt": self.opt.state_dict(), "steps": self.steps}

    def load_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.steps = int(state["steps"])


def save_reward_model(
    net: PolicyValueModel, directory: Path, base_model: str, lora: object, dtype: str,
    info: dict,
) -> Path:
    """PEFT adapter + `reward_head.safetensors` + `reward_model.json` (the base model, LoRA
    shape and dtype a reward actor needs to rebuild it, and `info`: data, evaluation)."""
    save_adapter(net, REWARD, 0, directory)
    meta = {"base_model": base_model, "lora": asdict(lora), "dtype": dtype, **info}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def read_reward_model_meta(directory: Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a reward model directory (no {META_FILE}); train one with "
            "`lorafleet train-rm CONFIG` or an `rm` stage"
        )
    return json.loads(path.read_text())


def attach_reward_model(net: PolicyValueModel, directory: Path) -> None:
    """Add the saved reward adapter (+ head) to `net` and load its weights."""
    from ..common.config import LoRAConfig

    net.add_adapter(REWARD, LoRAConfig(**read_reward_model_meta(directory)["lora"]))
    load_adapter(net, REWARD, Path(directory))
