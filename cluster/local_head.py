"""A Ray head node of its own on 127.0.0.1, started as `ray start --head` is on a cluster: its
own free ports and temp directory (other Ray clusters may run on the machine, and its
address file stays in that directory, so no other `ray.init()` joins it by mistake). A run
joins it with ray.address; processes outside the run (a fault injector, a test) join it too.
It is stopped by killing its process group, never with `ray stop` (which stops every Ray
cluster on the machine)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
PORTS = ("gcs", "dashboard", "metrics", "agent", "agent-grpc", "client", "runtime-env")
START_TIMEOUT_S = 120
# Ray's token authentication: the head generates ~/.ray/auth_token; its clients (a driver, a
# process that joins to watch) need the same variable to send it.
AUTH_ENV = {"RAY_AUTH_MODE": "token"}
# A worker Ray is asked to kill that cannot exit (stopped, stuck in C code) is SIGKILLed by its
# raylet after this long instead of Ray's 5 s: the run waits for its replacement. Read by every
# Ray process of a cluster started with it in its environment.
KILL_GRACE_ENV = {"RAY_kill_worker_timeout_milliseconds": "1000"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Head:
    ports: dict[str, int]

    @property
    def address(self) -> str:
        """What ray.address (ray.init) takes."""
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"


def start_head(temp_dir: Path, num_cpus: int = 2, env: dict[str, str] | None = None,
               log: Path | None = None) -> tuple[subprocess.Popen, Head]:
    """`ray start --head --block` in a session of its own (so killing its process group stops
    every process of the cluster), up once its dashboard answers; `env`: its environment
    (default: this process's), which its workers inherit, with AUTH_ENV; `log`: where its
    output goes (default: nowhere)."""
    ports = {name: free_port() for name in PORTS}
    output = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={ports['dashboard']}", f"--metrics-export-port={ports['metrics']}",
         f"--dashboard-agent-listen-port={ports['agent']}",
         f"--dashboard-agent-grpc-port={ports['agent-grpc']}",
         f"--ray-client-server-port={ports['client']}",
         f"--runtime-env-agent-port={ports['runtime-env']}",
         f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env={**(os.environ if env is None else env), **AUTH_ENV, **KILL_GRACE_ENV}, stdout=output,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    if log is not None:
        output.close()  # the child holds its own copy
    head = Head(ports)
    try:
        wait_up(process, head)
    except BaseException:
        stop_head(process.pid)
        process.wait()
        raise
    return process, head


def wait_up(process: subprocess.Popen, head: Head) -> None:
    deadline = time.time() + START_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (401 with Ray's token auth): it is up
            return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(
                    f"`ray start --head` exited ({process.returncode})") from None
            if time.time() > deadline:
                raise RuntimeError(f"the Ray head's dashboard did not answer within "
                                   f"{START_TIMEOUT_S} s") from None
            time.sleep(1)


def stop_head(pid: int) -> None:
    """Every process of the head started as `pid` (its process group), killed."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def local_head(temp_dir: Path, num_cpus: int = 2, env: dict[str, str] | None = None
               ) -> Iterator[Head]:
    """The head (`start_head`), up until the block ends."""
    process, head = start_head(temp_dir, num_cpus, env)
    try:
        yield head
    finally:
        stop_head(process.pid)
        process.wait()
