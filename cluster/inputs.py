"""A run's inputs, built once and checked before any actor starts: the model, its tokenizer,
the task, its training and held-out prompts, the offline stages' datasets and what the rollout
workers must serve besides the policy."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..common.config import TINY
from ..common.configio import ConfigError
from ..common.corpora import (
    DatasetError,
    LoadedDataset,
    level_counts,
    load_leveled,
    load_paired_levels,
    load_preferences,
    load_sft,
)
from ..common.data import encode_prompts, pad_token_id
from ..common.records import Prompt
from ..common.tasks.base import Task
from ..common.tasks.registry import build_task
from .config import TrainConfig
from .specs import reward_rules


@dataclass
class RunInputs:
    """Everything a run reads before it starts; one instance per run."""

    model_path: str  # a model directory (absolute) or a hub name every actor loads
    pad_token_id: int
    task: Task
    train: list[Prompt]
    held_out: list[Prompt]
    prompts_skipped: int  # left out as too long (rollout.too_long_prompts=skip)
    stage_data: dict[str, LoadedDataset]  # sft / dpo / rm / meet rows, by stage
    # meet.control=text: each level's held-out prompts, led by its control text
    level_prompts: list[list[Prompt]] = field(default_factory=list)
    # meet.control=lora|prompt: the levels the rollout workers serve beside the policy
    served_levels: int = 0

    def probe_ids(self, count: int) -> list[list[int]]:
        """The token ids of the prompts every adapter sync is verified with."""
        return [p.token_ids for p in self.held_out[:count]]


def load_run_inputs(cfg: TrainConfig) -> RunInputs:
    """Builds and checks every input of `cfg`; a bad one raises naming its key, file or row."""
    reward_rules(cfg)  # a bad reward function fails before the model is built
    task = build_task(cfg.task)
    model_path = resolve_model(cfg, task)
    tokenizer = driver_tokenizer(cfg, model_path)
    train, held_out, skipped = encode_task_prompts(cfg, task, tokenizer)
    reward_rules(cfg, {c for p in train + held_out for c in p.columns})
    stage_data = load_stage_data(cfg, task, tokenizer)
    inputs = RunInputs(model_path, pad_token_id(tokenizer), task, train, held_out, skipped,
                       stage_data)
    if "meet" in cfg.stages:
        inputs.level_prompts = [control_text_prompts(cfg, task, tokenizer, text)
                                for text in cfg.meet.control_texts]
        if cfg.meet.control != "text":
            inputs.served_levels = len(level_counts(stage_data["meet"].items))
    return inputs


def encode_task_prompts(
    cfg: TrainConfig, task: Task, tokenizer
) -> tuple[list[Prompt], list[Prompt], int]:
    """The task's training and held-out prompts, and how many were left out as too long for
    the model (rollout.too_long_prompts=skip; else a prompt too long is an error)."""
    limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
    too_long: list[str] | None = [] if cfg.rollout.too_long_prompts == "skip" else None
    train = encode_prompts(task.examples("train"), tokenizer, limit, skipped=too_long)
    held_out = encode_prompts(task.examples("eval"), tokenizer, limit, skipped=too_long)
    if too_long:
        print(f"skipped {len(too_long)} prompts longer than {limit} tokens "
              f"(rollout.too_long_prompts=skip), e.g. {too_long[0][:60]!r}")
    return train, held_out, len(too_long or [])


def control_text_prompts(cfg: TrainConfig, task: Task, tokenizer, text: str) -> list[Prompt]:
    """The held-out prompts led by a level's control text (Chain of Hindsight)."""
    examples = [replace(ex, prompt=f"{text} {ex.prompt}") for ex in task.examples("eval")]
    return encode_prompts(examples, tokenizer, cfg.model.max_model_len - cfg.rollout.max_new_tokens)


def load_stage_data(cfg: TrainConfig, task: Task, tokenizer) -> dict[str, LoadedDataset]:
    """The offline stages' datasets, tokenised and checked."""
    loaders = {"sft": (load_sft, cfg.sft.data), "dpo": (load_preferences, cfg.dpo.data),
               "rm": (load_preferences, cfg.rm.data)}
    data = {}
    for stage in dict.fromkeys(cfg.stages):
        if stage in loaders:
            load, source = loaders[stage]
            data[stage] = load(source, task, tokenizer, cfg.model.max_model_len)
            print(f"{stage} data: {data[stage].describe()}")
    if "meet" in cfg.stages:
        data["meet"] = load_meet_data(cfg, task, tokenizer)
    return data


def load_meet_data(cfg: TrainConfig, task: Task, tokenizer) -> LoadedDataset:
    """The meet stage's rows with their levels (prompts led by the control text under
    meet.control=text); a level count the config does not fit is an error."""
    meet = cfg.meet
    if meet.pairs:
        data = load_paired_levels(meet.data, task, tokenizer, cfg.model.max_model_len)
    else:
        data = load_leveled(
            meet.data, meet.level_column, meet.score_column, meet.bins, task, tokenizer,
            cfg.model.max_model_len, meet.control_texts,
        )
    counts = level_counts(data.items)
    if meet.best_level is not None and meet.best_level >= len(counts):
        raise DatasetError(f"meet.best_level={meet.best_level}: {data.source} has levels "
                           f"0..{len(counts) - 1}")
    if meet.control == "text" and len(meet.control_texts) != len(counts):
        raise DatasetError(f"meet.control_texts: {len(meet.control_texts)} texts for the "
                           f"{len(counts)} levels of {data.source}")
    print(f"meet data: {data.describe()}, rows per level {counts}")
    return data


def resolve_model(cfg: TrainConfig, task: Task) -> str:
    """The model directory (absolute) or hub name every actor loads; builds the embedded model
    (for `task`) if asked. A model that cannot be found fails here, naming model.name_or_path."""
    name = cfg.model.name_or_path
    if name == TINY:
        from ..common.tiny_model import build_tiny_model

        return str(build_tiny_model(task.model_recipe, cfg.model.tiny))
    what = f"model.name_or_path={name!r}"
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) or path.is_dir():
        if not (path / "config.json").is_file():
            problem = "has no config.json" if path.is_dir() else "does not exist"
            raise ConfigError(f"{what}: the local model directory {path} {problem}; give a "
                              f"Hugging Face model directory, a hub name, or {TINY}")
        return str(path.resolve())  # actors may run in another working directory
    check_hub_model(name, what)
    return name


def check_hub_model(name: str, what: str) -> None:
    """In the local hub cache, or found on the hub by one request (no retries)."""
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
        if constants.HF_HUB_OFFLINE:
            problem = "not in the local hub cache and HF_HUB_OFFLINE is set"
        elif file_exists(name, "config.json"):
            return
        else:
            problem = "no such model on the hub (a gated or private one needs `hf auth login`)"
    except Exception as exc:  # not a repo id, network down, gated: all for the user to fix
        cause = str(exc).partition("\n")[0]
        problem = f"looking it up on the hub failed ({type(exc).__name__}: {cause})"
    raise ConfigError(f"{what}: neither a local directory nor a model on the hub: {problem}; "
                      f"give a Hugging Face model directory, a reachable hub name, or {TINY}")


def driver_tokenizer(cfg: TrainConfig, model_path: str):
    """The tokenizer that renders and tokenises the prompts (vLLM and the learner get its token
    ids), with model.chat_template in place of the model's own when set."""
    from ..common.tiny_model import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    if cfg.model.chat_template is not None:
        tokenizer.chat_template = cfg.model.chat_template
    return tokenizer
