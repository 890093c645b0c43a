"""The HTTP front end: the V2 / Open Inference Protocol REST API on Starlette, KServe V1 predict for raw
instances (``raw.py``), plus ``/metrics``.

``POST …/infer`` is a bare ASGI handler in front of Starlette (its middleware, router and
Request/Response objects cost about a fifth of the server's CPU per request, measured); everything
else goes through Starlette's routing. No per-request validation layer: the spec validates tensors.
Request bodies may come gzip- or deflate-compressed (``Content-Encoding``, see ``encoding.py``); infer
responses are compressed when ``Accept-Encoding`` asks. Known errors answer 4xx/5xx with
``{"error": "..."}``; anything else is logged with its traceback and answered 500 with a generic message.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln.errors import PayloadTooLargeError, ProtocolError
from kiln.serving import logs
from kiln.serving.encoding import MIN_COMPRESS_BYTES, Inflater, compress, request_coding, response_coding
from kiln.serving.protocol import decode_http, encode_http, load_json, short_repr
from kiln.serving.raw import parse_instances
from kiln.serving.service import Service, check_load_parameters, parse_version, retry_after
from kiln.serving.shared_memory import ShmSession

log = logging.getLogger("kiln.serving")
access = logging.getLogger("kiln.serving.access")

_EMPTY = Response(b"", 200)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed, refusing (413) past ``limit`` bytes before reading more than that."""
    coding = request_coding(request.headers.get("content-encoding"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(int(declared), limit)
    inflater = Inflater(coding, limit) if coding is not None else None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(size, limit)
        if inflater is not None:
            inflater.feed(chunk)
        elif chunk:
            chunks.append(chunk)
    if inflater is not None:
        return inflater.finish()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def error_response(service: Service, exc: BaseException) -> JSONResponse:
    status, message = service.error_status(exc)
    wait = retry_after(exc)
    return JSONResponse({"error": message}, status_code=status, headers={"retry-after": wait} if wait else None)


def build_app(service: Service) -> ASGIApp:
    limit = service.settings.max_body_bytes

    async def live(request: Request) -> Response:
        return _EMPTY if service.live else JSONResponse({"error": "not live"}, status_code=503)

    async def ready(request: Request) -> Response:
        if service.ready:
            return Response(b"", 200)
        return JSONResponse({"error": "the server is starting or shutting down"}, status_code=503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(service.server_metadata())

    async def model_metadata(request: Request) -> Response:
        p = request.path_params
        try:
            return JSONResponse(service.model_metadata(p["model"], p.get("version")))
        except Exception as exc:
            return error_response(service, exc)

    async def model_config(request: Request) -> Response:
        p = request.path_params
        try:
            return JSONResponse(service.model_config(p["model"], p.get("version")))
        except Exception as exc:
            return error_response(service, exc)

    async def model_ready(request: Request) -> Response:
        p = request.path_params
        try:
            if service.model_ready(p["model"], p.get("version")):  # unknown model or version: 404
                return Response(b"", 200)
            return JSONResponse({"error": f"model {p['model']!r} is not ready"}, status_code=503)
        except Exception as exc:
            return error_response(service, exc)

    async def repository_index(request: Request) -> Response:
        try:
            service.check_token(request.headers.get("authorization"))
            body = await read_body(request, limit)
            ready = _json_object(body).get("ready", False)
            if not isinstance(ready, bool):
                raise ProtocolError("ready", f"must be true or false, got {short_repr(ready)}")
            return JSONResponse(service.manager.index(ready_only=ready))
        except Exception as exc:
            return error_response(service, exc)

    async def repository_load(request: Request) -> Response:
        try:
            service.check_token(request.headers.get("authorization"))
            params = _json_object(await read_body(request, limit)).get("parameters")
            check_load_parameters({} if params is None else params)
            await service.manager.load(request.path_params["model"])
            return Response(b"", 200)
        except Exception as exc:
            return error_response(service, exc)

    async def repository_unload(request: Request) -> Response:
        try:
            service.check_token(request.headers.get("authorization"))
            _unload_parameters(_json_object(await read_body(request, limit)).get("parameters"))
            await service.manager.unload(request.path_params["model"])
            return Response(b"", 200)
        except Exception as exc:
            return error_response(service, exc)

    async def statistics(request: Request) -> Response:
        p = request.path_params
        try:
            return JSONResponse({"model_stats": service.statistics(p.get("model"), p.get("version"))})
        except Exception as exc:
            return error_response(service, exc)

    # ---- system shared memory (shared_memory.py) -----------------------------------------------------------
    async def shm_status(request: Request) -> Response:
        try:
            service.check_token(request.headers.get("authorization"), _SHM_ENDPOINTS)
            return JSONResponse(service.shared_memory.status(request.path_params.get("region")))
        except Exception as exc:
            return error_response(service, exc)

    async def shm_register(request: Request) -> Response:
        try:
            service.check_token(request.headers.get("authorization"), _SHM_ENDPOINTS)
            doc = _json_object(await read_body(request, limit))
            unknown = sorted(set(doc) - {"key", "offset", "byte_size"})
            if unknown or "key" not in doc or "byte_size" not in doc:
                raise ProtocolError(
                    "body", f"must hold key and byte_size (offset: 0 when left out) and nothing else, got {sorted(doc)}"
                )
            region = request.path_params["region"]
            service.shared_memory.register(region, doc["key"], doc.get("offset", 0), doc["byte_size"])
            return Response(b"", 200)
        except Exception as exc:
            return error_response(service, exc)

    async def cuda_shm_none(request: Request) -> Response:
        """CUDA shared memory is not served: no regions to list, none to unregister (perf_analyzer's clean-up)."""
        return JSONResponse([]) if request.method == "GET" else Response(b"", 200)

    async def shm_unregister(request: Request) -> Response:
        try:
            service.check_token(request.headers.get("authorization"), _SHM_ENDPOINTS)
            await read_body(request, limit)  # tritonclient sends an empty body; none is read
            service.shared_memory.unregister(request.path_params.get("region"))
            return Response(b"", 200)
        except Exception as exc:
            return error_response(service, exc)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    # ---- KServe V1: raw instances through the model's processing (see raw.py) -----------------------------
    async def v1_models(request: Request) -> Response:
        return JSONResponse({"models": sorted({row["name"] for row in service.manager.index()})})

    async def v1_model(request: Request) -> Response:
        name = request.path_params["model"]
        try:
            ready = service.manager.is_ready(name)
            if not ready:
                service.manager.spec(name)  # unknown model: 404
            return JSONResponse({"name": name, "ready": ready})
        except Exception as exc:
            return error_response(service, exc)

    in_flight = service.metrics.in_flight.labels("http")

    async def v1_predict(request: Request) -> Response:
        start = time.perf_counter()
        name = request.path_params["model"]
        logs.request_id.set(request.headers.get("x-request-id") or logs.new_request_id())
        version, status = "", 200
        in_flight.inc()
        try:
            sv = await service.resolve(name, None)
            version = str(sv.version)
            instances = parse_instances(_json_value(await read_body(request, limit)))
            predictions, _ = await service.predict(sv, instances)
            payload = json.dumps({"predictions": predictions}, separators=(",", ":")).encode()
            response = Response(payload, media_type="application/json")
        except Exception as exc:
            response = error_response(service, exc)
            status = response.status_code
        finally:
            in_flight.dec()
        elapsed = time.perf_counter() - start
        service.record(service.model_label(name) if status >= 400 else name, version, "http", status, elapsed)
        return response

    m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    routes = [
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
    rest = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})
    rest.router.redirect_slashes = False  # 'm/' is no other spelling of 'm'
    infer = InferEndpoint(service)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _ENCODED_SEPARATOR.search(scope.get("raw_path") or b""):
            # uvicorn decodes %2F into '/' before routing: a name holding one would become other path segments
            await _ENCODED_SEPARATOR_ANSWER(scope, receive, send)
            return
        # The hot path skips Starlette's middleware, router and Request/Response objects: plain ASGI.
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.match(scope["path"])
            if match is not None:
                await infer(match.group("model"), match.group("version"), scope, receive, send)
                return
        await rest(scope, receive, send)

    return app


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
        self.in_flight.inc()
        try:
            sv = await service.resolve(model, version_text)
            version = str(sv.version)
            body = await self._body(headers, receive)
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
            status, message = service.error_status(exc)
            payload = json.dumps({"error": message}).encode()
            out_headers = [(b"x-request-id", rid.encode("latin-1")), (b"content-type", b"application/json")]
            wait = retry_after(exc)
            if wait is not None:
                out_headers.append((b"retry-after", wait.encode()))
            if status >= 500 and status != 503:  # 503s (overload) are counted, not logged one by one
                log.warning("infer %s failed: %s", model, message, extra={"status": status})
        finally:
            self.in_flight.dec()
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

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        encoding = headers.get(b"content-encoding")
        coding = request_coding(encoding.decode("latin-1")) if encoding is not None else None
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise PayloadTooLargeError(int(declared), self.limit)
        inflater = Inflater(coding, self.limit) if coding is not None else None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ProtocolError("body", "the client closed the connection before sending the whole body")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.limit:
                    raise PayloadTooLargeError(size, self.limit)
                if inflater is not None:
                    inflater.feed(chunk)  # decompressed as it arrives, within the same limit
                else:
                    chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if inflater is not None:
            return inflater.finish()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_WANTED = frozenset(
    (b"x-request-id", b"content-length", b"inference-header-content-length", b"content-encoding", b"accept-encoding")
)


def _json_value(body: bytes) -> Any:
    return load_json(body)  # 400 for bad UTF-8, nesting too deep, numbers past 4300 digits


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    doc = _json_value(body)
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


_SHM_ENDPOINTS = "the shared-memory endpoints"


async def _not_found(request: Request, exc: Exception) -> Response:
    path = request.url.path
    for pattern, extension in _UNSUPPORTED:
        if pattern.match(path):
            message = f"the {extension} extension is not supported by this server (see GET /v2 for its extensions)"
            return JSONResponse({"error": message}, status_code=404)
    return JSONResponse({"error": f"no endpoint {path!r}; see /v2 for the protocol"}, status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path!r}"}, status_code=405)
