"""The bench harness: every table names the command, the commit and the CPU it came from, and
its ratios are against the baseline row measured in the same command."""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import table_cells
from lorafleet.cluster.bench.harness import (
    commit,
    cpu_name,
    markdown_table,
    ratio,
    report,
)
from lorafleet.cluster.cli import parse

ROOT = Path(__file__).parents[2]


def test_report_names_the_command_commit_and_cpu(tmp_path, monkeypatch):
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    assert commit() == (git.stdout.strip() if git.returncode == 0 else "unknown")
    text = report("lorafleet bench reward", "reward-model scoring",
                  markdown_table(["reward actors", "samples/s", "vs 1 actor"],
                                 [["1", "200", ratio(200, 200)], ["2", "300", ratio(300, 200)]]))
    title, where = text.splitlines()[:2]
    assert title == "reward-model scoring"
    assert "`lorafleet bench reward`" in where and commit() in where and cpu_name() in where
    assert table_cells(text)["2"] == ["300", "1.50x"]
    monkeypatch.setenv("GIT_DIR", str(tmp_path))  # not a checkout (e.g. a wheel install)
    assert commit() == "unknown"


def test_the_cli_hands_the_command_as_typed():
    args = parse(["bench", "demo", "--seeds", "0", "learner.threads=1", "iterations=2"])
    assert args.command_line == "lorafleet bench demo --seeds 0 learner.threads=1 iterations=2"
