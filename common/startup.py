"""Where a start-up goes, phase by phase: the driver's (summary.json's `startup_phases`) and
each actor's (`actor_startup`), so a slow start names its phase instead of showing one
number."""

from __future__ import annotations

import time


class StartupClock:
    """Phases timed one after another, each named by `lap`. The first clock of a process
    counts the interpreter and the imports before it (from the process's own start); a later
    one in the same process (a bench over seeds, the tests) starts at its own clock. An
    actor's starts at its construction (`from_process_start` False): Ray may have started its
    process long before."""

    process_start_counted = False

    def __init__(self, from_process_start: bool = True) -> None:
        import psutil

        self.started = self.last = time.time()
        self.phases: dict[str, float] = {}
        if from_process_start and not StartupClock.process_start_counted:
            StartupClock.process_start_counted = True
            self.phases["python and imports"] = self.last - psutil.Process().create_time()

    def lap(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = now - self.last
        self.last = now

    def line(self) -> str:
        return f"start-up {sum(self.phases.values()):.1f} s: {phases_text(self.phases)}"


def phases_text(phases: dict[str, float]) -> str:
    """`phase seconds, ...` as the start-up line and the benches print phases."""
    return ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in phases.items())


class TimedStart:
    """For an actor class: its construction timed by phase (`clock(self).lap(...)` in each
    `__init__` of the class and its bases), reported by `startup_phases`."""

    def startup_phases(self) -> tuple[float, dict[str, float]]:
        """When construction began (wall time) and its phases in seconds."""
        startup = clock(self)
        return startup.started, dict(startup.phases)


def fresh_clock(actor: object) -> StartupClock:
    """A new start-up clock for the actor, from now: its work for the next job (a warm
    fleet's actor attached to it) timed apart from its construction."""
    actor._startup_clock = StartupClock(from_process_start=False)
    return actor._startup_clock


def clock(actor: object) -> StartupClock:
    """The actor's start-up clock, made by the first `__init__` that asks (a colocated actor
    runs two); its `started` is that moment."""
    if "_startup_clock" not in vars(actor):
        actor._startup_clock = StartupClock(from_process_start=False)
    return actor._startup_clock
