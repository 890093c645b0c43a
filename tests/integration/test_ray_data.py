"""`kiln predict --ray` on a real two-node local Ray cluster: the same JSON lines as the local path, bad
files reported and skipped, and one clear line when Ray is not installed."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kiln
from tests.fixtures.processing import IMAGE_POST, IMAGE_PRE, gradient_image, png_bytes
from tests.integration.test_cli import run
from tests.ray_cluster import local_cluster

if importlib.util.find_spec("ray") is None:  # not imported here: RAY_AUTH_MODE is read at `import ray`
    pytest.skip("ray is not installed (kiln[ray])", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    """A head and one more node on 127.0.0.1, one CPU each, in a private network namespace."""
    with local_cluster(nodes=2, cpus_per_node=1) as cluster:
        yield str(cluster.address)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("ray-data") / "repo"
    kiln.import_model(
        "tests.fixtures.tiny_models:tiny_classifier", repo, name="cls", input_shapes=[(1, 3, 8, 8)],
        task="classification", labels=["a", "b", "c"], preprocess=IMAGE_PRE, postprocess=IMAGE_POST,
    )  # fmt: skip
    kiln.import_model("tests.fixtures.tiny_models:mlp", repo, name="mlp", input_shapes=[(1, 4)])
    return repo


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same(ray_recs: list[dict[str, Any]], local_recs: list[dict[str, Any]]) -> None:
    assert [list(r) for r in ray_recs] == [list(r) for r in local_recs]  # same keys, same order
    for got, want in zip(ray_recs, local_recs, strict=True):
        assert got["input"] == want["input"]
        if "error" in want:
            assert _no_addresses(got["error"]) == _no_addresses(want["error"])
        else:
            _close(got["output"], want["output"])


def _no_addresses(text: str) -> str:
    """An error without object addresses (Pillow names the BytesIO it could not read)."""
    return re.sub(r"0x[0-9a-fA-F]+", "0x?", text)


def _close(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _close(got[k], want[k])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _close(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    else:
        assert got == want


def test_images_match_the_local_path_and_bad_files_are_skipped(
    cluster_address: str, models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(8, 8), (16, 12), (5, 9), (8, 8), (30, 30), (9, 7), (12, 12)]
    for i, (h, w) in enumerate(sizes):
        (folder / f"img{i}.png").write_bytes(png_bytes(gradient_image(h, w)))
    (folder / "img2_broken.png").write_bytes(b"\x89PNG but not really")
    missing = tmp_path / "gone.png"
    common = ["predict", "cls", str(folder), str(missing), "--repo", str(models), "--batch-size", "3"]
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert run([*common, "-o", str(local_out)], capsys)[0] == 1
    code, _, err = run(
        [*common, "-o", str(ray_out), "--ray", "--ray-address", cluster_address, "--concurrency", "1"], capsys
    )
    assert code == 1, err  # some inputs failed, the others came out
    recs = lines(ray_out)
    assert [Path(r["input"]).name for r in recs] == [
        "img0.png", "img1.png", "img2.png", "img2_broken.png", "img3.png", "img4.png", "img5.png", "img6.png",
        "gone.png",
    ]  # fmt: skip
    assert "cannot decode the image" in recs[3]["error"] and "no such file" in recs[8]["error"]
    assert "skipped" in err and "img2_broken.png" in err and "gone.png" in err
    assert "7 predictions" in err and "2 failed" in err
    assert_same(recs, lines(local_out))


def test_npy_rows_and_a_bad_shape_match_the_local_path(
    cluster_address: str, models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "arrays"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "a_one.npy", rng.standard_normal(4).astype(np.float32))
    np.save(data / "b_many.npy", rng.standard_normal((5, 4)))
    np.save(data / "c_bad.npy", np.zeros(5, np.float32))
    (data / "d_pickle.npy").write_bytes(b"not numpy")
    np.save(data / "e_last.npy", rng.standard_normal(4).astype(np.float32))
    common = ["predict", "mlp", str(data), "--repo", str(models), "--batch-size", "2"]
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert run([*common, "-o", str(local_out)], capsys)[0] == 1
    code, _, err = run([*common, "-o", str(ray_out), "--ray-address", cluster_address], capsys)
    assert code == 1, err
    recs = lines(ray_out)
    assert [Path(r["input"]).name for r in recs] == [
        "a_one.npy", "b_many.npy[0]", "b_many.npy[1]", "b_many.npy[2]", "b_many.npy[3]", "b_many.npy[4]",
        "c_bad.npy", "d_pickle.npy", "e_last.npy",
    ]  # fmt: skip
    assert "must have shape [4]" in recs[6]["error"] and "not a readable .npy" in recs[7]["error"]
    assert "7 predictions" in err and "2 failed" in err
    assert_same(recs, lines(local_out))


def test_a_missing_model_is_one_line_before_the_cluster_runs(
    cluster_address: str, models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        ["predict", "nope", str(tmp_path), "--repo", str(models), "--ray-address", cluster_address], capsys
    )
    assert code == 2 and len([ln for ln in err.splitlines() if ln.strip()]) == 1, err


def test_without_ray_installed_it_is_exit_2_naming_the_extra(models: Path, tmp_path: Path) -> None:
    img = tmp_path / "one.png"
    img.write_bytes(png_bytes(gradient_image(8, 8)))
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "from kiln.cli import main\n"
        f"main(['predict', 'cls', {str(img)!r}, '--repo', {str(models)!r}, '--ray'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines_ = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines_) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "kiln predict --ray" in lines_[0] and "ray[serve,data]" in lines_[0] and "[ray]" in lines_[0]
