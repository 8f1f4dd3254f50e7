"""Driver-side checkpoint state and resuming: where the run stood when a checkpoint was taken,
finding the newest complete checkpoint, and rewinding the run directory's logs to it."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..common.run_dir import RunDir

TRAINER_STATE = "trainer_state.json"  # written last: a checkpoint without it is incomplete


@dataclass
class TrainerState:
    """The next piece of work after the checkpoint: stage `next_stage` (index into
    cfg.stages), at RL iteration `next_iteration` (0 for offline stages)."""

    next_stage: int
    next_iteration: int
    prompt_cursor: int  # prompts served by the stream so far
    metrics_lines: int  # lines of metrics.jsonl that belong before the checkpoint
    stage_evals: list[dict]
    adapter_version: int
    reward_moments: dict  # reward.normalize=running statistics (RunningMoments.state())
    rm_eval: dict | None = None  # the rm stage's held-out evaluation, once it has run

    @property
    def position(self) -> tuple[int, int]:
        return self.next_stage, self.next_iteration

    def write(self, directory: Path) -> None:
        """Atomically (a kill mid-write leaves no partial file: the checkpoint stays
        incomplete and the previous one is used)."""
        partial = directory / f"{TRAINER_STATE}.partial"
        partial.write_text(json.dumps(asdict(self), indent=2))
        os.replace(partial, directory / TRAINER_STATE)

    @classmethod
    def read(cls, directory: Path) -> TrainerState:
        return cls(**json.loads((directory / TRAINER_STATE).read_text()))


class ResumeError(RuntimeError):
    """The run directory cannot be resumed; the message says why and what to do."""


def latest_checkpoint(
    run_dir: RunDir, at_most: tuple[int, int] | None = None
) -> tuple[Path, TrainerState]:
    """The newest complete checkpoint (at or before position `at_most` when given)."""
    root = run_dir.checkpoints
    complete = [(TrainerState.read(d), d) for d in sorted(root.glob("*"))
                if (d / TRAINER_STATE).exists()] if root.is_dir() else []
    if at_most is not None:
        complete = [(state, d) for state, d in complete if state.position <= at_most]
    if not complete:
        raise ResumeError(
            f"{run_dir} has no complete checkpoint under checkpoints/ (one is written every "
            "checkpoint_every RL iterations and after each offline stage); start it again "
            "without --resume"
        )
    state, directory = max(complete, key=lambda item: item[0].position)
    return directory, state


def rewind(run_dir: RunDir, state: TrainerState, checkpoint: Path) -> None:
    """Drop what the interrupted run logged after the checkpoint, so that the resumed run
    writes every iteration exactly once: metrics rows, rollout files, later checkpoints."""
    metrics = run_dir.metrics
    if metrics.exists():
        lines = metrics.read_text().splitlines(keepends=True)
        metrics.write_text("".join(lines[: state.metrics_lines]))
    for position, path in run_dir.rollout_files():
        if position >= state.position:
            path.unlink()
    for directory in run_dir.checkpoints.glob("*"):
        later = not (directory / TRAINER_STATE).exists() or (
            TrainerState.read(directory).position > state.position
        )
        if directory != checkpoint and later:
            shutil.rmtree(directory)
    for target in (run_dir.summary, run_dir.adapter):
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

