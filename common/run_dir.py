"""A run directory's layout: the one place that names its files (the README's table lists
them). The driver writes them, `--resume` rewinds them, the benchmarks and tests read them."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path


def fresh_directory(path: str | Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... if it already holds something: never overwrite a
    run. The directory is created."""
    path = Path(path)
    candidate, k = path, 1
    while candidate.exists() and any(candidate.iterdir()):
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    if candidate != path:
        print(f"{path} already holds a run; writing to {candidate}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


@dataclass(frozen=True)
class RunDir:
    """The files of one training run under `path`."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # a str is welcome too

    @classmethod
    def fresh(cls, path: str | Path) -> RunDir:
        """A new run at `path` (or `path-2`, ...: `fresh_directory`)."""
        return cls(fresh_directory(path))

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        """The resolved configuration, its run_dir the directory actually written."""
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def adapter(self) -> Path:
        """The final policy adapter (PEFT format)."""
        return self.path / "adapter"

    @property
    def reward_model(self) -> Path:
        """The reward model an rm stage trains."""
        return self.path / "reward_model"

    @property
    def rm_eval(self) -> Path:
        return self.path / "rm_eval.json"

    @property
    def reward_curve(self) -> Path:
        return self.path / "reward_curve.png"

    def policy(self, name: str) -> RunDir:
        """A run with several policies: policy `name`'s own run directory (what a single
        run's holds, its config.yaml included)."""
        return RunDir(self.path / name)

    def policy_names(self) -> list[str]:
        """The policies a run with several policies has written so far."""
        return sorted(d.name for d in self.path.iterdir() if RunDir(d).config.is_file())

    @property
    def comparison(self) -> Path:
        """A run with several policies: the table comparing them (markdown)."""
        return self.path / "policies.md"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    @property
    def rollouts(self) -> Path:
        return self.path / "rollouts"

    def rollout_file(self, stage_index: int, iteration: int) -> Path:
        """One Parquet file per RL iteration."""
        return self.rollouts / f"stage{stage_index}_iter{iteration:05d}.parquet"

    def rollout_files(self) -> list[tuple[tuple[int, int], Path]]:
        """((stage index, iteration), path) of every rollout file written."""
        found = []
        for path in sorted(self.rollouts.glob("stage*_iter*.parquet")):
            stage, iteration = path.stem.removeprefix("stage").split("_iter")
            found.append(((int(stage), int(iteration)), path))
        return found

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())

    def discard_if_unused(self) -> None:
        """Remove a run that logged nothing (its start failed, e.g. on resources): a failed
        start leaves no half run, and the next run may take the same directory."""
        if not self.path.is_dir():
            return
        runs = [self, *(self.policy(name) for name in self.policy_names())]
        if not any(run.metrics.exists() or run.checkpoints.exists() for run in runs):
            shutil.rmtree(self.path)

    def write_summary(self, summary: dict) -> None:
        self.summary.write_text(json.dumps(summary, indent=2))
