"""The HTTP front end: the V2 / Open Inference Protocol REST API on Starlette, KServe V1 predict for raw
instances (``raw.py``), plus ``/metrics``.

``POST …/infer`` is a bare ASGI handler in front of Starlette (its middleware, router and
Request/Response objects cost about a fifth of the server's CPU per request, measured); everything
else goes through Starlette's routing, to the module-level handlers below, which find the
:class:`Service` on the app's state. No per-request validation layer: the spec validates tensors.
Request bodies may come gzip- or deflate-compressed (``Content-Encoding``, see ``encoding.py``); infer
responses are compressed when ``Accept-Encoding`` asks. What a handler raises is answered as
``error_map.py`` decides, for gRPC too: known errors 4xx/5xx with ``{"error": "..."}``; anything else is
logged with its traceback and answered 500 with a generic message.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln import logs
from kiln.errors import PayloadTooLargeError, ProtocolError
from kiln.repository import parse_version
from kiln.serving import metadata
from kiln.serving.body_budget import BodyBudget
from kiln.serving.encoding import MIN_COMPRESS_BYTES, Inflater, compress, request_coding, response_coding
from kiln.serving.error_map import error_answer
from kiln.serving.protocol import decode_http, encode_http, load_json, short_repr
from kiln.serving.raw import parse_instances
from kiln.serving.service import SHM_ENDPOINTS, Service, check_load_parameters
from kiln.serving.shared_memory import ShmSession

log = logging.getLogger("kiln.serving")
access = logging.getLogger("kiln.serving.access")

_EMPTY = Response(b"", 200)


def build_app(service: Service) -> ASGIApp:
    """The server's ASGI app: the infer hot path, then Starlette's routes (handlers reach ``service``
    through ``request.app.state``)."""
    rest = Starlette(routes=_routes(), exception_handlers={404: _not_found, 405: _not_allowed})
    rest.state.service = service
    rest.router.redirect_slashes = False  # 'm/' is no other spelling of 'm'
    infer = InferEndpoint(service)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _ENCODED_SEPARATOR.search(scope.get("raw_path") or b""):
            # uvicorn decodes %2F into '/' before routing: a name holding one would become other path segments
            await _ENCODED_SEPARATOR_ANSWER(scope, receive, send)
            return
        # The hot path skips Starlette's middleware, router and Request/Response objects: plain ASGI.
        if scope["type"] == "http":
            match = _INFER_PATH.match(scope["path"])
            if match is not None:
                if scope["method"] == "POST":
                    await infer(match.group("model"), match.group("version"), scope, receive, send)
                else:  # the path exists: 405 saying what it takes, not 404
                    message = f"{scope['method']} is not allowed on {scope['path']!r}; infer takes POST"
                    await JSONResponse({"error": message}, 405, headers={"allow": "POST"})(scope, receive, send)
                return
        await rest(scope, receive, send)

    return app


def error_response(service: Service, exc: BaseException) -> JSONResponse:
    answer = error_answer(exc, service.manager.repository)
    wait = answer.retry_after
    headers = {"retry-after": wait} if wait else None
    return JSONResponse({"error": answer.message}, status_code=answer.status, headers=headers)


Handler = Callable[[Request, Service], Awaitable[Response]]


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette route for ``handler(request, service)``: what it raises is answered by
    :func:`error_response`, the one mapping of errors to answers (``error_map.py``)."""

    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        service: Service = request.app.state.service
        try:
            return await handler(request, service)
        except Exception as exc:
            return error_response(service, exc)

    return route


async def read_body(request: Request, limit: int, budget: BodyBudget | None = None, held: Held | None = None) -> bytes:
    """The request body, decompressed, refusing (413) past ``limit`` bytes before reading more than that;
    with ``budget``, its bytes are held there (``held`` counts them for the caller to give back)."""
    return await collect_body(
        request.stream(), request.headers.get("content-length"), request.headers.get("content-encoding"), limit,
        budget, held,
    )  # fmt: skip


class Held:
    """Bytes one request holds in the server's :class:`BodyBudget`."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


async def collect_body(
    chunks: AsyncIterator[bytes], declared: str | bytes | None, encoding: str | bytes | None, limit: int,
    budget: BodyBudget | None = None, held: Held | None = None,
) -> bytes:  # fmt: skip
    """A body from its chunks, decompressed as it arrives, within ``limit`` (413 on the declared length before a
    byte is read); with ``budget``, held there from its declared length, or chunk by chunk without one."""
    coding = request_coding(encoding.decode("latin-1") if isinstance(encoding, bytes) else encoding)
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise PayloadTooLargeError(int(declared), limit)
        if budget is not None and held is not None:
            held.n += budget.take(int(declared))
    inflater = Inflater(coding, limit) if coding is not None else None
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        if not chunk:
            continue
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(size, limit)
        if budget is not None and held is not None and size > held.n:  # no declared length: held as it arrives
            held.n += budget.take(size - held.n)
        if inflater is not None:
            inflater.feed(chunk)
        else:
            parts.append(chunk)
    if inflater is None:
        return parts[0] if len(parts) == 1 else b"".join(parts)
    body = inflater.finish()
    if budget is not None and held is not None:
        held.n += budget.take(len(body))  # the decompressed copy is held too
    return body


async def _json_body(request: Request, service: Service) -> dict[str, Any]:
    """The body as a JSON object ({} when empty), within the server's body limit."""
    return _json_object(await read_body(request, service.settings.max_body_bytes))


# ---- health and metadata -------------------------------------------------------------------------------
@endpoint
async def live(request: Request, service: Service) -> Response:
    return _EMPTY if service.live else JSONResponse({"error": "not live"}, status_code=503)


@endpoint
async def ready(request: Request, service: Service) -> Response:
    if service.ready:
        return Response(b"", 200)
    return JSONResponse({"error": "the server is starting or shutting down"}, status_code=503)


@endpoint
async def server_metadata(request: Request, service: Service) -> Response:
    return JSONResponse(metadata.server_metadata())


@endpoint
async def model_metadata(request: Request, service: Service) -> Response:
    p = request.path_params
    return JSONResponse(service.model_metadata(p["model"], p.get("version")))


@endpoint
async def model_config(request: Request, service: Service) -> Response:
    p = request.path_params
    return JSONResponse(service.model_config(p["model"], p.get("version")))


@endpoint
async def model_ready(request: Request, service: Service) -> Response:
    p = request.path_params
    if service.model_ready(p["model"], p.get("version")):  # unknown model or version: 404
        return Response(b"", 200)
    return JSONResponse({"error": f"model {p['model']!r} is not ready"}, status_code=503)


@endpoint
async def statistics(request: Request, service: Service) -> Response:
    p = request.path_params
    return JSONResponse({"model_stats": service.statistics(p.get("model"), p.get("version"))})


@endpoint
async def metrics(request: Request, service: Service) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


# ---- model repository ----------------------------------------------------------------------------------
@endpoint
async def repository_index(request: Request, service: Service) -> Response:
    service.check_token(request.headers.get("authorization"))
    ready_only = (await _json_body(request, service)).get("ready", False)
    if not isinstance(ready_only, bool):
        raise ProtocolError("ready", f"must be true or false, got {short_repr(ready_only)}")
    return JSONResponse(service.manager.index(ready_only=ready_only))


@endpoint
async def repository_load(request: Request, service: Service) -> Response:
    service.check_token(request.headers.get("authorization"))
    params = (await _json_body(request, service)).get("parameters")
    check_load_parameters({} if params is None else params)
    await service.manager.load(request.path_params["model"])
    return Response(b"", 200)


@endpoint
async def repository_unload(request: Request, service: Service) -> Response:
    service.check_token(request.headers.get("authorization"))
    _unload_parameters((await _json_body(request, service)).get("parameters"))
    await service.manager.unload(request.path_params["model"])
    return Response(b"", 200)


# ---- system shared memory (shared_memory.py) -----------------------------------------------------------
@endpoint
async def shm_status(request: Request, service: Service) -> Response:
    service.check_token(request.headers.get("authorization"), SHM_ENDPOINTS)
    return JSONResponse(service.shared_memory.status(request.path_params.get("region")))


@endpoint
async def shm_register(request: Request, service: Service) -> Response:
    service.check_token(request.headers.get("authorization"), SHM_ENDPOINTS)
    doc = await _json_body(request, service)
    unknown = sorted(set(doc) - {"key", "offset", "byte_size"})
    if unknown or "key" not in doc or "byte_size" not in doc:
        raise ProtocolError(
            "body", f"must hold key and byte_size (offset: 0 when left out) and nothing else, got {sorted(doc)}"
        )
    region = request.path_params["region"]
    service.shared_memory.register(region, doc["key"], doc.get("offset", 0), doc["byte_size"])
    return Response(b"", 200)


@endpoint
async def shm_unregister(request: Request, service: Service) -> Response:
    service.check_token(request.headers.get("authorization"), SHM_ENDPOINTS)
    await read_body(request, service.settings.max_body_bytes)  # tritonclient sends an empty body; none is read
    service.shared_memory.unregister(request.path_params.get("region"))
    return Response(b"", 200)


@endpoint
async def cuda_shm_none(request: Request, service: Service) -> Response:
    """CUDA shared memory is not served: no regions to list, none to unregister (perf_analyzer's clean-up)."""
    return JSONResponse([]) if request.method == "GET" else Response(b"", 200)


# ---- KServe V1: raw instances through the model's processing (see raw.py) -----------------------------
@endpoint
async def v1_models(request: Request, service: Service) -> Response:
    return JSONResponse({"models": sorted({row["name"] for row in service.manager.index()})})


@endpoint
async def v1_model(request: Request, service: Service) -> Response:
    name = request.path_params["model"]
    ready = service.manager.is_ready(name)
    if not ready:
        service.manager.spec(name)  # unknown model: 404
    return JSONResponse({"name": name, "ready": ready})


@endpoint
async def v1_predict(request: Request, service: Service) -> Response:
    """Counted in the metrics like an infer, failures included: it answers its own errors."""
    start = time.perf_counter()
    name = request.path_params["model"]
    logs.request_id.set(request.headers.get("x-request-id") or logs.new_request_id())
    version, status = "", 200
    in_flight = service.metrics.in_flight.labels("http")
    in_flight.inc()
    held = Held()
    try:
        sv = await service.resolve(name, None)
        version = str(sv.version)
        body = await read_body(request, service.settings.max_body_bytes, service.body_budget, held)
        instances = parse_instances(load_json(body))
        predictions, _ = await service.predict(sv, instances)
        payload = json.dumps({"predictions": predictions}, separators=(",", ":")).encode()
        response: Response = Response(payload, media_type="application/json")
    except Exception as exc:
        response = error_response(service, exc)
        status = response.status_code
    finally:
        in_flight.dec()
        service.body_budget.give(held.n)
    elapsed = time.perf_counter() - start
    service.record(service.model_label(name) if status >= 400 else name, version, "http", status, elapsed)
    return response


def _routes() -> list[Route]:
    m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    return [
        Route("/v2/models/stats", statistics, methods=["GET"]),  # before /v2/models/{model}
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route(m, model_metadata, methods=["GET"]),
        Route(mv, model_metadata, methods=["GET"]),
        Route(f"{m}/ready", model_ready, methods=["GET"]),
        Route(f"{mv}/ready", model_ready, methods=["GET"]),
        Route(f"{m}/config", model_config, methods=["GET"]),
        Route(f"{mv}/config", model_config, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
        Route(f"{m}/stats", statistics, methods=["GET"]),
        Route("/v2/cudasharedmemory/status", cuda_shm_none, methods=["GET"]),
        Route("/v2/cudasharedmemory/unregister", cuda_shm_none, methods=["POST"]),
        Route("/v2/systemsharedmemory/status", shm_status, methods=["GET"]),
        Route("/v2/systemsharedmemory/region/{region}/status", shm_status, methods=["GET"]),
        Route("/v2/systemsharedmemory/region/{region}/register", shm_register, methods=["POST"]),
        Route("/v2/systemsharedmemory/unregister", shm_unregister, methods=["POST"]),
        Route("/v2/systemsharedmemory/region/{region}/unregister", shm_unregister, methods=["POST"]),
        Route(f"{mv}/stats", statistics, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", v1_models, methods=["GET"]),
        Route("/v1/models/{model}:predict", v1_predict, methods=["POST"]),
        Route("/v1/models/{model}", v1_model, methods=["GET"]),
    ]


_ENCODED_SEPARATOR = re.compile(rb"%(2f|5c|00)", re.IGNORECASE)  # '/', '\\' and NUL, percent-encoded
_ENCODED_SEPARATOR_ANSWER = JSONResponse(
    {"error": "path: a percent-encoded '/', '\\' or NUL is not allowed; model names and versions hold none"},
    status_code=400,
)
_INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


class InferEndpoint:
    """``POST /v2/models/{m}[/versions/{v}]/infer`` as a bare ASGI handler."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.limit = service.settings.max_body_bytes
        self.access_log = service.settings.access_log
        self.in_flight = service.metrics.in_flight.labels("http")

    async def __call__(self, model: str, version_text: str | None, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        service = self.service
        headers = {k: v for k, v in scope["headers"] if k in _WANTED}
        rid = headers[b"x-request-id"].decode("latin-1") if b"x-request-id" in headers else logs.new_request_id()
        logs.request_id.set(rid)
        version = ""
        status = 200
        shm: ShmSession | None = None
        body: bytes | None = None
        held = Held()
        self.in_flight.inc()
        try:
            sv = await service.resolve(model, version_text)
            version = str(sv.version)
            body = await self._body(headers, receive, held)
            hlen = headers.get(b"inference-header-content-length")
            if hlen is not None and not (hlen.isdigit() and len(hlen) <= 18):  # no body is 10**18 bytes long
                raise ProtocolError(
                    "Inference-Header-Content-Length",
                    f"must be a byte count within the body ({len(body)} bytes), got {short_repr(hlen.decode('latin-1'))}",
                )
            raw = sv.processing
            shm = service.shared_memory.session()  # None while no region is registered
            req = decode_http(body, int(hlen) if hlen is not None else None, raw.wire_spec, raw.keep_bytes, shm)
            req.version = parse_version(version_text)
            outputs = await service.infer_v2(sv, req, disconnected=receive)  # http.disconnect: dropped if queued
            parts, header_len = encode_http(model, sv.version, req, outputs)
            out_headers = [(b"x-request-id", rid.encode("latin-1"))]
            if header_len is None:
                payload = parts[0]
                out_headers.append((b"content-type", b"application/json"))
            else:
                payload = b"".join(parts)
                out_headers.append((b"content-type", b"application/octet-stream"))
                out_headers.append((b"inference-header-content-length", str(header_len).encode()))
            accept = headers.get(b"accept-encoding")
            coding = response_coding(accept.decode("latin-1")) if accept is not None else None
            if coding is not None and len(payload) >= MIN_COMPRESS_BYTES:  # the header length stays uncompressed
                payload = compress(payload, coding)
                out_headers.append((b"content-encoding", coding.encode()))
        except Exception as exc:
            answer = error_answer(exc, service.manager.repository)
            status = answer.status
            payload = json.dumps({"error": answer.message}).encode()
            out_headers = [(b"x-request-id", rid.encode("latin-1")), (b"content-type", b"application/json")]
            if answer.retry_after is not None:
                out_headers.append((b"retry-after", answer.retry_after.encode()))
            if body is None and _large_body(headers):  # unread: close rather than read and drop it all
                out_headers.append((b"connection", b"close"))
            if status >= 500 and status != 503:  # 503s (overload) are counted, not logged one by one
                log.warning("infer %s failed: %s", model, answer.message, extra={"status": status})
        finally:
            self.in_flight.dec()
            service.body_budget.give(held.n)
            if shm is not None:
                shm.release()
        out_headers.append((b"content-length", str(len(payload)).encode()))
        # Counted before the answer leaves: a client that reads /metrics right after its response must see it.
        elapsed = time.perf_counter() - start
        service.record(service.model_label(model) if status >= 400 else model, version, "http", status, elapsed)
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": payload})
        if self.access_log:
            access.info("infer", extra={"model": model, "version": version, "status": status, "ms": elapsed * 1e3})

    async def _body(self, headers: dict[bytes, bytes], receive: Receive, held: Held) -> bytes:
        return await collect_body(
            _asgi_chunks(receive), headers.get(b"content-length"), headers.get(b"content-encoding"), self.limit,
            self.service.body_budget, held,
        )  # fmt: skip


async def _asgi_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProtocolError("body", "the client closed the connection before sending the whole body")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _large_body(headers: dict[bytes, bytes]) -> bool:
    """Whether a body left unread may be large: over 64 KiB, or of a length not declared (chunked)."""
    declared = headers.get(b"content-length")
    return declared is None or not declared.isdigit() or int(declared) > 64 * 2**10


_WANTED = frozenset(
    (b"x-request-id", b"content-length", b"inference-header-content-length", b"content-encoding", b"accept-encoding")
)


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    doc = load_json(body)  # 400 for bad UTF-8, nesting too deep, numbers past 4300 digits
    if not isinstance(doc, dict):
        raise ProtocolError("body", f"must be a JSON object, got {type(doc).__name__}")
    return doc


def _unload_parameters(params: Any) -> None:
    """Triton's one unload parameter, ``unload_dependents``, means nothing here but must be well-formed."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise ProtocolError("parameters", f"must be an object, got {short_repr(params)}")
    flag = params.get("unload_dependents", False)
    if not isinstance(flag, bool):
        raise ProtocolError("parameters.unload_dependents", f"must be true or false, got {short_repr(flag)}")


# Triton extensions kiln does not serve, by a path pattern: the answer names the extension.
_UNSUPPORTED = (
    (re.compile(r"^/v2(/models/[^/]+(/versions/[^/]+)?)?/trace(/|$)"), "trace"),
    (re.compile(r"^/v2/logging(/|$)"), "logging"),
    (re.compile(r"^/v2/cudasharedmemory(/|$)"), "CUDA shared memory"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/generate(_stream)?$"), "generate"),
)


async def _not_found(request: Request, exc: Exception) -> Response:
    path = request.url.path
    for pattern, extension in _UNSUPPORTED:
        if pattern.match(path):
            message = f"the {extension} extension is not supported by this server (see GET /v2 for its extensions)"
            return JSONResponse({"error": message}, status_code=404)
    return JSONResponse({"error": f"no endpoint {path!r}; see /v2 for the protocol"}, status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    allow = (getattr(exc, "headers", None) or {}).get("Allow")  # Starlette's 405 names the methods the route takes
    return JSONResponse(
        {
            "error": f"{request.method} is not allowed on {request.url.path!r}"
            + (f"; it takes {allow}" if allow else "")
        },
        status_code=405,
        headers={"allow": allow} if allow else None,
    )
