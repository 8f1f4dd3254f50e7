"""The stages besides RL, each a loop of learner steps over a dataset: sft and dpo (the
policy), rm (the reward model the later stages score with) and meet (one control per quality
level, then the best level's policy). The driver (trainer.py) runs them in `stages` order."""

from __future__ import annotations

from collections.abc import Callable

from ..common.corpora import LoadedDataset, level_counts
from ..common.data import epoch_batches, split_held_out
from ..common.progress import progress
from ..common.records import Prompt
from ..common.run_dir import RunDir
from ..rollout.worker import level_slot
from .config import TrainConfig
from .fleet import Fleet
from .report import reward_model_report

Log = Callable[[dict, int], None]  # (metrics row, wandb step)
Evaluate = Callable[..., dict]  # Trainer.evaluate


def run_steps(calls, items: list, batch_size: int, epochs: int, seed: int, desc: str, log: Log,
              row: dict) -> int:
    """Shuffled minibatches of `items`, `epochs` passes, one learner call each (`calls(rows)`
    -> a Ray call returning OfflineStats), each logged with `row`'s keys; returns the steps."""
    import ray

    batches = epoch_batches(len(items), batch_size, epochs, seed)
    bar = progress(batches, desc=desc, unit="step")
    for step, (epoch, rows) in enumerate(bar):
        stats = ray.get(calls([items[i] for i in rows]))
        log({**row, "step": step, "epoch": epoch, **vars(stats)}, stats.adapter_version)
        bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
    return len(batches)


def run_offline_stage(
    cfg: TrainConfig, learner, stage: str, data: LoadedDataset, index: int, log: Log,
) -> None:
    """sft or dpo: the policy adapter stepped over the dataset with a fresh optimiser."""
    import ray

    section = {"sft": cfg.sft, "dpo": cfg.dpo}[stage]
    ray.get(learner.start_stage.remote(section.lr))
    step = {"sft": learner.sft_step.remote,
            "dpo": lambda batch: learner.dpo_step.remote(batch, cfg.dpo.beta)}[stage]
    run_steps(step, data.items, section.batch_size, section.epochs, cfg.seed,
              f"stage {index + 1} {stage.upper()}", log, {"stage": stage})


def run_rm_stage(
    cfg: TrainConfig, learner, data: LoadedDataset, index: int, log: Log, run_dir: RunDir,
) -> dict:
    """The reward adapter trained on all but the held-out pairs, evaluated on those before and
    after, saved to RUN_DIR/reward_model; returns the report (rm_eval.json)."""
    import ray

    items, held_out = split_held_out(data.items, cfg.rm.eval_fraction, cfg.seed)
    ray.get(learner.start_reward_model.remote(cfg.rm.lr))
    before = ray.get(learner.rm_evaluate.remote(held_out))
    steps = run_steps(learner.rm_step.remote, items, cfg.rm.batch_size, cfg.rm.epochs, cfg.seed,
                      f"stage {index + 1} RM", log, {"stage": "rm"})
    after = ray.get(learner.rm_evaluate.remote(held_out))
    report = reward_model_report(run_dir, before, after, data, len(items), steps)
    ray.get(learner.save_reward_model.remote(
        str(run_dir.reward_model), {"eval": after, "eval_before": before, "data": data.describe()}
    ))
    return report


def run_meet_stage(
    cfg: TrainConfig, fleet: Fleet, data: LoadedDataset, index: int, log: Log,
    evaluate: Evaluate, level_prompts: list[list[Prompt]],
) -> dict:
    """Stage 1 (each level's control alone), then stage 2 (the controls with the shared
    policy LoRA), each on shuffled minibatches of every level's rows; then every level's
    held-out evaluation, and the best level's adapter becomes the policy the later stages
    continue from. Returns the best level's evaluation with each level's mean reward,
    sampled and greedy (`meet/level{k}_sampled`, `meet/level{k}_greedy`)."""
    import ray

    meet, learner = cfg.meet, fleet.learner
    levels = len(level_counts(data.items))
    best = levels - 1 if meet.best_level is None else meet.best_level
    ray.get(learner.start_meet.remote(meet.control, levels, meet.control_size))
    phases = [(1, meet.stage1_epochs, meet.stage1_lr), (2, meet.stage2_epochs, meet.stage2_lr)]
    for phase, epochs, lr in phases:
        if not epochs:
            continue
        ray.get(learner.start_meet_phase.remote(lr, phase == 2))
        run_steps(learner.meet_step.remote, data.items, meet.batch_size, epochs, cfg.seed,
                  f"stage {index + 1} MEET-{phase}", log, {"stage": "meet", "phase": phase})
    ray.get(learner.use_level.remote(best))
    fleet.sync_adapter()  # the policy the later stages continue from
    if meet.control == "text":  # that policy (the shared LoRA) under each level's text
        per_level = {k: evaluate(level_prompts[k]) for k in range(levels)}
    else:  # every level served at once beside it, each chosen per request
        fleet.sync_levels(levels)
        per_level = {k: evaluate(slot=level_slot(k)) for k in range(levels)}
    kinds = [("sampled", "eval_reward"), ("greedy", "eval_greedy")]
    if cfg.uses_reward_model:  # each level's reward-model score too
        kinds += [("sampled_model", "eval_reward_model"), ("greedy_model", "eval_greedy_model")]
    return {**per_level[best], **{
        f"meet/level{k}_{kind}": per_level[k][key] for k in range(levels) for kind, key in kinds
    }}
