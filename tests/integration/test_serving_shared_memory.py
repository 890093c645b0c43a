"""Triton's system shared memory extension against a server in this process, with tritonclient's own
shared memory helpers and clients (HTTP and gRPC): exact outputs read back from the regions, and every
refusal (bounds, sizes, names, keys, limits, token) a 400/401/507 that names the region, with the bytes
around a region untouched."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

import kiln
from kiln.errors import SharedMemoryError, SharedMemoryLimitError
from kiln.serving.server import ServerThread
from kiln.serving.settings import ServerSettings
from kiln.serving.shared_memory import SHM_DIR, SharedMemoryRegistry, ShmRef
from tests import models

GUARD = 0xAB
TOKEN = "shm-s3cret"

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs POSIX shared memory in /dev/shm")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shm")
    root = d / "repo"
    kiln.import_model(models.add_model(d / "add.onnx"), root, name="add")
    kiln.import_model(models.mixed_model(d / "mixed.onnx"), root, name="mixed")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(ServerSettings(repo=repo, http_port=0, grpc_port=0, engine_threads=1)).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def http(server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


@pytest.fixture(params=["http", "grpc"])
def client(request: pytest.FixtureRequest, http: Any, grpc: Any) -> Any:
    return http if request.param == "http" else grpc


def _module(client: Any) -> Any:
    return httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient


@pytest.fixture(autouse=True)
def unregistered(http: httpclient.InferenceServerClient) -> Iterator[None]:
    """Every test starts and ends with no region registered."""
    http.unregister_system_shared_memory()
    yield
    http.unregister_system_shared_memory()


@pytest.fixture
def segment() -> Iterator[Callable[[int], Any]]:
    """``segment(size)``: a tritonclient segment of ``size`` bytes filled with the guard byte; destroyed after."""
    made: list[Any] = []

    def create(size: int) -> Any:
        key = f"/kiln_test_{uuid.uuid4().hex}"
        handle = shm.create_shared_memory_region(key[1:], key, size, create_only=True)
        shm.set_shared_memory_region(handle, [np.full(size, GUARD, np.uint8)])
        made.append(handle)
        return handle

    yield create
    for handle in made:
        shm.destroy_shared_memory_region(handle)


@pytest.fixture
def raw_segment() -> Iterator[Callable[[int], tuple[str, Path]]]:
    """``raw_segment(size)``: a segment this process never maps (its key, its file); unlinked after."""
    made: list[Path] = []

    def create(size: int) -> tuple[str, Path]:
        name = f"kiln_test_{uuid.uuid4().hex}"
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        made.append(path)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, bytes([GUARD]) * size, 0)
        finally:
            os.close(fd)
        return "/" + name, path

    yield create
    for path in made:
        path.unlink(missing_ok=True)


def _key(handle: Any) -> str:
    return str(handle._shm_key)


def _bytes(handle: Any, size: int) -> np.ndarray:
    return shm.get_contents_as_numpy(handle, np.uint8, [size])


def _register(client: Any, name: str, key: str, byte_size: int, offset: int = 0, **kw: Any) -> None:
    client.register_system_shared_memory(name, key, byte_size, offset=offset, **kw)


def _status(client: Any) -> dict[str, dict[str, Any]]:
    if isinstance(client, httpclient.InferenceServerClient):
        return {r["name"]: r for r in client.get_system_shared_memory_status()}
    regions = client.get_system_shared_memory_status(as_json=True).get("regions", {})
    return {
        name: {k: int(v) if k in ("offset", "byte_size") else v for k, v in r.items()} for name, r in regions.items()
    }


def _refused(call: Callable[[], Any], *needles: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    message = str(info.value.message())
    assert info.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), (info.value.status(), message)
    for needle in needles:
        assert needle in message, message
    return message


def _mapped(path: str) -> bool:
    return path in Path("/proc/self/maps").read_text()


# ---- the data path ---------------------------------------------------------------------------------------
def test_add_reads_its_input_from_and_writes_its_output_into_shared_memory(client: Any) -> None:
    mod = _module(client)
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 4
    key_in, key_out = f"/kiln_test_{uuid.uuid4().hex}", f"/kiln_test_{uuid.uuid4().hex}"
    h_in = shm.create_shared_memory_region("in", key_in, 64, create_only=True)
    h_out = shm.create_shared_memory_region("out", key_out, 96, create_only=True)
    try:
        shm.set_shared_memory_region(h_in, [np.full(64, GUARD, np.uint8)])
        shm.set_shared_memory_region(h_in, [x], offset=16)
        shm.set_shared_memory_region(h_out, [np.full(96, GUARD, np.uint8)])
        _register(client, "in", key_in, 48, offset=8)  # segment bytes 8..56; x at 16..48 (region offset 8)
        _register(client, "out", key_out, 64, offset=16)  # segment bytes 16..80; y at 24..56 (region offset 8)
        assert _status(client)["in"] == {"name": "in", "key": key_in, "offset": 8, "byte_size": 48}
        i = mod.InferInput("x", [2, 4], "FP32")
        i.set_shared_memory("in", 32, offset=8)
        o = mod.InferRequestedOutput("y")
        o.set_shared_memory("out", 40, offset=8)
        for _ in range(2):  # the same regions serve request after request
            result = client.infer("add", [i], outputs=[o])
            out = shm.get_contents_as_numpy(h_out, np.float32, [2, 4], offset=24)
            np.testing.assert_array_equal(out, x + 1)
        raw = _bytes(h_out, 96)
        assert (raw[:24] == GUARD).all() and (raw[56:] == GUARD).all()  # nothing outside the tensor written
        meta = result.get_output("y")
        if mod is httpclient:  # as Triton: metadata only (its C++ client reads binary_data_size in any parameters)
            assert meta == {"name": "y", "datatype": "FP32", "shape": [2, 4]}
        else:
            assert meta.parameters["shared_memory_region"].string_param == "out"
            assert meta.parameters["shared_memory_byte_size"].int64_param == 32
            assert list(meta.shape) == [2, 4] and list(result.get_response().raw_output_contents) == [b""]
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(h_in)
        shm.destroy_shared_memory_region(h_out)


def test_bytes_input_and_output_in_shared_memory_beside_ordinary_tensors(client: Any, segment: Any) -> None:
    mod = _module(client)
    text = np.array([["héllo", ""], ["kiln", "shm"]], dtype=object)
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    x = np.array([[1, 2], [3, 4]], dtype=np.float32)
    blob = serialize_byte_tensor(np.vectorize(lambda s: s.encode())(text).astype(object)).item()
    h_in, h_out = segment(len(blob)), segment(128)
    shm.set_shared_memory_region(h_in, [np.frombuffer(blob, np.uint8)])
    _register(client, "text_in", _key(h_in), len(blob))
    _register(client, "text_out", _key(h_out), 128)
    inputs = [mod.InferInput("ids", [2, 3], "INT64"), mod.InferInput("text", [2, 2], "BYTES"),
              mod.InferInput("x", [2, 2], "FP32")]  # fmt: skip
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_shared_memory("text_in", len(blob))
    inputs[2].set_data_from_numpy(x)
    o_text = mod.InferRequestedOutput("text_out")
    o_text.set_shared_memory("text_out", 128)
    outputs = [mod.InferRequestedOutput("ids_out"), o_text, mod.InferRequestedOutput("z")]
    result = client.infer("mixed", inputs, outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("ids_out"), ids + 1)  # the empty entry keeps gRPC's order
    np.testing.assert_array_equal(result.as_numpy("z"), x * 2)
    got = shm.get_contents_as_numpy(h_out, np.object_, [2, 2])
    assert got.tolist() == [[s.encode() for s in row] for row in text.tolist()]
    size = len(blob)
    assert (_bytes(h_out, 128)[size:] == GUARD).all()


# ---- refusals on infer -----------------------------------------------------------------------------------
def test_out_of_bounds_wrong_sizes_and_unknown_regions_are_refused_and_nothing_is_written(
    client: Any, segment: Any
) -> None:
    mod = _module(client)
    h_in, h_out = segment(64), segment(64)
    shm.set_shared_memory_region(h_in, [np.ones((2, 4), np.float32)])
    _register(client, "in", _key(h_in), 32)
    _register(client, "out", _key(h_out), 32, offset=16)

    def infer(in_size: int, in_offset: int = 0, out_size: int = 32, out_offset: int = 0, region: str = "in") -> Any:
        i = mod.InferInput("x", [2, 4], "FP32")
        i.set_shared_memory(region, in_size, offset=in_offset)
        o = mod.InferRequestedOutput("y")
        o.set_shared_memory("out", out_size, offset=out_offset)
        return lambda: client.infer("add", [i], outputs=[o])

    _refused(infer(32, in_offset=8), "'in'", "shared_memory_offset 8", "= 40", "32 bytes")
    _refused(infer(2**62, in_offset=2**62), "'in'", str(2**63), "32 bytes")
    _refused(infer(16), "'in'", "needs 32 bytes", "shared_memory_byte_size is 16")
    _refused(infer(32, out_size=24, out_offset=16), "'out'", "= 40", "32 bytes")
    _refused(infer(32, out_size=16), "'out'", "holds 32 bytes", "shared_memory_byte_size 16")
    _refused(infer(32, region="nowhere"), "Unable to find system shared memory region 'nowhere'")
    assert (_bytes(h_out, 64) == GUARD).all()  # not one byte of the output segment was written
    assert set(_status(client)) == {"in", "out"}  # and the server goes on with its regions
    client.infer("add", [infer_input(mod, "in")], outputs=[requested(mod, "out", 32)])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [2, 4], offset=16), np.full((2, 4), 2))


def infer_input(mod: Any, region: str) -> Any:
    i = mod.InferInput("x", [2, 4], "FP32")
    i.set_shared_memory(region, 32)
    return i


def requested(mod: Any, region: str, size: int) -> Any:
    o = mod.InferRequestedOutput("y")
    o.set_shared_memory(region, size)
    return o


def test_shared_memory_parameters_of_the_wrong_type_are_refused(http: httpclient.InferenceServerClient) -> None:
    i = httpclient.InferInput("x", [2, 4], "FP32")
    i.set_shared_memory("in", 32)
    i._parameters["shared_memory_byte_size"] = "32"  # tritonclient would send what it is given
    _refused(lambda: http.infer("add", [i]), "shared_memory_byte_size must be a non-negative integer")
    i._parameters.update(shared_memory_byte_size=32, shared_memory_region=7)
    _refused(lambda: http.infer("add", [i]), "shared_memory_region", "must be a region name")


def test_a_segment_shrunk_after_register_is_refused_not_faulted_on(
    client: Any, raw_segment: Callable[[int], tuple[str, Path]]
) -> None:
    key, path = raw_segment(4096)
    _register(client, "in", key, 32)
    os.truncate(path, 16)
    _refused(lambda: client.infer("add", [infer_input(_module(client), "in")]), "'in'", "now holds 16 bytes")


# ---- registration --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["../etc/passwd", "/a/b", "", "k" * 300, "/..", ".", "a b", "/dev/shm/x"])
def test_bad_keys_are_refused(client: Any, key: str) -> None:
    _refused(lambda: _register(client, "r", key, 8), "is not a POSIX shared memory key")
    assert _status(client) == {}


def test_bad_names_duplicates_oversized_regions_and_symlinks_are_refused(
    client: Any, segment: Any, raw_segment: Callable[[int], tuple[str, Path]]
) -> None:
    h = segment(64)
    _refused(lambda: _register(client, "a b", _key(h), 8), "is not a region name")
    _refused(lambda: _register(client, "r", _key(h), 65), "'r'", "passes the end of segment", "64 bytes")
    _refused(lambda: _register(client, "r", _key(h), 8, offset=60), "'r'", "= 68", "64 bytes")
    _refused(lambda: _register(client, "r", _key(h), 0), "'r'", "byte_size must be an integer of at least 1")
    _refused(lambda: _register(client, "r", "/kiln_test_absent", 8), "'r'", "no shared memory segment has key")
    _register(client, "r", _key(h), 64)
    _refused(lambda: _register(client, "r", _key(h), 8), "'r'", "is already registered")
    _refused(lambda: client.get_system_shared_memory_status("nowhere"), "Unable to find system shared memory region")
    link = SHM_DIR / f"kiln_test_{uuid.uuid4().hex}"
    key, _ = raw_segment(64)
    link.symlink_to(SHM_DIR / key[1:])
    try:
        _refused(lambda: _register(client, "s", "/" + link.name, 8), "'s'", "symbolic link")
    finally:
        link.unlink()
    assert set(_status(client)) == {"r"}
    assert (_bytes(h, 64) == GUARD).all()


def test_unregister_closes_the_mapping_and_unregister_all_clears_every_region(
    client: Any, raw_segment: Callable[[int], tuple[str, Path]]
) -> None:
    (key_a, path_a), (key_b, path_b) = raw_segment(4096), raw_segment(4096)
    x = np.arange(8, dtype=np.float32)
    fd = os.open(path_a, os.O_RDWR)
    os.pwrite(fd, x.tobytes(), 0)
    os.close(fd)
    assert not _mapped(str(path_a))  # this process (client and server) has not mapped it yet
    _register(client, "a", key_a, 64)
    _register(client, "b", key_b, 64)
    assert _mapped(str(path_a)) and _mapped(str(path_b))
    o = requested(_module(client), "b", 32)
    client.infer("add", [infer_input(_module(client), "a")], outputs=[o])
    fd = os.open(path_b, os.O_RDONLY)
    np.testing.assert_array_equal(np.frombuffer(os.pread(fd, 32, 0), np.float32), x + 1)
    os.close(fd)
    client.unregister_system_shared_memory("a")
    assert set(_status(client)) == {"b"} and not _mapped(str(path_a)) and _mapped(str(path_b))
    client.unregister_system_shared_memory("a")  # as Triton: unregistering what is not registered is no error
    _register(client, "a", key_a, 32)  # the name is free again
    client.unregister_system_shared_memory()
    assert _status(client) == {} and not _mapped(str(path_a)) and not _mapped(str(path_b))
    assert path_a.exists() and path_b.exists()  # the client's segments: never unlinked by the server


def test_unregister_and_register_while_requests_use_the_region_neither_crash_nor_corrupt(
    server: ServerThread, http: httpclient.InferenceServerClient, raw_segment: Callable[[int], tuple[str, Path]]
) -> None:
    (key_in, path_in), (key_out, path_out) = raw_segment(64), raw_segment(64)
    fd = os.open(path_in, os.O_RDWR)
    os.pwrite(fd, np.full(8, 3, np.float32).tobytes(), 0)
    os.close(fd)
    _register(http, "in", key_in, 32)
    _register(http, "out", key_out, 32)
    failures: list[str] = []
    served: list[int] = []

    def work() -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            for _ in range(30):
                try:
                    client.infer("add", [infer_input(httpclient, "in")], outputs=[requested(httpclient, "out", 32)])
                    served.append(1)
                except InferenceServerException as exc:  # the region was unregistered just then: a clean 400
                    if "Unable to find system shared memory region 'in'" not in str(exc.message()):
                        failures.append(str(exc))
        finally:
            client.close()

    workers = [threading.Thread(target=work) for _ in range(3)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):  # unregister and register again for as long as they run
        http.unregister_system_shared_memory("in")
        _register(http, "in", key_in, 32)
    for w in workers:
        w.join()
    assert failures == [] and served
    fd = os.open(path_out, os.O_RDONLY)
    raw = os.pread(fd, 64, 0)
    os.close(fd)
    assert np.frombuffer(raw[:32], np.float32).tolist() == [4.0] * 8 and raw[32:] == bytes([GUARD]) * 32
    http.unregister_system_shared_memory()
    assert not _mapped(str(path_in)) and not _mapped(str(path_out))


def test_the_shared_memory_endpoints_need_the_token(repo: Path, segment: Any) -> None:
    srv = ServerThread(
        ServerSettings(repo=repo, http_port=0, grpc_port=0, engine_threads=1, token=SecretStr(TOKEN))
    ).start()
    try:
        h = segment(64)
        http = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        auth = {"authorization": f"Bearer {TOKEN}"}
        for call in (
            lambda: http.register_system_shared_memory("r", _key(h), 64),
            lambda: http.get_system_shared_memory_status(),
            lambda: http.unregister_system_shared_memory(),
            lambda: grpc.register_system_shared_memory("r", _key(h), 64),
            lambda: grpc.get_system_shared_memory_status(),
            lambda: grpc.register_system_shared_memory("r", _key(h), 64, headers={"authorization": "Bearer wrong"}),
        ):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() in ("401", "StatusCode.UNAUTHENTICATED")
            assert "shared-memory endpoints need the server's token" in str(info.value.message())
        http.register_system_shared_memory("r", _key(h), 64, headers=auth)
        assert [r["name"] for r in http.get_system_shared_memory_status(headers=auth)] == ["r"]
        grpc.unregister_system_shared_memory("r", headers=auth)
        assert grpc.get_system_shared_memory_status(headers=auth, as_json=True).get("regions", {}) == {}
        http.close()
        grpc.close()
    finally:
        srv.stop()


def test_cuda_shared_memory_is_refused_and_system_shared_memory_advertised(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    assert "system_shared_memory" in http.get_server_metadata()["extensions"]
    assert "cuda_shared_memory" not in http.get_server_metadata()["extensions"]
    # there are never CUDA regions: listing and unregistering all of them say so truthfully (perf_analyzer's
    # clean-up calls both); anything about a region, or registering one, names the extension
    assert http.get_cuda_shared_memory_status() == []
    http.unregister_cuda_shared_memory()
    assert list(grpc.get_cuda_shared_memory_status(as_json=True).get("regions", {})) == []
    grpc.unregister_cuda_shared_memory()
    for call, status in (
        (lambda: http.get_cuda_shared_memory_status("r"), "404"),
        (lambda: http.register_cuda_shared_memory("r", b"\x00" * 64, 0, 64), "404"),
        (lambda: grpc.get_cuda_shared_memory_status("r"), "StatusCode.NOT_FOUND"),
        (lambda: grpc.register_cuda_shared_memory("r", b"\x00" * 64, 0, 64), "StatusCode.UNIMPLEMENTED"),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == status
        assert "the CUDA shared memory extension is not supported by this server" in str(info.value.message())


# ---- the registry's lifetimes and limits (no server needed) --------------------------------------------------
def test_unregister_while_in_use_unmaps_only_after_the_last_use_and_the_last_view(
    raw_segment: Callable[[int], tuple[str, Path]],
) -> None:
    key, path = raw_segment(8192)
    registry = SharedMemoryRegistry()
    registry.register("r", key, 4100, 64)  # an offset off the page: the mapping starts on the page before
    session = registry.session()
    assert session is not None
    view = session.part(ShmRef("r", 8, 16), "input 'x'")
    registry.unregister("r")
    assert registry.status() == [] and registry.session() is None and _mapped(str(path))
    view[:4] = b"kiln"  # still mapped: the request that holds it finishes its work
    session.release()  # the last use: closing fails on the live view (BufferError), the pages stay for it
    assert _mapped(str(path)) and registry.mapped_bytes() == 4 + 64
    del view
    assert not _mapped(str(path)) and registry.mapped_bytes() == 0
    fd = os.open(path, os.O_RDONLY)
    assert os.pread(fd, 6, 4100 + 7) == bytes([GUARD]) + b"kiln" + bytes([GUARD])
    os.close(fd)
    registry.register("r", key, 0, 64)
    session = registry.session()
    assert session is not None
    with pytest.raises(SharedMemoryError, match="shared_memory_offset 60 \\+ shared_memory_byte_size 8 = 68"):
        session.part(ShmRef("r", 60, 8), "input 'x'")
    registry.close()  # at shutdown; the failed request still holds its use until the front end releases it
    assert registry.status() == [] and _mapped(str(path))
    session.release()
    assert not _mapped(str(path))


def test_the_number_of_regions_and_the_bytes_mapped_are_capped(
    raw_segment: Callable[[int], tuple[str, Path]],
) -> None:
    key, _ = raw_segment(8192)
    registry = SharedMemoryRegistry(max_regions=2, max_bytes=6000)
    registry.register("a", key, 0, 4096)
    with pytest.raises(SharedMemoryLimitError, match="the bytes mapped would be 8192, past the limit of 6000") as info:
        registry.register("b", key, 4096, 4096)
    assert info.value.http_status == 507
    registry.register("b", key, 4096, 100)
    with pytest.raises(SharedMemoryLimitError, match="the number of regions would be 3, past the limit of 2"):
        registry.register("c", key, 0, 1)
    registry.close()
    assert registry.mapped_bytes() == 0
