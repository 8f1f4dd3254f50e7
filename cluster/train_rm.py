"""`lorafleet train-rm`: a LoRA reward model (adapter + scalar head on the base model, PERL)
trained with the Bradley-Terry loss on preference pairs, evaluated on held-out pairs, saved in
a directory the reward pool (reward.model=DIR) and the learner can load.

It runs in this process (one model, no actors); the `rm` stage of `lorafleet train` trains the
same way on the learner actor.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..common.configio import save_config
from ..common.corpora import LoadedDataset, load_preferences
from ..common.data import epoch_batches, split_held_out
from ..common.metrics import MetricsSink
from ..common.progress import progress
from ..common.tasks.registry import build_task
from .config import TrainConfig
from .fleet import REWARD_MODEL_DIR, resolve_model


def reward_model_report(
    run_dir: Path, before: dict, after: dict, data: LoadedDataset, train_pairs: int, steps: int
) -> dict:
    """Write RUN_DIR/rm_eval.json and print the held-out accuracy / margin before and after."""
    report = {"before": before, "after": after, "train_pairs": train_pairs, "steps": steps,
              "data": data.describe()}
    (run_dir / "rm_eval.json").write_text(json.dumps(report, indent=2))
    print(f"reward model on {after['pairs']} held-out pairs: accuracy {before['accuracy']:.3f}"
          f" -> {after['accuracy']:.3f}, mean margin {before['mean_margin']:.3f} -> "
          f"{after['mean_margin']:.3f}", flush=True)
    return report


def train_reward_model(cfg: TrainConfig) -> Path:
    """Returns the saved reward model directory (RUN_DIR/reward_model)."""
    import torch
    from transformers import AutoTokenizer

    from ..learner.model import DTYPES, REWARD, PolicyValueModel
    from ..learner.reward_model import RewardModelTrainer, save_reward_model
    from .trainer import fresh_run_dir

    start = time.perf_counter()
    model_path = resolve_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = load_preferences(cfg.rm.data, build_task(cfg.task), tokenizer, cfg.model.max_model_len)
    print(f"rm data: {data.describe()}")
    train, held_out = split_held_out(data.items, cfg.rm.eval_fraction, cfg.seed)
    run_dir = fresh_run_dir(Path(cfg.run_dir))
    cfg.run_dir = str(run_dir)
    save_config(cfg, run_dir / "config.yaml")

    torch.set_num_threads(cfg.learner.threads)
    net = PolicyValueModel(model_path, cfg.lora, DTYPES[cfg.model.dtype], cfg.seed, (REWARD,))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = RewardModelTrainer(net, cfg.rm.lr, cfg.algo.max_grad_norm, pad)
    before = trainer.evaluate(held_out)
    sink = MetricsSink(run_dir)
    batches = epoch_batches(len(train), cfg.rm.batch_size, cfg.rm.epochs, cfg.seed)
    bar = progress(batches, desc="reward model", unit="step")
    for step, (epoch, rows) in enumerate(bar):
        stats = trainer.step([train[i] for i in rows])
        sink.log({"stage": "rm", "step": step, "epoch": epoch, **vars(stats)})
        bar.set_postfix(loss=f"{stats.loss:.4f}", acc=f"{stats.preference_accuracy:.2f}",
                        refresh=False)
    after = trainer.evaluate(held_out)
    report = reward_model_report(run_dir, before, after, data, len(train), len(batches))
    directory = save_reward_model(
        net, run_dir / REWARD_MODEL_DIR, model_path, cfg.lora, cfg.model.dtype,
        {"eval": after, "eval_before": before, "data": data.describe()},
    )
    report["wall_seconds"] = time.perf_counter() - start
    (run_dir / "rm_eval.json").write_text(json.dumps(report, indent=2))
    print(f"saved the reward model to {directory} ({report['wall_seconds']:.0f} s); score "
          f"with it: lorafleet train reward.model={directory} reward.rule_weight=0")
    return directory
