"""The gRPC front end: ``inference.GRPCInferenceService`` on grpc.aio, with tritonclient's generated
stubs (``service_pb2``, ``model_config_pb2``), so that Triton's clients and tools work unchanged.

Errors are answered as HTTP answers them, with the status code :mod:`.error_map` gives (400 ->
INVALID_ARGUMENT, 401 -> UNAUTHENTICATED, 404 -> NOT_FOUND, 413/507 -> RESOURCE_EXHAUSTED, 503 ->
UNAVAILABLE, 504 -> DEADLINE_EXCEEDED, else INTERNAL) and the message as details. An RPC the
client cancels, or whose deadline passes, is counted as ``cancelled`` or ``timeout``, never as served.
Bytes that are not the method's protobuf message answer INVALID_ARGUMENT (see :func:`add_servicer`), and
the methods kiln does not serve (CUDA shared memory, tracing, logging) UNIMPLEMENTED. ``ModelStreamInfer``
answers a failed request in the stream instead (``error_message``), and goes on (:mod:`.grpc_stream`).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from kiln import logs
from kiln.errors import ProtocolError
from kiln.repository import parse_version
from kiln.serving import metadata
from kiln.serving.error_map import error_answer, grpc_code
from kiln.serving.grpc_stream import answer_stream
from kiln.serving.metrics import CLIENT_CLOSED
from kiln.serving.protocol import (
    InferRequest,
    RequestedOutput,
    check_datatype,
    check_dims,
    check_outputs,
    from_raw,
    output_datatype,
    shm_input,
    shm_output,
    to_raw,
    write_shm_output,
)
from kiln.serving.service import REPOSITORY_ENDPOINTS, SHM_ENDPOINTS, Service, check_load_parameters
from kiln.serving.shared_memory import ShmSession
from kiln.spec import ModelSpec

# Typed ``contents`` fields per V2 datatype (used when a client does not send raw_input_contents).
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def _param(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def decode_grpc(
    request: Any, spec: ModelSpec, keep_bytes: frozenset[str] = frozenset(), shm: ShmSession | None = None
) -> InferRequest:
    """A ``ModelInferRequest`` as an :class:`InferRequest`; raw contents become zero-copy views.

    BYTES inputs named in ``keep_bytes`` keep their elements as ``bytes`` instead of text. Tensors in system
    shared memory go through ``shm`` (None while no region is registered); the caller releases it. As with
    Triton, ``raw_input_contents`` holds one entry per input that is not in shared memory.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        plain = sum("shared_memory_region" not in t.parameters for t in request.inputs)
        if len(raw) != plain:
            which = "inputs" if plain == len(request.inputs) else "inputs not in shared memory"
            raise ProtocolError(
                "raw_input_contents", f"holds {len(raw)} tensors for {plain} {which}; send one per input"
            )
    inputs: dict[str, np.ndarray] = {}
    r = 0  # the next raw_input_contents entry
    for i, t in enumerate(request.inputs):
        spec.input(t.name)
        if t.name in inputs:
            raise ProtocolError(f"inputs[{i}].name", f"input {t.name!r} is given twice")
        dtype = check_datatype(spec, t.name, t.datatype)
        shape = check_dims(t.name, tuple(t.shape))
        if "shared_memory_region" in t.parameters:
            if t.HasField("contents"):
                raise ProtocolError(f"input {t.name!r}: contents", "must be left empty for an input in shared memory")
            params = {k: _param(v) for k, v in t.parameters.items()}
            inputs[t.name] = shm_input(shm, t.name, params, dtype, shape, t.name not in keep_bytes)
            continue
        if raw:
            if t.HasField("contents"):
                raise ProtocolError(
                    f"input {t.name!r}: contents", "must be left empty when raw_input_contents carries the tensors"
                )
            inputs[t.name] = from_raw(t.name, raw[r], dtype, shape, t.name not in keep_bytes)
            r += 1
            continue
        field = _CONTENTS.get(t.datatype)
        values = getattr(t.contents, field) if field else []
        count = math.prod(shape)
        if len(values) != count:
            raise ProtocolError(
                f"input {t.name!r}: contents", f"hold {len(values)} elements but shape {list(shape)} needs {count}"
            )
        if dtype.kind == "O" and t.name in keep_bytes:
            arr = np.array([bytes(v) for v in values] or [], dtype=object)
        elif dtype.kind == "O":
            try:
                arr = np.array([bytes(v).decode() for v in values] or [], dtype=object)
            except UnicodeDecodeError:
                raise ProtocolError(f"input {t.name!r}: contents", "BYTES elements must be UTF-8 text") from None
        else:
            try:
                arr = np.asarray(values, dtype=dtype)
            except (OverflowError, ValueError):  # int_contents past INT8's range, say
                raise ProtocolError(
                    f"input {t.name!r}: contents", f"hold values out of the range of {t.datatype}"
                ) from None
        inputs[t.name] = arr.reshape(shape)
    req = InferRequest(id=request.id, inputs=inputs)
    req.parameters = {k: _param(v) for k, v in request.parameters.items()}
    if request.outputs:
        req.outputs = [RequestedOutput(o.name, True) for o in request.outputs]
        check_outputs(spec, [o.name for o in request.outputs])
        for j, o in enumerate(request.outputs):
            if "classification" in o.parameters:
                raise ProtocolError(f"outputs[{j}].parameters.classification", "is not supported by this server")
            if "shared_memory_region" in o.parameters:
                params = {k: _param(v) for k, v in o.parameters.items()}
                req.shm_outputs = shm_output(shm, req.shm_outputs, o.name, params)
    return req


def encode_grpc(model: str, version: int, req: InferRequest, outputs: dict[str, np.ndarray]) -> Any:
    resp = service_pb2.ModelInferResponse(model_name=model, model_version=str(version), id=req.id)
    raws: list[bytes] = []
    shm = req.shm_outputs
    for name in req.output_names or tuple(outputs):
        arr = outputs[name]
        out = resp.outputs.add(name=name, datatype=output_datatype(arr), shape=arr.shape)
        if shm is not None and name in shm:  # written into its region; an empty entry keeps the order (Triton's)
            for key, value in write_shm_output(shm[name], name, arr).items():
                if isinstance(value, str):
                    out.parameters[key].string_param = value
                else:
                    out.parameters[key].int64_param = value
            raws.append(b"")
            continue
        r = to_raw(arr)
        raws.append(r if isinstance(r, bytes) else r.tobytes())
    resp.raw_output_contents.extend(raws)
    return resp


Rpc = Callable[[Any, Any, Any], Awaitable[Any]]  # a servicer method: (self, request, context)


def _answers_errors(method: Rpc) -> Rpc:
    """A servicer method whose exceptions abort the RPC with the code and message :mod:`.error_map` decides,
    as HTTP answers them (:func:`kiln.serving.app.endpoint`)."""

    @functools.wraps(method)
    async def rpc(self: InferenceServicer, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            answer = error_answer(exc, self.service.manager.repository)
            await context.abort(answer.grpc_code, answer.message)

    return rpc


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service) -> None:
        self.service = service
        self._in_flight = service.metrics.in_flight.labels("grpc")

    def _check_token(self, context: Any, endpoints: str = REPOSITORY_ENDPOINTS) -> None:
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        self.service.check_token(md.get("authorization"), endpoints)

    # ---- health and metadata ---------------------------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=self.service.live)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.service.ready)

    @_answers_errors
    async def ModelReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(**metadata.server_metadata())

    @_answers_errors
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        md = self.service.model_metadata(request.name, request.version)
        resp = service_pb2.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"])
        for key in ("inputs", "outputs"):
            for t in md[key]:
                getattr(resp, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    @_answers_errors
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        cfg = self.service.model_config(request.name, request.version)
        config = json_format.ParseDict(cfg, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
        return service_pb2.ModelConfigResponse(config=config)

    @_answers_errors
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        stats = self.service.statistics(request.name or None, request.version or None)
        return json_format.ParseDict({"model_stats": stats}, service_pb2.ModelStatisticsResponse())

    # ---- inference ---------------------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        self._in_flight.inc()
        try:
            response, status, message = await self._infer(request, context.time_remaining)
        finally:
            self._in_flight.dec()
        if response is None:
            await context.abort(grpc_code(status), message)
        return response

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> None:
        """Triton's bidirectional stream: each request is answered as by ModelInfer, in completion order; a
        failed one is answered in the stream (``error_message``, and its id) and the stream goes on."""

        async def answer(request: Any) -> Any:
            if type(request) is Undecodable:
                return service_pb2.ModelStreamInferResponse(error_message=_undecodable(request))
            response, _, message = await self._infer(request, context.time_remaining)
            if response is None:
                failed = service_pb2.ModelInferResponse(id=request.id)
                return service_pb2.ModelStreamInferResponse(error_message=message, infer_response=failed)
            return service_pb2.ModelStreamInferResponse(infer_response=response)

        await answer_stream(request_iterator, context, answer, self._in_flight)

    async def _infer(self, request: Any, time_remaining: Callable[[], float | None]) -> tuple[Any, int, str]:
        """One ``ModelInferRequest``, counted in the metrics: ``(response, 200, "")``, or ``(None, status,
        message)`` when it failed; ``time_remaining`` gives what is left of the RPC's deadline."""
        start = time.perf_counter()
        model = request.model_name
        logs.request_id.set(request.id or logs.new_request_id())
        version = ""
        status, message = 200, ""
        shm: ShmSession | None = None
        held = 0
        try:
            held = self.service.body_budget.take(request.ByteSize())  # received already; held while it waits
            sv = await self.service.resolve(model, request.model_version)
            version = str(sv.version)
            shm = self.service.shared_memory.session()
            req = decode_grpc(request, sv.processing.wire_spec, sv.processing.keep_bytes, shm)
            req.version = parse_version(request.model_version)
            outputs = await self.service.infer_v2(sv, req, deadline_s=time_remaining())
            return encode_grpc(model, sv.version, req, outputs), status, message
        except asyncio.CancelledError:  # grpc.aio cancels the handler when the client cancels or its deadline passes
            remaining = time_remaining()
            status = 504 if remaining is not None and remaining <= 0 else CLIENT_CLOSED
            raise
        except Exception as exc:
            answer = error_answer(exc, self.service.manager.repository)
            status = answer.status
            return None, status, answer.message
        finally:
            self.service.body_budget.give(held)
            if shm is not None:
                shm.release()
            label = model if status < 400 else self.service.model_label(model)
            self.service.record(label, version, "grpc", status, time.perf_counter() - start)

    # ---- model repository --------------------------------------------------------------------------------
    @_answers_errors
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        self._check_token(context)
        resp = service_pb2.RepositoryIndexResponse()
        for row in self.service.manager.index(ready_only=request.ready):
            resp.models.add(**row)
        return resp

    @_answers_errors
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        self._check_token(context)
        check_load_parameters(dict(request.parameters))
        await self.service.manager.load(request.model_name)
        return service_pb2.RepositoryModelLoadResponse()

    @_answers_errors
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        self._check_token(context)
        await self.service.manager.unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    # ---- system shared memory (shared_memory.py) -----------------------------------------------------------
    @_answers_errors
    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        self._check_token(context, SHM_ENDPOINTS)
        resp = service_pb2.SystemSharedMemoryStatusResponse()
        for row in self.service.shared_memory.status(request.name or None):
            resp.regions[row["name"]].CopyFrom(service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(**row))
        return resp

    @_answers_errors
    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        self._check_token(context, SHM_ENDPOINTS)
        self.service.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return service_pb2.SystemSharedMemoryRegisterResponse()

    # CUDA shared memory is not served: there are never CUDA regions, so "status" and "unregister all" answer
    # truthfully (perf_analyzer calls both when it cleans up), and the rest names the extension.
    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        if request.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, _NO_CUDA)
        return service_pb2.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        if request.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, _NO_CUDA)
        return service_pb2.CudaSharedMemoryUnregisterResponse()

    @_answers_errors
    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        self._check_token(context, SHM_ENDPOINTS)
        self.service.shared_memory.unregister(request.name or None)
        return service_pb2.SystemSharedMemoryUnregisterResponse()


def build_grpc_server(service: Service, max_message_bytes: int) -> Any:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    add_servicer(InferenceServicer(service), server)
    return server


# ---- method handlers ----------------------------------------------------------------------------------------
_SERVICE = "inference.GRPCInferenceService"


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What the request deserializer gives for bytes that are not the method's message (see :func:`_lenient`)."""

    message: str
    error: str


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    """``message_class.FromString``, but bytes it cannot parse become :class:`Undecodable`: grpc.aio answers
    INTERNAL when a deserializer raises, and a malformed request is the client's error (INVALID_ARGUMENT)."""
    parse = message_class.FromString
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(name, str(exc) or "malformed protobuf")

    return deserialize


def _undecodable(request: Undecodable) -> str:
    return f"request: the bytes are not a valid {request.message} protobuf message ({request.error})"


def _checked(behaviour: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(request: Any, context: Any) -> Any:
        if type(request) is Undecodable:  # one type check per call
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _undecodable(request))
        return await behaviour(request, context)

    return handle


_NO_CUDA = "the CUDA shared memory extension is not supported by this server: it holds no CUDA regions"


def _unimplemented(method: str) -> Callable[[Any, Any], Awaitable[Any]]:
    message = f"{_SERVICE}/{method} is not supported by this server"
    if method.startswith("CudaSharedMemory"):
        message = f"{_SERVICE}/{method}: the CUDA shared memory extension is not supported by this server"

    async def handle(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return handle


def _stream_unimplemented(method: str) -> Callable[[Any, Any], Any]:
    async def handle(requests: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{_SERVICE}/{method} is not supported by this server")
        yield  # an async generator, as grpc.aio expects of a stream handler

    return handle


def add_servicer(servicer: InferenceServicer, server: Any) -> None:
    """Register the servicer's methods, as tritonclient's generated ``add_…_to_server`` would, with
    lenient deserializers (a stream's handler gets :class:`Undecodable` messages too); methods the servicer
    does not implement answer UNIMPLEMENTED."""
    base = service_pb2_grpc.GRPCInferenceServiceServicer
    handlers: dict[str, Any] = {}
    for method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request_class = getattr(service_pb2, method.input_type.name)
        response_class = getattr(service_pb2, method.output_type.name)
        implemented = getattr(type(servicer), method.name, None) is not getattr(base, method.name, None)
        kwargs = {
            "request_deserializer": _lenient(request_class),
            "response_serializer": response_class.SerializeToString,
        }
        if method.client_streaming or method.server_streaming:  # ModelStreamInfer, bidirectional
            if not (method.client_streaming and method.server_streaming):
                raise TypeError(f"{method.name} streams one way only; register it as such")
            stream = getattr(servicer, method.name) if implemented else _stream_unimplemented(method.name)
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(stream, **kwargs)
            continue
        behaviour = _checked(getattr(servicer, method.name)) if implemented else _unimplemented(method.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.63: faster dispatch
        server.add_registered_method_handlers(_SERVICE, handlers)
