from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

import kiln
from kiln.errors import CorruptModelError, InputError, InvalidSourceError
from tests.fixtures import onnx_models


def test_onnx_file_imports_with_spec_from_the_graph(repo: Path, tmp_path: Path) -> None:
    path = onnx_models.save(onnx_models.linear_model(), tmp_path / "linear.onnx")
    result = kiln.import_model(path, repo)
    assert result.model == "linear"
    assert [(t.name, t.dtype, t.shape) for t in result.spec.inputs] == [("x", "float32", (-1, 4))]
    assert [(t.name, t.dtype, t.shape) for t in result.spec.outputs] == [("y", "float32", (-1, 3))]
    assert result.spec.serving.max_batch_size > 0
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(kiln.load(repo, "linear").predict({"x": x})["y"], want, rtol=1e-6)


def test_external_data_is_carried_along(repo: Path, tmp_path: Path) -> None:
    path = onnx_models.save(onnx_models.linear_model(), tmp_path / "ext.onnx", external=True)
    assert (tmp_path / "ext.onnx.weights").is_file()
    result = kiln.import_model(path, repo, name="ext")
    assert set(result.manifest.artifacts) == {"model.onnx", "model.onnx.data"}
    out = kiln.load(repo, "ext").predict(np.ones((2, 4), np.float32))["y"]
    assert out.shape == (2, 3)
    # Changing the external weights is a different source: it is imported as a new version.
    data = bytearray((tmp_path / "ext.onnx.weights").read_bytes())
    data[0] ^= 0xFF
    (tmp_path / "ext.onnx.weights").write_bytes(bytes(data))
    assert kiln.import_model(path, repo, name="ext").version == 2


def test_fixed_batch_model_disables_batching(repo: Path, tmp_path: Path) -> None:
    path = onnx_models.save(onnx_models.linear_model(batch=1), tmp_path / "fixed.onnx")
    spec = kiln.import_model(path, repo).spec
    assert spec.inputs[0].shape == (1, 4)
    assert spec.serving.max_batch_size == 0
    with pytest.raises(InputError, match="dimension 0"):
        kiln.load(repo, "fixed").predict(np.ones((2, 4), np.float32))


def test_renaming_inputs_and_outputs(repo: Path, tmp_path: Path) -> None:
    path = onnx_models.save(onnx_models.linear_model(), tmp_path / "linear.onnx")
    spec = kiln.import_model(path, repo, name="renamed", input_names=["features"], output_names=["scores"]).spec
    assert (spec.inputs[0].name, spec.outputs[0].name) == ("features", "scores")
    out = kiln.load(repo, "renamed").predict({"features": np.ones((1, 4), np.float32)})
    assert set(out) == {"scores"}


def test_truncated_onnx_is_corrupt_and_named(repo: Path, tmp_path: Path) -> None:
    good = onnx_models.save(onnx_models.linear_model(), tmp_path / "good.onnx")
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CorruptModelError, match=r"truncated\.onnx"):
        kiln.import_model(bad, repo)
    assert kiln.Repository(repo).models() == []


def test_missing_and_unknown_files(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="file not found"):
        kiln.import_model(tmp_path / "nope.onnx", repo)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(InvalidSourceError, match=r"unknown model format '\.bin'"):
        kiln.import_model(other, repo)


def test_wrong_input_dtype_through_predict(repo: Path, tmp_path: Path) -> None:
    kiln.import_model(onnx_models.save(onnx_models.linear_model(), tmp_path / "linear.onnx"), repo)
    with pytest.raises(InputError, match="'x': dtype must be float32, got float64"):
        kiln.load(repo, "linear").predict(np.ones((1, 4)))


def test_torch_engine_is_refused_for_onnx_models(repo: Path, tmp_path: Path) -> None:
    kiln.import_model(onnx_models.save(onnx_models.linear_model(), tmp_path / "linear.onnx"), repo)
    with pytest.raises(kiln.KilnError, match="models imported from ONNX run on 'onnxruntime'"):
        kiln.load(repo, "linear", engine="torch")


# ---- dynamic dims besides batch: example shapes found, given, or refused in one line (issue 16) --------
def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from kiln.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_stride_32_convs_get_multiples_of_32(repo: Path, tmp_path: Path) -> None:
    # At the old 8×8 the skip Add fails ("broadcast ... 32 by 8"); kiln finds a size the strides divide.
    path = onnx_models.save(onnx_models.strided_unet(), tmp_path / "unet.onnx")
    result = kiln.import_model(path, repo)
    x = result.spec.inputs[0]
    assert x.shape == (-1, 3, -1, -1) and x.example_shape == (1, 3, 32, 32)
    assert result.notes == ["example shapes: input 'x' 1×3×32×32 (height=32, width=32 from the stride-32 convs)"]
    # stored in model.yaml, and what random inputs (bench, optimize without data) take
    assert kiln.Repository(repo).spec("unet").inputs[0].example_shape == (1, 3, 32, 32)
    stored = yaml.safe_load((repo / "unet" / "model.yaml").read_text())
    assert stored["inputs"][0]["example_shape"] == [1, 3, 32, 32] and "example_shape" not in stored["outputs"][0]
    out = kiln.load(repo, "unet").predict(np.zeros((2, 3, 64, 64), np.float32))["y"]
    assert out.shape == (2, 3, 64, 64)


def test_a_windowed_model_warms_up_and_serves_at_its_example_shape(repo: Path, tmp_path: Path) -> None:
    """The server warms a model up at its example shape (a reflect pad of 32 cannot run at length 1: the
    model would be marked failed) and answers."""
    import json
    import urllib.request

    from kiln.serving import ServerSettings
    from kiln.serving.server import ServerThread

    kiln.import_model(onnx_models.save(onnx_models.reflect_padded_signal(pad=32), tmp_path / "s.onnx"), repo, name="s")
    settings = ServerSettings(repo=repo, http_port=0, grpc_port=None, log_level="WARNING", load_mode="preload")
    with ServerThread(settings) as server:
        x = np.arange(2 * 48, dtype=np.float32).reshape(2, 48)
        body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v2/models/s/infer",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            out = json.loads(response.read())["outputs"][0]
    assert out["name"] == "y" and out["shape"][0] == 2


def test_bench_url_sends_the_example_shape_the_server_states(repo: Path, tmp_path: Path) -> None:
    """Over HTTP and gRPC the model config carries the example shape, and ``kiln bench --url`` sizes the
    window with it (at the old 8 every request failed: the pad of 32 needs a longer signal)."""
    import tritonclient.http as httpclient

    from kiln.bench import loadgen
    from kiln.serving import ServerSettings
    from kiln.serving.server import ServerThread

    kiln.import_model(onnx_models.save(onnx_models.reflect_padded_signal(pad=32), tmp_path / "s.onnx"), repo, name="s")
    example = list(kiln.Repository(repo).spec("s").inputs[0].example_shape or ())
    assert len(example) == 2 and example[1] > 32
    settings = ServerSettings(repo=repo, http_port=0, grpc_port=0, log_level="WARNING", load_mode="preload")
    with ServerThread(settings) as server:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        params = client.get_model_config("s")["parameters"]
        assert params == {"kiln.example_shape.x": {"string_value": ",".join(map(str, example))}}
        for url in (f"http://127.0.0.1:{server.http_port}", f"grpc://127.0.0.1:{server.grpc_port}"):
            result = loadgen.apply_load(url, "s", requests=6, batch=3)
            assert (result.succeeded, result.errors) == (6, {}), url
            assert result.shapes == {"x": [3, example[1]]} and result.guessed == []
    # Without an example (a model.yaml from before example shapes), the dims go at 8 and the run says so.
    kiln.import_model(onnx_models.save(onnx_models.token_embedder(), tmp_path / "t.onnx"), repo, name="t")
    path = repo / "t" / "model.yaml"
    stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    for t in stored["inputs"]:
        t.pop("example_shape", None)
    path.write_text(yaml.safe_dump(stored), encoding="utf-8")
    with ServerThread(settings.model_copy(update={"models": ["t"]})) as server:
        report = loadgen.sweep(f"http://127.0.0.1:{server.http_port}", "t", requests=2)
    names = [t["name"] for t in stored["inputs"]]
    assert report.runs[0].succeeded == 2 and report.runs[0].guessed == names
    assert all(shape[1] == 8 for shape in report.runs[0].shapes.values())
    assert any("no example shape" in w and "at 8" in w for w in report.warnings), report.warnings


def test_bench_url_refuses_example_shapes_that_do_not_fit() -> None:
    """The example comes from the server: one of another rank, contradicting a fixed dim, or absurdly
    large is not used."""
    from kiln.bench.loadgen import _fitting

    assert _fitting([1, 3, 64], [-1, 3, -1]) == [1, 3, 64]
    for bad in ([1, 64], [1, 4, 64], [1, 3, 0], [1, 3, -5], [1, 3, 1 << 40]):
        assert _fitting(bad, [-1, 3, -1]) is None, bad
    assert _fitting(None, [-1, 3, -1]) is None


def test_stride_64_skips_sizes_it_does_not_divide(repo: Path, tmp_path: Path) -> None:
    path = onnx_models.save(onnx_models.strided_unet(levels=6, dims=("N", "", "")), tmp_path / "deep.onnx")
    result = kiln.import_model(path, repo)
    assert result.spec.inputs[0].example_shape == (1, 3, 64, 64)  # unnamed NCHW dims: image sizes, stride 64
    assert "x_2=64, x_3=64 from the stride-64 convs" in result.notes[0]


def test_reflect_pad_gets_a_length_it_accepts(repo: Path, tmp_path: Path) -> None:
    # At 8: "Pad reflect: pre-pad (32) exceeds maximum allowed (7)".
    path = onnx_models.save(onnx_models.reflect_padded_signal(pad=32), tmp_path / "stft.onnx")
    result = kiln.import_model(path, repo)
    assert result.spec.inputs[0].example_shape == (1, 40)
    assert result.notes == ["example shapes: input 'x' 1×40 (n=40 as a reflect Pad of 32 needs at least 33)"]


def test_named_sequence_dim_is_shared_by_the_inputs_that_name_it(repo: Path, tmp_path: Path) -> None:
    path = onnx_models.save(onnx_models.token_embedder(max_len=128), tmp_path / "enc.onnx")
    spec = kiln.import_model(path, repo).spec
    assert [t.example_shape for t in spec.inputs] == [(1, 16), (1, 16)]
    # --dim overrides (a new version: other example shapes), and one size beyond the table is refused
    again = kiln.import_model(path, repo, dims={"seq": 128})
    assert again.version == 2 and [t.example_shape for t in again.spec.inputs] == [(1, 128), (1, 128)]
    with pytest.raises(InvalidSourceError, match=r"cannot run it at seq=200 \(from --dim\): Add node: .*broadcast"):
        kiln.import_model(path, repo, dims={"seq": 200})


def test_input_shape_sizes_an_onnx_model(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = onnx_models.save(onnx_models.strided_unet(), tmp_path / "unet.onnx")
    code, out, _ = _cli(["import", str(path), "--repo", str(repo), "--input-shape", "4,3,320,224"], capsys)
    assert code == 0 and "example shapes: input 'x' 1×3×320×224 (height=320, width=224 from --input-shape)" in out
    code, out, _ = _cli(["import", str(path), "--repo", str(repo), "--dim", "height=64", "--dim", "width=96"], capsys)
    assert code == 0 and "1×3×64×96 (height=64, width=96 from --dim)" in out
    assert kiln.Repository(repo).spec("unet").inputs[0].example_shape == (1, 3, 64, 96)


def test_impossible_sizes_fail_in_one_line_naming_dims_sizes_and_flags(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = onnx_models.save(onnx_models.fixed_size_bias(size=100), tmp_path / "model.onnx")
    code, _, err = _cli(["import", str(path), "--repo", str(repo)], capsys)
    line = _one_error_line(code, err)
    assert (
        f"{path}: could not find sizes for the dynamic dims height, width (tried 32, 64, 224, 320, 640): pass "
        "--dim height=SIZE --dim width=SIZE or --input-shape 1,3,H,W; ONNX Runtime's last error: Add node: "
        "Attempting to broadcast an axis by a dimension other than 1. 100 by 640"
    ) in line
    assert "[E:onnxruntime" not in err and "element_wise_ops" not in err  # ONNX Runtime's own log stays quiet
    assert kiln.Repository(repo).models() == []
    code, out, _ = _cli(["import", str(path), "--repo", str(repo), "--input-shape", "1,3,100,100"], capsys)
    assert code == 0 and "1×3×100×100" in out


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--dim", "height"], ("--dim 'height'", "NAME=SIZE", "--dim seq=128")),
        (["--dim", "height=0"], ("--dim 'height=0'", "positive size")),
        (["--dim", "height=big"], ("--dim 'height=big'",)),
        (["--dim", "height=32", "--dim", "height=64"], ("--dim height is given twice", "32", "64")),
        (["--dim", "N=4"], ("--dim N=4", "'N' is the batch dim")),
        (
            ["--dim", "depth=3"],
            ("--dim depth=3", "no dynamic dim 'depth'", "its dynamic dims besides batch are height, width"),
        ),
        (["--input-shape", "1,3,32"], ("--input-shape 1,3,32", "3 dims", "the input has 4 (N×3×height×width)")),
        (["--input-shape", "1,4,32,32"], ("axis 1 is fixed at 3, not 4",)),
        (["--input-shape", "1,3,32,32", "--input-shape", "1,3,32,32"], ("given 2 time(s)", "1 input(s) (x)")),
        (["--input-shape", "1,3,64,64", "--dim", "height=32"], ("--dim height=32 disagrees with --input-shape",)),
    ],
)
def test_bad_dim_and_shape_flags_are_one_line(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], fragments: tuple[str, ...]
) -> None:
    path = onnx_models.save(onnx_models.strided_unet(levels=1), tmp_path / "unet.onnx")
    line = _one_error_line(*_cli(["import", str(path), "--repo", str(repo), *flags], capsys)[::2])
    for fragment in fragments:
        assert fragment in line, line


def test_bench_and_optimize_without_data_use_and_say_the_example_shapes(repo: Path, tmp_path: Path) -> None:
    from kiln.bench.config import BenchConfig
    from kiln.optimize.data import load_split

    kiln.import_model(onnx_models.save(onnx_models.strided_unet(), tmp_path / "unet.onnx"), repo)
    spec = kiln.Repository(repo).spec("unet")
    split = load_split(spec, None, "unet.onnx", 8, 100)
    assert split.validation.inputs["x"].shape == (64, 3, 32, 32)
    said = "inputs are random, at the example shapes chosen at import: input 'x' N×3×32×32 (N: the batch size)"
    assert any(n.startswith(said) for n in split.notes)
    config = BenchConfig(batch_sizes=[1, 2], min_time_s=0.01, min_iters=2, repeats=1, variants=["reference"],
                         scenarios=["single-stream"])  # fmt: skip
    result = kiln.bench(repo, "unet", config)  # it ran: at 8×8 the model fails
    assert [b.batch for b in result.variants[0].batches] == [1, 2]
    assert any(w.startswith(said) for w in result.warnings)
