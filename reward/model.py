"""A learned reward model served by a reward actor: the saved base + reward adapter + head,
rebuilt with the learner's own model code so it scores exactly as it did in training."""

from __future__ import annotations

from pathlib import Path

from ..common.data import pad_token_id
from ..common.devices import actor_device
from ..common.records import Rollout


class LearnedReward:
    """Loads a reward model directory (`lorafleet train-rm` or `rm` stage output) once and
    scores batches of rollouts."""

    def __init__(self, directory: str, threads: int = 1, batch_size: int = 64) -> None:
        import torch

        from ..common.config import LoRAConfig
        from ..common.tiny_model import load_tokenizer
        from ..learner.model import DTYPES, REWARD, PolicyValueModel, load_adapter
        from ..learner.reward_model import read_reward_model_meta

        torch.set_num_threads(threads)
        self.directory = Path(directory)
        self.meta = read_reward_model_meta(self.directory)
        base = self.meta["base_model"]
        self.tokenizer = load_tokenizer(base)
        # on the GPU Ray assigned this actor (reward.num_gpus_per_actor), else the CPU; in
        # the dtype it was trained in, so it scores as it did in training
        device, _ = actor_device(self.meta["dtype"])
        self.net = PolicyValueModel(
            base, LoRAConfig(**self.meta["lora"]), DTYPES[self.meta["dtype"]], 0, (REWARD,),
            device,
        )
        load_adapter(self.net, REWARD, self.directory)
        self.batch_size = batch_size

    def score(self, rollouts: list[Rollout]) -> list[float]:
        from ..learner.reward_model import rollout_rows, score_rows

        rows = rollout_rows(self.tokenizer, rollouts)
        return score_rows(self.net, rows, pad_token_id(self.tokenizer), self.batch_size)
