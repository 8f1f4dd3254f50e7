"""What a finished run's records must show however often its processes were killed: every
prompt trained on exactly once, adapter versions without a gap or a repeat, and no checkpoint
left half written. Each check returns the problems it found (empty: it holds); the tests
assert on them and `lorafleet bench soak` prints them."""

from __future__ import annotations

from ..common.data import PromptStream, encode_prompts
from ..common.metrics import read_metrics
from ..common.run_dir import RunDir
from ..common.tasks.registry import build_task
from .checkpoint import TRAINER_STATE
from .config import TrainConfig


def expected_batches(cfg: TrainConfig, tokenizer) -> list[list[int]]:
    """The prompt indices an uninterrupted run serves per iteration (its PromptStream)."""
    limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
    examples = build_task(cfg.task).examples("train")
    stream = PromptStream(encode_prompts(examples, tokenizer, limit), cfg.seed)
    return [[p.index for p in stream.next_batch(cfg.prompts_per_iteration)]
            for _ in range(cfg.iterations)]


def prompts_not_once(run_dir: RunDir, cfg: TrainConfig, tokenizer) -> list[str]:
    """Iterations whose rollouts (Parquet, logging.rollouts_parquet) are not their
    PromptStream batch with rollout.samples_per_prompt samples of each prompt."""
    import pyarrow.parquet as pq

    n = cfg.rollout.samples_per_prompt
    problems = []
    for it, indices in enumerate(expected_batches(cfg, tokenizer)):
        path = run_dir.rollout_file(0, it)
        if not path.exists():
            problems.append(f"iteration {it}: no rollouts file {path}")
            continue
        table = pq.read_table(path).to_pylist()
        if sorted(r["prompt_index"] for r in table) != sorted(indices * n):
            problems.append(f"iteration {it}: prompts lost or repeated")
        if {r["sample_index"] for r in table} != set(range(n)):
            problems.append(f"iteration {it}: sample indices are not 0..{n - 1}")
    return problems


def versions_not_continuous(run_dir: RunDir, iterations: int) -> list[str]:
    """The RL rows' iterations and the adapter versions they trained are not 0..iterations-1,
    each once, in order."""
    rows = read_metrics(run_dir)
    expected = list(range(iterations))
    problems = []
    for key in ("iteration", "adapter_version"):
        seen = [r[key] for r in rows]
        if seen != expected:
            gaps = sorted(set(expected) - set(seen))
            repeats = sorted({v for v in seen if seen.count(v) > 1})
            problems.append(f"metrics rows' {key}: {len(seen)} rows, missing {gaps[:10]}, "
                            f"repeated {repeats[:10]}")
    return problems


def half_written_checkpoints(run_dir: RunDir) -> list[str]:
    """Checkpoint directories without their trainer state (written last)."""
    root = run_dir.checkpoints
    directories = sorted(root.glob("*")) if root.is_dir() else []
    return [f"{d.name}: no {TRAINER_STATE}" for d in directories
            if not (d / TRAINER_STATE).exists()]
