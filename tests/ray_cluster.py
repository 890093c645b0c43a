"""A real multi-node Ray cluster on 127.0.0.1 for tests, inside a private network namespace.

Ray's processes listen on every interface whatever address they are given (gcs_server, raylet and the
workers on ``::``, agents on ``0.0.0.0``). As root, :func:`private_network` moves this process's thread
(and so every process and thread it starts afterwards) into a fresh network namespace holding only a
loopback device, so nothing the cluster opens is reachable from outside; :func:`only_loopback` proves it.
Elsewhere the Ray tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_CLONE_NEWNET = 0x40000000
_isolated = False


def private_network() -> None:
    """Enter a private network namespace (lo up), once per process; skip the test where that is impossible."""
    global _isolated
    if _isolated:
        return
    if os.geteuid() != 0:
        pytest.skip("the Ray tests run in a private network namespace, which needs root (unshare -n)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        pytest.skip(f"cannot enter a private network namespace: {os.strerror(ctypes.get_errno())}")
    _loopback_up()
    _isolated = True
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # as kiln starts its own clusters (read at `import ray`)
    os.environ.setdefault("RAY_AUTH_TOKEN", os.urandom(32).hex())


def _loopback_up() -> None:
    """``ip link set lo up``, without needing iproute2: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP."""
    request = struct.pack("16sH", b"lo", 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, request)[:18])[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 0x1))


def only_loopback() -> list[str]:
    """The network devices this thread (and what it starts) can reach: in the private namespace, ``['lo']``."""
    lines = Path("/proc/thread-self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":")[0].strip() for line in lines)


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[Any]:
    """A head and ``nodes - 1`` more nodes on 127.0.0.1 (``ray.cluster_utils.Cluster``), joined by this
    process as driver; always shut down."""
    private_network()
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False, "node_ip_address": "127.0.0.1"},
    )
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
