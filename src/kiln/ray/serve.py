"""A repository's models as Ray Serve deployments, behind kiln's own Open Inference Protocol front end.

``kiln serve REPO --ray`` runs kiln's server (HTTP and gRPC, the same handlers, metrics, admission and
dynamic batcher as ``kiln serve``) as the ingress; each served model version is one Ray Serve application
whose replicas hold kiln's engine path: the chosen variant, the fp32 reference to fall back on, warm-up at
start (a replica takes traffic only once warm). Ray Serve places the replicas on the cluster's nodes,
replaces a dead one and scales them between ``serving.ray.min_replicas`` and ``max_replicas`` on the
batches in flight.

Why the ingress batches before the hop, not the replica: one Ray Serve handle call costs ~3-4 ms of
round trip and serialisation on a small machine, and it is what caps a plain Ray Serve deployment (one
call per request, through Ray's Python HTTP proxy). kiln sends one call per *batch*, from its own server,
and turns Ray's proxy off (``proxy_location: Disabled``): nothing of Ray's listens for clients.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from kiln.execution.batcher import Outputs
from kiln.execution.errors import InstanceExitedError
from kiln.execution.gil import favour_engine_threads
from kiln.execution.instances import FallbackState, Instances, ModelRunner, open_instances, warm_up
from kiln.ray.pace import Pace as _Pace
from kiln.repository import CHOSEN, REFERENCE, Repository, Variant, policy_versions
from kiln.spec import ModelSpec, RayServing

log = logging.getLogger("kiln.ray")

REPLICA_DEPLOYMENT = "replica"
_IN_FLIGHT_PER_REPLICA = 2  # one batch running, the next already on the replica: no idle gap between batches


def app_name(model: str, version: int) -> str:
    """The Ray Serve application of one model version (names are kiln's strict grammar, safe here)."""
    return f"kiln-{model}-v{version}"


class KilnReplica:
    """One replica: kiln's engine path for one model version, loaded from the repository on its node."""

    def __init__(self, repo: str, model: str, version: int, threads: int | None = None) -> None:
        favour_engine_threads()  # the replica's process: Ray's event loop beside the engine's thread
        repository = Repository(Path(repo))
        served = repository.variant(model, version, CHOSEN)
        reference = repository.variant(model, version, REFERENCE)
        threads = threads or max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        self.instances: Instances = open_instances(served, reference, threads)
        self.runner = self.instances.runners[0]
        self.warm: dict[int, float] = {}
        if served.spec.serving.warmup:
            self.warm = warm_up([self.runner], served.spec)
        self.node_id = ray.get_runtime_context().get_node_id()
        log.info("replica of %s:%s ready on node %s (%s)", model, version, self.node_id, self.instances.engine)

        self.pace = _Pace(self.warm.get(1))

    async def run(self, inputs: dict[str, np.ndarray]) -> Outputs:
        return await self.pace.run(self.runner, inputs)

    def describe(self) -> dict[str, Any]:
        i = self.instances
        return {
            "variant": i.variant,
            "engine": i.engine,
            "reference_engine": i.reference_engine,
            "warm": self.warm,
            "node_id": self.node_id,
            "pid": os.getpid(),
        }

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


class KilnSharedReplica:
    """A replica shared by many small models (Ray Serve model multiplexing): it loads the model version a
    request names (``multiplexed_model_id`` ``"model:version"``) on first use and keeps the
    ``max_models`` most recently used, closing the one it evicts."""

    def __init__(self, repo: str, max_models: int, threads: int | None = None) -> None:
        favour_engine_threads()
        self.repository = Repository(Path(repo))
        self.threads = threads or max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        self.node_id = ray.get_runtime_context().get_node_id()
        self.loaded: set[str] = set()

        async def load(model_id: str) -> _Loaded:
            import asyncio

            return await asyncio.to_thread(self._load, model_id)

        self.model = serve.multiplexed(max_num_models_per_replica=max_models)(load)

    def _load(self, model_id: str) -> _Loaded:
        model, _, version = model_id.rpartition(":")
        served = self.repository.variant(model, int(version), CHOSEN)
        reference = self.repository.variant(model, int(version), REFERENCE)
        instances = open_instances(served, reference, self.threads)
        warm = warm_up(instances.runners[:1], served.spec) if served.spec.serving.warmup else {}
        return _Loaded(model_id, instances, self.loaded, _Pace(warm.get(1)))

    async def run(self, inputs: dict[str, np.ndarray]) -> Outputs:
        loaded = await self.model(serve.get_multiplexed_model_id())
        return await loaded.pace.run(loaded.runner, inputs)

    async def describe(self) -> dict[str, Any]:
        loaded = await self.model(serve.get_multiplexed_model_id())
        i = loaded.instances
        return {"variant": i.variant, "engine": i.engine, "reference_engine": i.reference_engine,
                "node_id": self.node_id, "pid": os.getpid(), "models": sorted(self.loaded)}  # fmt: skip


class _Loaded:
    """One model version in a shared replica; closed when Ray Serve evicts it."""

    def __init__(self, model_id: str, instances: Instances, registry: set[str], pace: _Pace) -> None:
        self.model_id = model_id
        self.instances = instances
        self.runner = instances.runners[0]
        self.pace = pace
        self._registry = registry
        registry.add(model_id)

    def __del__(self) -> None:
        self._registry.discard(self.model_id)
        for r in self.instances.runners:
            r.close()


SHARED_APP = "kiln-shared"
_shared_users: set[str] = set()  # the multiplexed model versions this server serves through SHARED_APP


def shared_app(repo: str | Path, max_models: int, settings: RayServing) -> Any:
    """The Ray Serve application of the replicas every multiplexed model shares."""
    deployment = serve.deployment(KilnSharedReplica).options(**deployment_options(settings))
    return deployment.bind(str(Path(repo).resolve()), max_models, settings.engine_threads)


def deployment_options(r: RayServing) -> dict[str, Any]:
    """Ray Serve options of a model's replicas, from its ``serving.ray``."""
    autoscaling: dict[str, Any] = {
        "min_replicas": r.min_replicas,
        "max_replicas": r.max_replicas,
        "target_ongoing_requests": r.target_ongoing_requests,
        "upscale_delay_s": r.upscale_delay_s,
        "downscale_delay_s": r.downscale_delay_s,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2.0,
    }
    if r.initial_replicas is not None:
        autoscaling["initial_replicas"] = r.initial_replicas
    # The replica's code on its main event loop (``run`` is async; :class:`_Pace` decides whether a batch runs
    # on that loop or in a thread): measured 1.65x the handle calls per second of the default here.
    actor: dict[str, Any] = {
        "num_cpus": r.num_cpus,
        "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},
    }
    if r.num_gpus:
        actor["num_gpus"] = r.num_gpus
    options: dict[str, Any] = {
        "name": REPLICA_DEPLOYMENT,
        "max_ongoing_requests": _IN_FLIGHT_PER_REPLICA,
        "autoscaling_config": autoscaling,
        "ray_actor_options": actor,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
        "graceful_shutdown_timeout_s": 5.0,
        "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
    }
    if r.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = r.max_replicas_per_node
    return options


def replica_app(repo: str | Path, model: str, version: int, spec: ModelSpec) -> Any:
    """The Ray Serve application of one model version."""
    r = spec.serving.ray
    deployment = serve.deployment(KilnReplica).options(**deployment_options(spec.serving.ray))
    return deployment.bind(str(Path(repo).resolve()), model, version, r.engine_threads)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for a Ray Serve config file (``import_path: kiln.ray.serve:build_app``)."""
    repo, model, version = str(args["repo"]), str(args["model"]), int(args["version"])
    return replica_app(repo, model, version, Repository(Path(repo)).spec(model))


class RayReplicas:
    """An instance for kiln's batcher that runs each batch on one of the model version's Ray replicas."""

    def __init__(self, handle: Any, model: str, version: int, owned: bool) -> None:
        self.handle = handle
        self.model = model
        self.version = version
        self.owned = owned  # deployed by this server (deleted when it unloads) or found running (left)
        self._closed = False
        self._run = _over_grpc(handle).run
        self._loop_run: tuple[Any, Any] | None = None  # (loop, method) of a handle routing on that loop

    def run(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        with self._replica_lost():
            out: Outputs = self._run.remote(dict(inputs)).result()
        return out

    async def run_async(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        """:meth:`run` awaited on the server's event loop (a lone request: no hand-off to a batcher thread)."""
        with self._replica_lost():
            out: Outputs = await self._on_this_loop().remote(dict(inputs))
        return out

    def _on_this_loop(self) -> Any:
        """The ``run`` method of a handle whose router runs on the calling event loop: an awaited call then
        hops no thread on this side (Serve's default router runs on a loop thread of its own, which a call
        from a batcher thread needs). Measured here: 0.84 against 1.10 ms a round trip. A Ray version
        without the option keeps the default handle."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._loop_run is None or self._loop_run[0] is not loop:
            method = self._run
            try:
                # a handle of its own: serve.get_app_handle returns a cached one, already routing elsewhere
                fresh = DeploymentHandle(REPLICA_DEPLOYMENT, self._app())
                fresh._init(_run_router_in_separate_loop=False)
                method = _over_grpc(self._for_model(fresh)).run
            except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
                log.warning(
                    "Ray Serve handles cannot route on the server's event loop here (%s): a lone request's "
                    "hop to %s:%s uses the default handle (about 0.3 ms slower)", exc, self.model, self.version,
                )  # fmt: skip
            self._loop_run = (loop, method)
        return self._loop_run[1]

    def _app(self) -> str:
        return app_name(self.model, self.version)

    def _for_model(self, handle: Any) -> Any:
        return handle

    @contextlib.contextmanager
    def _replica_lost(self) -> Iterator[None]:
        """The replica died with the batch (killed, out of memory, its node gone): Ray Serve replaces it."""
        try:
            yield
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            raise InstanceExitedError(f"{self.model}:{self.version}", None) from None

    def close(self) -> None:
        """Called by each runner sharing it; the first call removes the application this server deployed."""
        if self._closed:
            return
        self._closed = True
        if self.owned:
            try:
                serve.delete(app_name(self.model, self.version), _blocking=False)
            except Exception as exc:  # the cluster is gone already: nothing left to remove
                log.warning("could not delete the Ray Serve application of %s:%s: %s", self.model, self.version, exc)


def _over_grpc(handle: Any) -> Any:
    """``handle`` sending each batch straight to the replica's gRPC server, pickled, instead of through
    Ray's object store: the handle round trip falls from about 2.4 to 1.4 ms here (ray 2.60,
    ``benchmarks/ray_overhead.py``). Every replica runs that server whatever the handle uses, so nothing new
    listens. Ray versions without the option keep the object-store path."""
    try:
        return handle.options(_by_reference=False, request_serialization="pickle", response_serialization="pickle")
    except (TypeError, ValueError):
        return handle


def open_ray_instances(
    served: Variant,
    reference: Variant,
    on_fallback: Callable[[], None] | None = None,
    memory_budget: int | None = None,
    timeout_s: float = 600.0,
) -> Instances:
    """Deploy (or find already deployed, e.g. by ``serve deploy``) the Ray Serve application of ``served``'s
    model version and return kiln instances that run batches on its replicas; closing them removes the
    application when this server deployed it. The replicas fall back themselves (``reference`` is what they
    fall back on)."""
    spec, model, version = served.spec, served.model, served.version
    if spec.serving.ray.multiplex:
        return _open_shared(served, on_fallback, memory_budget, timeout_s)
    name = app_name(model, version)
    status = serve.status().applications.get(name)
    owned = status is None or str(status.status) not in ("RUNNING", "ApplicationStatus.RUNNING")
    if owned:
        root = served.version_dir.parent.parent
        log.info("deploying %s:%s on Ray Serve (%s)", model, version, name)
        handle = serve.run(replica_app(root, model, version, spec), name=name, route_prefix=None, blocking=False)
        _wait_running(name, timeout_s)
    else:
        handle = serve.get_app_handle(name)
    described = handle.describe.remote().result(timeout_s=timeout_s)
    r = spec.serving.ray
    replicas = RayReplicas(handle, model, version, owned)
    return _instances(replicas, described, spec, r.max_replicas, on_fallback)


def _instances(
    replicas: RayReplicas, described: dict[str, Any], spec: ModelSpec, max_replicas: int,
    on_fallback: Callable[[], None] | None,
) -> Instances:  # fmt: skip
    state = FallbackState(spec.serving.fallback_after)
    label = f"{replicas.model}:{replicas.version}"
    runners = [
        ModelRunner(replicas, None, state, label, on_fallback) for _ in range(max_replicas * _IN_FLIGHT_PER_REPLICA)
    ]
    return Instances(runners, described["variant"], described["engine"], described["reference_engine"], 0, state)


def _open_shared(
    served: Variant, on_fallback: Callable[[], None] | None, memory_budget: int | None, timeout_s: float
) -> Instances:
    """A multiplexed model version: served by the shared replicas (deployed by the first one), each holding
    as many model versions as kiln's memory budget allows (8 without one)."""
    model, version = served.model, served.version
    status = serve.status().applications.get(SHARED_APP)
    if status is None or not str(status.status).endswith("RUNNING"):
        per_model = max(1, served.artifact_bytes())
        max_models = max(1, memory_budget // per_model) if memory_budget else 8
        root = served.version_dir.parent.parent
        log.info("deploying the shared replicas (%s, up to %d models each)", SHARED_APP, max_models)
        serve.run(shared_app(root, max_models, served.spec.serving.ray), name=SHARED_APP, route_prefix=None,
                  blocking=False)  # fmt: skip
        _wait_running(SHARED_APP, timeout_s)
    model_id = f"{model}:{version}"
    handle = serve.get_app_handle(SHARED_APP).options(multiplexed_model_id=model_id)
    described = handle.describe.remote().result(timeout_s=timeout_s)
    _shared_users.add(model_id)
    replicas = _SharedReplicas(handle, model, version)
    return _instances(replicas, described, served.spec, served.spec.serving.ray.max_replicas, on_fallback)


class _SharedReplicas(RayReplicas):
    """Runs batches on the shared replicas; the last multiplexed model version to close removes them."""

    def __init__(self, handle: Any, model: str, version: int) -> None:
        super().__init__(handle, model, version, owned=False)

    def _app(self) -> str:
        return SHARED_APP

    def _for_model(self, handle: Any) -> Any:
        return handle.options(multiplexed_model_id=f"{self.model}:{self.version}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _shared_users.discard(f"{self.model}:{self.version}")
        if not _shared_users:
            try:
                serve.delete(SHARED_APP, _blocking=False)
            except Exception as exc:
                log.warning("could not delete the shared Ray Serve replicas: %s", exc)


def _wait_running(name: str, timeout_s: float) -> None:
    import time

    from kiln.errors import WarmupFailedError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        state = str(app.status) if app is not None else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
            raise WarmupFailedError(name, 0, (app.message if app is not None else "") or state)
        time.sleep(0.2)
    raise WarmupFailedError(name, 0, f"its Ray Serve replicas were not running after {timeout_s:.0f} s")


def start_serve() -> None:
    """Ray Serve with its HTTP and gRPC proxies off: clients reach kiln's own server only."""
    serve.start(proxy_location="Disabled")


def emit_config(repository: Repository, models: list[str], path: Path) -> None:
    """A Ray Serve config file (``serve deploy path``) holding the replicas of every served model version;
    ``kiln serve REPO --ray --ray-address ADDRESS`` then finds them running and only adds its front end."""
    import yaml

    root = str(repository.root.resolve())
    applications: list[dict[str, Any]] = []
    for model in models:
        spec = repository.spec(model)
        for version in policy_versions(spec, repository.versions(model)):
            options = deployment_options(spec.serving.ray)
            deployment = {k: v for k, v in options.items() if k != "name"}
            applications.append(
                {
                    "name": app_name(model, version),
                    "route_prefix": None,
                    "import_path": "kiln.ray.serve:build_app",
                    "args": {"repo": root, "model": model, "version": version},
                    "deployments": [{"name": REPLICA_DEPLOYMENT, **deployment}],
                }
            )
    config = {"proxy_location": "Disabled", "applications": applications}
    from kiln.files import write_atomic

    write_atomic(path, yaml.safe_dump(config, sort_keys=False).encode())


__all__ = [
    "SHARED_APP",
    "KilnReplica",
    "KilnSharedReplica",
    "RayReplicas",
    "app_name",
    "build_app",
    "deployment_options",
    "emit_config",
    "open_ray_instances",
    "replica_app",
    "start_serve",
]
