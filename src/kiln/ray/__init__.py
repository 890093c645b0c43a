"""kiln on Ray: the only package that imports Ray (``kiln[ray]``).

``serve.py`` runs a repository's models as Ray Serve deployments behind kiln's own Open Inference Protocol
front end; ``data.py`` runs ``kiln predict`` on Ray Data. Both reach the cluster through :func:`connect`.

A cluster kiln starts itself binds 127.0.0.1 and has Ray's token authentication on (``RAY_AUTH_MODE=token``
with a fresh random token, unless the environment already names one). A cluster someone else started is
joined as it is: its security is its owner's (see the README, "Past one machine").
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from typing import Any

from kiln.errors import MissingExtraError

log = logging.getLogger("kiln.ray")

LOOPBACK = "127.0.0.1"


def require_ray(feature: str) -> Any:
    """The ``ray`` module, or one clear error naming the extra that installs it."""
    try:
        import ray
        import ray.serve  # serve and data come with kiln[ray]: check both are there
    except ImportError:
        raise MissingExtraError("ray", "ray[serve,data]", feature) from None
    return ray


def token_auth_environment() -> None:
    """Token authentication for a cluster kiln starts: ``RAY_AUTH_MODE=token`` and a fresh random token
    unless the environment names one. Set before Ray is imported; the cluster's processes inherit it."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token" and not (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # never logged


def connect(address: str | None, feature: str, num_cpus: int | None = None) -> Any:
    """Join the Ray cluster at ``address`` ("auto": the one this machine runs), or start a private local one
    on 127.0.0.1 with token authentication when ``address`` is None. Returns the ``ray`` module."""
    if address is None and "ray" not in sys.modules:
        token_auth_environment()  # Ray reads it once, at import
    ray = require_ray(feature)
    if ray.is_initialized():
        return ray
    if address is None:
        ray.init(
            address="local",  # a new cluster, never one that happens to run on this machine
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            num_cpus=num_cpus,
            log_to_driver=False,
            configure_logging=False,
        )
        log.info("started a local Ray cluster on %s (token authentication on)", LOOPBACK)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        log.info("joined the Ray cluster at %s", address)
    return ray


def disconnect() -> None:
    """Leave the cluster; a private one kiln started stops with it (Ray's processes exit)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


__all__ = ["LOOPBACK", "connect", "disconnect", "require_ray", "token_auth_environment"]
