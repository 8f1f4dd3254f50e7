"""Typed records that cross role boundaries (driver, rollout, reward, learner).

Everything here is a plain dataclass of Python scalars, lists and (for adapters) CPU tensors, so
Ray serialises it without custom code and tests can build records by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The name of a run's one policy: its adapter on the learner and its slot on the rollout
# workers. A run with a `policies:` section names each of its policies instead.
POLICY = "policy"

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Prompt:
    """One prompt of the dataset; `index` is its position in the data stream (exactly-once
    accounting). `text` is what vLLM and the learner see (a conversation rendered by the chat
    template), `token_ids` its tokens, exactly those vLLM generates from and the learner trains
    on. `columns` are the row's other columns, handed to the reward functions by name (a
    built-in task's: {"reference": gold}); `conversation` is the prompt's messages when it is
    one (the reward functions then get it, and completions as messages, as TRL passes them)."""

    index: int
    text: str
    token_ids: list[int]
    columns: dict[str, Any]
    conversation: list[dict[str, str]] | None = None

    @property
    def reference(self) -> str:
        """A built-in task's gold reference ("" for a user's dataset, which has none)."""
        return self.columns.get("reference", "")


@dataclass(frozen=True)
class Rollout:
    """One sampled response, tagged with the policy and adapter version that produced it."""

    prompt: Prompt
    sample_index: int  # 0..n-1 among the samples drawn for this prompt
    response_ids: list[int]
    response_text: str
    logprobs: list[float]  # vLLM's per-token logprobs of response_ids (raw, pre-temperature)
    finish_reason: str  # "stop" (EOS) or "length"
    adapter_version: int
    worker_id: int
    # the policy (a rollout worker's adapter slot) that sampled it; the learner trains a
    # policy only on its own rollouts
    policy: str = POLICY
    # asked for by GenerationRequest.prompt_logprobs: each prompt token's log-prob, NaN for
    # the first (nothing precedes it)
    prompt_logprobs: list[float] | None = None

    @property
    def sample_id(self) -> str:
        return f"prompt {self.prompt.index} sample {self.sample_index}"


@dataclass(frozen=True)
class GenerationRequest:
    """Samples of one slot (a policy's adapter on the rollout workers): n per prompt, each
    prompt seeded by seed + prompt.index; a sample also ends at a `stop` string (cut from its
    text) or a `stop_token_ids` token. Several requests go to an engine in one call, so it
    batches across adapters."""

    slot: str | None  # None: the base model, no adapter
    prompts: list[Prompt]
    n: int
    temperature: float
    max_tokens: int
    seed: int
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    top_p: float = 1.0
    top_k: int = -1  # -1: every token
    # also each prompt token's log-prob given the tokens before it (Rollout.prompt_logprobs)
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class ScoredRollout:
    rollout: Rollout
    reward: float  # what the learner trains on; NaN when `error` is set
    error: str | None = None  # why the reward failed (reward.on_error=skip only)
    rule_reward: float | None = None  # the parts `reward` was combined from (for logging)
    # each reward function's own value (None: it does not apply to this sample), by name
    rule_parts: dict[str, float | None] = field(default_factory=dict)
    model_reward: float | None = None  # a learned reward model's score


@dataclass(frozen=True)
class ProbeResult:
    """Greedy tokens and vLLM logprobs that a worker produced for the fixed sync probe."""

    worker_id: int
    adapter_version: int
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]


@dataclass
class AdapterSnapshot:
    """A published LoRA adapter: PEFT's adapter_config.json content plus its state dict under
    PEFT's tensor names (`base_model.model....lora_A.weight`), stamped with a version; a meet
    level with a soft-prompt control also carries the embeddings put before every prompt."""

    version: int
    peft_config: dict
    tensors: dict[str, Tensor]
    checksum: str = field(default="")
    soft_prompt: Tensor | None = None  # [prompt_tokens, hidden]

    def __post_init__(self) -> None:
        if not self.checksum:
            self.checksum = tensors_checksum(self.checked_tensors)

    @property
    def checked_tensors(self) -> dict[str, Tensor]:
        if self.soft_prompt is None:
            return self.tensors
        return {**self.tensors, "soft_prompt": self.soft_prompt}

    def verify(self) -> None:
        """Raise if the tensors are not the ones that were published (a torn or wrong transfer)."""
        actual = tensors_checksum(self.checked_tensors)
        if actual != self.checksum:
            raise ValueError(
                f"adapter v{self.version}: checksum {actual} != published {self.checksum}"
            )

    def save_pretrained(self, directory: str | Path) -> Path:
        """PEFT format: loadable by `PeftModel.from_pretrained` and by vLLM from disk."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_config.json").write_text(json.dumps(self.peft_config, indent=2))
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        save_file(tensors, directory / "adapter_model.safetensors", metadata={
            "format": "pt", "lorafleet_version": str(self.version), "checksum": self.checksum,
        })
        return directory

    @classmethod
    def load_pretrained(cls, directory: str | Path) -> AdapterSnapshot:
        """A `save_pretrained` directory back, its tensors checked against the checksum they
        were saved with."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        directory = Path(directory)
        weights = directory / "adapter_model.safetensors"
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata() or {}
        snapshot = cls(int(metadata.get("lorafleet_version", 0)),
                       json.loads((directory / "adapter_config.json").read_text()),
                       load_file(weights), metadata.get("checksum", ""))
        snapshot.verify()
        return snapshot


def tensors_checksum(tensors: dict[str, Tensor]) -> str:
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class UpdateDiverged(RuntimeError):
    """An update's loss or gradient norm is not finite; it was not applied (the learner raises
    it, or returns it in a joint step's place for the policy it names)."""


@dataclass(frozen=True)
class TrainStats:
    """What one learner update reports; the driver adds rollout/reward figures around it."""

    # the version trained on; the learner is at adapter_version + 1 after (learner/actor.py)
    adapter_version: int
    # per-token KL(sampling policy || adapter-off reference), k3 on its own samples; None
    # when the algorithm computes no reference (kl_coef 0)
    kl: float | None
    policy_loss: float
    grad_norm: float
    logprob_diff_vllm: float  # mean |learner old logprob - vLLM logprob| over response tokens
    train_seconds: float
    entropy: float | None = None
    clip_fraction: float | None = None  # PPO, GRPO, RLOO
    approx_kl: float | None = None
    value_loss: float | None = None  # PPO only
    value_clip_fraction: float | None = None
    weight_max: float | None = None  # SPR / best-of-N: largest sample weight (after clipping)


@dataclass(frozen=True)
class SFTExample:
    """A tokenised prompt/response row of an SFT stage; `index` is its row in the source."""

    index: int
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS
    level: int | None = None  # the meet stage: the row's quality level, 0 = worst


@dataclass(frozen=True)
class PreferencePair:
    """A tokenised preference row (DPO, reward-model training)."""

    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0  # reward-model training: the score gap asked for (graded preferences)
    tie: bool = False  # reward-model training: neither side is preferred


@dataclass(frozen=True)
class OfflineStats:
    """One optimiser step of an offline stage (SFT, DPO, reward model) on one minibatch."""

    # the version trained on, as TrainStats's (the rm stage: the reward adapter's steps before)
    adapter_version: int
    loss: float
    grad_norm: float
    rows: int
    # DPO: share of pairs with a positive margin, and the mean beta * log-ratio margin;
    # reward model: share of pairs scored the right way round, and mean r_chosen - r_rejected
    preference_accuracy: float | None = None
    reward_margin: float | None = None
