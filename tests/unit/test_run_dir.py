"""The run directory's layout: never overwriting a run, and the rollout files' positions."""

from __future__ import annotations

from lorafleet.common.run_dir import RunDir, fresh_directory


def test_a_fresh_run_never_overwrites_one(tmp_path, capsys):
    first = RunDir.fresh(tmp_path / "run")
    assert first == RunDir(tmp_path / "run") and first.path.is_dir()
    assert RunDir.fresh(tmp_path / "run").path == tmp_path / "run"  # still empty: reused
    first.config.write_text("seed: 0\n")
    assert RunDir.fresh(tmp_path / "run").path == tmp_path / "run-2"
    (tmp_path / "run-2" / "metrics.jsonl").write_text("")
    assert fresh_directory(tmp_path / "run") == tmp_path / "run-3"
    assert "already holds a run; writing to" in capsys.readouterr().out


def test_rollout_files_are_named_and_found_by_position(tmp_path):
    run_dir = RunDir(tmp_path)
    for stage, iteration in ((1, 12), (0, 3)):
        path = run_dir.rollout_file(stage, iteration)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    assert run_dir.rollout_file(0, 3).name == "stage0_iter00003.parquet"
    assert [(position, path.name) for position, path in run_dir.rollout_files()] == [
        ((0, 3), "stage0_iter00003.parquet"), ((1, 12), "stage1_iter00012.parquet"),
    ]


def test_a_run_that_logged_nothing_is_discarded(tmp_path):
    failed = RunDir.fresh(tmp_path / "failed")
    failed.config.write_text("seed: 0\n")  # written before the fleet failed to start
    failed.discard_if_unused()
    assert not failed.path.exists()
    started = RunDir.fresh(tmp_path / "started")
    started.config.write_text("seed: 0\n")
    started.metrics.write_text("{}\n")
    started.discard_if_unused()
    assert started.config.exists()
