"""`lorafleet bench soak`: the default job in async mode for many iterations while processes
die, then the run's records checked.

The job runs as a `lorafleet train` subprocess (the driver) joined to a Ray head of its own
(cluster/local_head.py), whose state API tells this process the run's actors and their pids.
Every ~`kill_every` seconds it SIGKILLs a random rollout worker or reward actor (by the
pid Ray's state API reports for lorafleet-rollout-{i} / lorafleet-reward-{i}), one fault at a
time: the next kill waits until every actor is back in Ray and the driver has answered every
death it reported (a "died" line, then "is back": re-synced and verified, or "sending it
again"); `overlap` kills on schedule regardless, also while the driver is bringing a victim
back. Once, past half
the iterations, it SIGKILLs the driver, while a checkpoint is being written when it sees one
(a checkpoint directory without its trainer_state.json, which the driver writes last), else at
the first moment after the next one; then it runs `lorafleet train --resume RUN` on the same
head and goes on killing actors. Ray restarts an actor up to ray.max_actor_restarts times: the
soak sets it high, since it kills each one many times.

At the end (cluster/accounting.py): every prompt trained on exactly once (the rollouts'
Parquet against the run's prompt stream), adapter versions continuous (metrics rows), no
checkpoint half written; and the counts: actors killed, restarts the driver handled ("is
back"), calls re-sent on a dead process's connection ("sending it again"), deaths it saw
("died"), resumes; and the final held-out figures (summary.json). `--no-faults` runs the same
job undisturbed (the comparison)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...common.run_dir import RunDir
from ..accounting import half_written_checkpoints, prompts_not_once, versions_not_continuous
from ..checkpoint import TRAINER_STATE
from ..config import load_train_config
from ..local_head import AUTH_ENV, local_head
from ..specs import rollout_workers
from .harness import markdown_table, publish, report

DEFAULT_CONFIG = "deploy/configs/default.yaml"
SOAK_RUN = ["rollout.mode=async", "logging.rollouts_parquet=true", "eval_every=0",
            "placement.colocate=off",
            "ray.max_actor_restarts=1000"]
VICTIMS = ("lorafleet-rollout-", "lorafleet-reward-")
POLL_S = 0.01  # how often the driver's checkpoints are looked at (a write takes ~0.1 s)
# the driver's lines that count what it handled (cluster/actor_group.py)
DRIVER_LINES = {"deaths seen": " died (", "restarts handled": " is back (",
                "calls re-sent on a dead connection": "sending it again"}


@dataclass
class SoakLog:
    """What the soak did: its kills, the driver kill and the resume."""

    actor_kills: list[str] = field(default_factory=list)  # "name pid t=..s"
    driver_kill: str | None = None  # when and where the driver was killed
    half_written_at_kill: list[str] = field(default_factory=list)
    resumed_from: str | None = None
    driver_exits: list[int] = field(default_factory=list)


def victims(dashboard: str) -> dict[str, int]:
    """The run's live rollout and reward actors: name -> pid (Ray's state API, asked of the
    head's own dashboard: other clusters' may answer on the default port)."""
    from ray.util.state import list_actors

    alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.name: a.pid for a in alive if a.name and a.name.startswith(VICTIMS) and a.pid}


def start_driver(args: list[str], log: Path) -> subprocess.Popen:
    """`lorafleet train ARGS` in its own process group, its output appended to `log`."""
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "lorafleet.cluster.cli", "train", *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def checkpoint_being_written(run_dir: RunDir) -> Path | None:
    root = run_dir.checkpoints
    if not root.is_dir():
        return None
    return next((d for d in root.iterdir() if not (d / TRAINER_STATE).exists()), None)


def complete_checkpoints(run_dir: RunDir) -> set[str]:
    root = run_dir.checkpoints
    return {d.name for d in root.glob("*") if (d / TRAINER_STATE).exists()} if root.is_dir() \
        else set()


def rows_logged(run_dir: RunDir) -> int:
    path = run_dir.metrics
    return len(path.read_text().splitlines()) if path.exists() else 0


class Injector:
    """Kills a random rollout or reward actor every `kill_every` seconds and, once the run is
    past `driver_kill_row` metrics rows, the driver (during a checkpoint write if it can)."""

    def __init__(self, run_dir: RunDir, dashboard: str, driver_log: Path, actors: int,
                 kill_every: float, driver_kill_row: int | None, overlap: bool,
                 seed: int) -> None:
        self.run_dir = run_dir
        self.dashboard = dashboard
        self.driver_log = driver_log
        self.actors = actors  # rollout workers + reward actors of the run
        self.kill_every = kill_every
        self.driver_kill_row = driver_kill_row
        self.overlap = overlap
        self.rng = random.Random(seed)
        self.log = SoakLog()
        self.start = time.monotonic()
        self.next_kill = self.start + kill_every
        self.complete_at_row: set[str] | None = None  # checkpoints when the row was reached

    def watch(self, driver: subprocess.Popen) -> bool:
        """Until the driver exits; True if this injector killed it."""
        while driver.poll() is None:
            if self.driver_kill_row is not None and self.log.driver_kill is None \
                    and self.try_driver_kill(driver):
                driver.wait()
                return True
            if self.kill_every and time.monotonic() >= self.next_kill:
                killed = self.kill_actor()
                self.next_kill = time.monotonic() + (self.kill_every if killed else 1.0)
            time.sleep(POLL_S)
        return False

    def try_driver_kill(self, driver: subprocess.Popen) -> bool:
        if rows_logged(self.run_dir) < self.driver_kill_row:
            return False
        if self.complete_at_row is None:
            self.complete_at_row = complete_checkpoints(self.run_dir)
        writing = checkpoint_being_written(self.run_dir)
        # No write caught (one finished between two looks): kill at once after it.
        passed = complete_checkpoints(self.run_dir) - self.complete_at_row
        if writing is None and not passed:
            return False
        os.killpg(driver.pid, signal.SIGKILL)
        where = (f"during the write of {writing.name}" if writing is not None
                 else f"after {sorted(passed)[-1]} was written (no write caught)")
        self.log.driver_kill = (f"at metrics row {rows_logged(self.run_dir)}, {where}, "
                                f"t={time.monotonic() - self.start:.0f}s")
        print(f"soak: killed the driver {where}", flush=True)
        return True

    def recovering(self, alive: dict[str, int]) -> bool:
        """The last fault is not repaired yet: an actor not back in Ray, or a death the
        driver reported ("died") and has not answered yet ("is back" or "sending it
        again")."""
        lines = count_lines(self.driver_log)
        answered = lines["restarts handled"] + lines["calls re-sent on a dead connection"]
        return len(alive) < self.actors or lines["deaths seen"] > answered

    def kill_actor(self) -> bool:
        """Kills one live victim at random (without `overlap`: once the last one is back);
        False when nothing was killed."""
        try:
            alive = victims(self.dashboard)
        except Exception as exc:  # the state API between two drivers: try at the next tick
            print(f"soak: no actor list ({str(exc).splitlines()[0][:120]})", flush=True)
            return False
        if not alive or (not self.overlap and self.recovering(alive)):
            return False
        name = self.rng.choice(sorted(alive))
        try:
            os.kill(alive[name], signal.SIGKILL)
        except ProcessLookupError:  # it died on its own meanwhile
            return False
        self.log.actor_kills.append(
            f"{name} pid {alive[name]} t={time.monotonic() - self.start:.0f}s")
        print(f"soak: killed {name} (pid {alive[name]})", flush=True)
        return True


def count_lines(log: Path) -> dict[str, int]:
    text = log.read_text() if log.exists() else ""
    return {what: text.count(marker) for what, marker in DRIVER_LINES.items()}


def bench_soak(path: str | None, overrides: list[str], iterations: int, kill_every: float,
               faults: bool, overlap: bool, out: str, command: str) -> dict:
    """Runs the soak (or with `faults` False the undisturbed job) into out/run; prints and
    writes out/soak.md and out/soak.json; returns what soak.json holds."""
    config = path or DEFAULT_CONFIG
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = RunDir(out_dir / "run")
    args = [config, *SOAK_RUN, f"iterations={iterations}", *overrides, f"run_dir={run_dir}"]
    cfg = load_train_config(config, args[1:])  # checked before anything starts
    log = out_dir / "driver.log"
    log.unlink(missing_ok=True)
    os.environ.update(AUTH_ENV)  # the drivers join the head; the state API asks it
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lf-soak-", dir="/tmp") as tmp, \
            local_head(Path(tmp)) as head:
        injector = Injector(run_dir, head.dashboard, log,
                            rollout_workers(cfg) + cfg.reward.num_actors,
                            kill_every if faults else 0, iterations // 2 if faults else None,
                            overlap, cfg.seed)
        joined = [f"ray.address={head.address}"]
        driver = start_driver([*args, *joined], log)
        try:
            killed = injector.watch(driver)
            injector.log.driver_exits.append(driver.returncode)
            if killed:
                injector.log.half_written_at_kill = half_written_checkpoints(run_dir)
                driver = start_driver(["--resume", str(run_dir), *joined], log)
                injector.watch(driver)
                injector.log.driver_exits.append(driver.returncode)
        finally:  # interrupted: no driver left behind (its own process group)
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    return soak_report(cfg, run_dir, injector.log, log, time.monotonic() - start, faults,
                       command, out_dir)


def soak_report(cfg, run_dir: RunDir, soak: SoakLog, log: Path, seconds: float, faults: bool,
                command: str, out_dir: Path) -> dict:
    """The checks and counts of a finished soak, printed and written."""
    from ...common.tiny_model import load_tokenizer

    # the Trainer's "resuming RUN from CHECKPOINT: ..." (after a progress bar's \r, maybe)
    resumed = re.findall(r"resuming \S+ from (\S+):", log.read_text())
    soak.resumed_from = resumed[-1] if resumed else None
    summary = run_dir.read_summary() if run_dir.summary.exists() else {}
    problems = {"driver exit": [] if soak.driver_exits[-1] == 0 else
                [f"the last driver exited {soak.driver_exits[-1]}: see {log}"]}
    if summary:
        tokenizer = load_tokenizer(summary["model_path"])
        problems |= {
            "every prompt trained on exactly once": prompts_not_once(run_dir, cfg, tokenizer),
            "adapter versions continuous": versions_not_continuous(run_dir, cfg.iterations),
            "no checkpoint half written": half_written_checkpoints(run_dir),
        }
    result = {
        "faults": faults, "iterations": cfg.iterations, "wall_seconds": seconds,
        "actor_kills": len(soak.actor_kills), "driver_kills": int(soak.driver_kill is not None),
        "resumes": len(resumed), **count_lines(log),
        "final_eval_reward": summary.get("final_eval_reward"),
        "final_eval_greedy": summary.get("final_eval_greedy"),
        "initial_eval_greedy": summary.get("initial_eval_greedy"),
        "problems": problems, "log": asdict(soak),
    }
    (out_dir / "soak.json").write_text(json.dumps(result, indent=2))
    counts = [[k.replace("_", " "), str(result[k])] for k in (
        "actor_kills", "driver_kills", "resumes", *DRIVER_LINES)]
    checks = [[check, "ok" if not found else f"FAILED: {'; '.join(found[:5])}"]
              for check, found in problems.items()]
    figures = [[k.replace("_", " "), "—" if result[k] is None else f"{result[k]:.3f}"]
               for k in ("initial_eval_greedy", "final_eval_greedy", "final_eval_reward")]
    title = (f"soak {'with faults' if faults else 'undisturbed (--no-faults)'}: "
             f"{cfg.iterations} iterations, rollout.mode={cfg.rollout.mode}, "
             f"{seconds / 60:.1f} min; driver killed {soak.driver_kill or 'never'}; "
             + (f"resumed from {soak.resumed_from}" if soak.resumed_from else "no resume"))
    table = markdown_table(["what", "value"], [*counts, *checks, *figures])
    publish(report(command, title, table), out_dir / "soak.md", ("soak.json", "driver.log"))
    return result
