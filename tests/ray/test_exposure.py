"""What a run exposes on the network: the local cluster `lorafleet train` starts (no
`ray.address`) listens on loopback only, and is a cluster of its own, never one Ray finds
already running on the machine."""

from __future__ import annotations

import subprocess
import sys

# Run in a process of its own: this one holds the session's cluster. It prints every listening
# address of the driver and the processes the cluster started, and the nodes it sees.
LISTENERS = """
import psutil, ray
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.fleet import connect_ray
assert connect_ray(load_train_config(None, ["ray.num_cpus=1"]))
ray.get(ray.remote(lambda: 0).remote())  # a worker process up too
for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    for conn in proc.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN:
            print("listen", proc.name(), conn.laddr.ip, conn.laddr.port)
print("nodes", len(ray.nodes()))
ray.shutdown()
"""
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def test_a_local_run_listens_on_loopback_only(ray_cluster):
    # The session cluster runs in this process: a new run must start its own beside it.
    out = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    listening = [line.split()[1:] for line in out.stdout.splitlines()
                 if line.startswith("listen")]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the cluster's daemons were seen
    exposed = [entry for entry in listening if entry[1] not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert "nodes 1" in out.stdout
