"""The HTTP front end: the V2 / Open Inference Protocol REST API on Starlette, plus ``/metrics``.

Starlette's routing and plain responses only: no per-request model validation layer on the hot path
(the spec validates the tensors). Known errors answer 4xx/5xx with ``{"error": "..."}``; anything else
is logged with its traceback and answered 500 with a generic message.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.errors import PayloadTooLargeError, ProtocolError
from kiln.serving import logs
from kiln.serving.protocol import decode_http, encode_http
from kiln.serving.service import Service, error_status, parse_version

log = logging.getLogger("kiln.serving")
access = logging.getLogger("kiln.serving.access")

_EMPTY = Response(b"", 200)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past ``limit`` bytes before reading more than that."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(size, limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def error_response(exc: BaseException) -> JSONResponse:
    status, message = error_status(exc)
    return JSONResponse({"error": message}, status_code=status)


def build_app(service: Service) -> Starlette:
    settings = service.settings
    limit = settings.max_body_bytes
    in_flight = service.metrics.in_flight.labels("http")

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
            return error_response(exc)

    async def model_config(request: Request) -> Response:
        p = request.path_params
        try:
            return JSONResponse(service.model_config(p["model"], p.get("version")))
        except Exception as exc:
            return error_response(exc)

    async def model_ready(request: Request) -> Response:
        p = request.path_params
        try:
            if service.manager.is_ready(p["model"], parse_version(p.get("version"))):
                return Response(b"", 200)
            service.manager.spec(p["model"])  # unknown model: 404 rather than 'not ready'
            return JSONResponse({"error": f"model {p['model']!r} is not ready"}, status_code=503)
        except Exception as exc:
            return error_response(exc)

    async def infer(request: Request) -> Response:
        start = time.perf_counter()
        p = request.path_params
        model: str = p["model"]
        rid = request.headers.get("x-request-id") or logs.new_request_id()
        logs.request_id.set(rid)
        version = ""
        status = 200
        in_flight.inc()
        try:
            sv = await service.resolve(model, p.get("version"))
            version = str(sv.version)
            body = await read_body(request, limit)
            hlen = request.headers.get("inference-header-content-length")
            if hlen is not None and not hlen.isdigit():
                raise ProtocolError("Inference-Header-Content-Length", f"must be a byte count, got {hlen!r}")
            req = decode_http(body, int(hlen) if hlen is not None else None, sv.spec)
            req.version = parse_version(p.get("version"))
            outputs = await service.infer(sv, req)
            parts, header_len = encode_http(model, sv.version, req, outputs)
            if header_len is None:
                response = Response(parts[0], media_type="application/json", headers={"x-request-id": rid})
            else:
                response = Response(
                    b"".join(parts),
                    media_type="application/octet-stream",
                    headers={"inference-header-content-length": str(header_len), "x-request-id": rid},
                )
        except Exception as exc:
            status, message = error_status(exc)
            response = JSONResponse({"error": message}, status_code=status, headers={"x-request-id": rid})
            if status >= 500:
                log.warning("infer %s failed: %s", model, message, extra={"status": status})
        finally:
            in_flight.dec()
        elapsed = time.perf_counter() - start
        service.record(service.model_label(model) if status >= 400 else model, version, "http", status, elapsed)
        if settings.access_log:
            access.info("infer", extra={"model": model, "version": version, "status": status, "ms": elapsed * 1e3})
        return response

    async def repository_index(request: Request) -> Response:
        try:
            service.check_token(request.headers.get("authorization"))
            body = await read_body(request, limit)
            doc = _json_object(body)
            return JSONResponse(service.manager.index(ready_only=bool(doc.get("ready", False))))
        except Exception as exc:
            return error_response(exc)

    async def repository_load(request: Request) -> Response:
        try:
            service.check_token(request.headers.get("authorization"))
            _json_object(await read_body(request, limit))
            await service.manager.load(request.path_params["model"])
            return Response(b"", 200)
        except Exception as exc:
            return error_response(exc)

    async def repository_unload(request: Request) -> Response:
        try:
            service.check_token(request.headers.get("authorization"))
            _json_object(await read_body(request, limit))
            await service.manager.unload(request.path_params["model"])
            return Response(b"", 200)
        except Exception as exc:
            return error_response(exc)

    async def statistics(request: Request) -> Response:
        p = request.path_params
        try:
            model = p.get("model")
            if model is not None:
                service.manager.spec(model)  # unknown model: 404
            return JSONResponse({"model_stats": service.metrics.statistics(model, p.get("version"))})
        except Exception as exc:
            return error_response(exc)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    routes = [  # infer first: the router tries routes in order, and infer is the hot path
        Route(f"{m}/infer", infer, methods=["POST"]),
        Route(f"{mv}/infer", infer, methods=["POST"]),
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
        Route(f"{mv}/stats", statistics, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})
    return app


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("body", f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("body", f"must be a JSON object, got {type(doc).__name__}")
    return doc


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"no endpoint {request.url.path!r}; see /v2 for the protocol"}, status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path!r}"}, status_code=405)
