"""The engines' hot path: static shapes compiled for the expected batch sizes and learnt from the shapes
calls bring (the dynamic model serving the rest), inputs handed over without a copy yet outputs that outlive the next call, and ONNX Runtime's direct
run giving what its public run gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.engines.base import EngineOptions, load_engine
from kiln.errors import InputError
from kiln.repository import Repository
from kiln.spec import InputCheck
from tests import models

from .conftest import Imported


def test_openvino_compiles_the_expected_batch_sizes_and_runs_every_other_size(cnn: Imported) -> None:
    spec = Repository(cnn.repo).spec(cnn.name)
    with load_engine("onnxruntime", cnn.version_dir, spec, EngineOptions()) as ref:
        want = ref.run({"x": cnn.x[:16]})["y"]
    with load_engine("openvino", cnn.version_dir, spec, EngineOptions(batch_sizes=(1, 4))) as e:
        assert e.static_shapes == [((1, 1, 8, 8),), ((4, 1, 8, 8),)]  # type: ignore[attr-defined]
        assert set(e.compile_s) == {"dynamic", "batch 1", "batch 4"}  # type: ignore[attr-defined]
        for n in (1, 4, 3, 16, 1):  # static, static, dynamic, dynamic, static again
            got = e.run({"x": cnn.x[:n]})["y"]
            np.testing.assert_allclose(got, want[:n], rtol=1e-4, atol=1e-5)
        e.wait_compiled(timeout_s=60)  # type: ignore[attr-defined]
        assert len(e.static_shapes) == 2  # type: ignore[attr-defined]  # batch 3 and 16 came once each
    with load_engine("openvino", cnn.version_dir, spec, EngineOptions(run={"static_shapes": False})) as e:
        for _ in range(3):
            np.testing.assert_allclose(e.run({"x": cnn.x[:2]})["y"], want[:2], rtol=1e-4, atol=1e-5)
        e.wait_compiled(timeout_s=60)  # type: ignore[attr-defined]
        assert e.static_shapes == []  # type: ignore[attr-defined]


def test_openvino_compiles_a_shape_that_comes_again_and_runs_it_there(tmp_path: Path) -> None:
    """A dynamic length (text) is compiled at the lengths calls bring, once one comes a second time; the
    dynamic model serves it meanwhile and every other shape, with the same answers."""
    root = tmp_path / "repo"
    kiln.import_model(models.seq_model(tmp_path / "seq.onnx"), root, name="seq")
    spec = Repository(root).spec("seq")
    rng = np.random.default_rng(0)
    with load_engine("openvino", root / "seq" / "1", spec, EngineOptions(batch_sizes=(1, 4))) as e:
        assert e.static_shapes == []  # type: ignore[attr-defined]  # the length is not known before calls
        for n, length in ((2, 16), (1, 24), (2, 16), (2, 16), (1, 24), (3, 40)):
            x = rng.standard_normal((n, length)).astype(np.float32)
            np.testing.assert_allclose(e.run({"x": x})["y"], x.sum(axis=1, keepdims=True) * 2, rtol=1e-5, atol=1e-5)
            e.wait_compiled(timeout_s=60)  # type: ignore[attr-defined]
        assert e.static_shapes == [((1, 24),), ((2, 16),)]  # type: ignore[attr-defined]
        assert {"shape 2x16", "shape 1x24"} <= set(e.compile_s)  # type: ignore[attr-defined]
        x = rng.standard_normal((2, 16)).astype(np.float32)  # now on the static compile
        np.testing.assert_allclose(e.run({"x": x})["y"], x.sum(axis=1, keepdims=True) * 2, rtol=1e-5, atol=1e-5)


def test_openvino_defaults_to_batch_1_and_the_preferred_sizes(cnn: Imported) -> None:
    spec = Repository(cnn.repo).spec(cnn.name)
    spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={"preferred_batch_sizes": [8]})})
    with load_engine("openvino", cnn.version_dir, spec, EngineOptions()) as e:
        assert [key[0][0] for key in e.static_shapes] == [1, 8]  # type: ignore[attr-defined]


def test_openvino_throughput_hint_runs_equal_parts_on_static_compiles_of_the_part(cnn: Imported) -> None:
    """With the THROUGHPUT hint a batch is spread over the infer requests; an even split runs on a static
    compile of the part's shape (compiled at load for the expected sizes, learnt for others), an uneven one
    on the dynamic model, with the same answers as the LATENCY engine."""
    spec = Repository(cnn.repo).spec(cnn.name)
    with load_engine("openvino", cnn.version_dir, spec, EngineOptions(run={"static_shapes": False})) as ref:
        want = ref.run({"x": cnn.x[:16]})["y"]
    options = EngineOptions(intra_op_threads=2, batch_sizes=(1, 4), run={"hint": "throughput", "num_requests": 2})
    with load_engine("openvino", cnn.version_dir, spec, options) as e:
        assert e.static_shapes == [((1, 1, 8, 8),), ((2, 1, 8, 8),)]  # type: ignore[attr-defined]  # batch 4 = 2 + 2
        for n in (4, 6, 7, 6, 7, 1):  # static parts, dynamic, dynamic (uneven), dynamic, uneven, static
            np.testing.assert_allclose(e.run({"x": cnn.x[:n]})["y"], want[:n], rtol=1e-4, atol=1e-5)
            e.wait_compiled(timeout_s=60)  # type: ignore[attr-defined]
        # batch 6 came twice: its part (3 rows) is compiled; batch 7 splits 3 + 4 and stays dynamic
        assert e.static_shapes == [((1, 1, 8, 8),), ((2, 1, 8, 8),), ((3, 1, 8, 8),)]  # type: ignore[attr-defined]
        np.testing.assert_allclose(e.run({"x": cnn.x[:6]})["y"], want[:6], rtol=1e-4, atol=1e-5)


def test_openvino_outputs_survive_the_next_call_and_inputs_of_any_layout_run(cnn: Imported) -> None:
    spec = Repository(cnn.repo).spec(cnn.name)
    with load_engine("openvino", cnn.version_dir, spec, EngineOptions(batch_sizes=(2,))) as e:
        first = e.run({"x": cnn.x[:2]})["y"]
        kept = first.copy()
        e.run({"x": cnn.x[2:4]})  # the request reuses its buffers: the first output must be a copy
        np.testing.assert_array_equal(first, kept)
        x = cnn.x[:2]
        read_only = np.frombuffer(x.tobytes(), dtype=np.float32).reshape(x.shape)  # as an HTTP body decodes
        strided = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # not C-contiguous
        wide = x.astype(np.float64)  # not the input's dtype: OpenVINO's infer converts it
        for arr in (read_only, strided, wide, x):  # x itself is shared with the request, the others are not
            np.testing.assert_allclose(e.run({"x": arr})["y"], kept, rtol=1e-5, atol=1e-6)
        assert not np.shares_memory(e.run({"x": x})["y"], x)
        shared = x.copy()
        out = e.run({"x": shared})["y"]
        shared[:] = 0  # the caller reuses its buffer: what it got back stays as it was
        np.testing.assert_allclose(out, kept, rtol=1e-5, atol=1e-6)


def test_onnxruntime_direct_run_matches_the_public_run(cnn: Imported) -> None:
    spec = Repository(cnn.repo).spec(cnn.name)
    with load_engine("onnxruntime", cnn.version_dir, spec, EngineOptions()) as e:
        assert e._fast is not None  # type: ignore[attr-defined]  # the CPU session runs past the wrapper
        public = e.session.run(None, {"x": cnn.x[:5]})[0]  # type: ignore[attr-defined]
        np.testing.assert_array_equal(e.run({"x": cnn.x[:5]})["y"], public)
        with pytest.raises(Exception, match="x"):  # the C++ run still refuses a missing input, naming it
            e.run({})


@pytest.mark.parametrize(
    "feed",
    [
        {"x": np.zeros((2, 1, 8, 8), np.float64)},  # dtype
        {"x": np.zeros((2, 8, 8), np.float32)},  # rank
        {"x": np.zeros((2, 1, 8, 9), np.float32)},  # a fixed dim
        {"x": np.zeros((2, 1, 8, 8), np.float32), "z": np.zeros(2)},  # an unknown input
        {},  # a missing input
        {"x": [[0.0]]},  # not an array
        {"x": np.zeros((40, 1, 8, 8), np.float32)},  # over max_batch
    ],
)
def test_input_check_fast_path_refuses_what_validation_refuses(cnn: Imported, feed: dict[str, object]) -> None:
    spec = Repository(cnn.repo).spec(cnn.name)
    check = InputCheck(spec)
    assert not check.passes(feed, max_batch=32)
    with pytest.raises(InputError):
        check(feed, max_batch=32)
    with pytest.raises(InputError):
        spec.validate_inputs(feed, max_batch=32)


def test_input_check_passes_what_validation_passes(cnn: Imported) -> None:
    spec = Repository(cnn.repo).spec(cnn.name)
    feed = {"x": np.zeros((3, 1, 8, 8), np.float32)}
    assert InputCheck(spec).passes(feed, max_batch=32)
    spec.validate_inputs(feed, max_batch=32)
    assert InputCheck(spec).passes(feed)
