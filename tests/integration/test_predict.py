"""`kiln predict` over real files: images, text, arrays; order, batching, bad files, JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kiln
import kiln.predictor
from kiln.processing import Pipeline
from tests.fixtures import tiny_models
from tests.fixtures.processing import IMAGE_POST, IMAGE_PRE, WORDS, gradient_image, png_bytes, word_tokenizer
from tests.integration.test_cli import assert_one_line_error, run


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def image_repo(repo: Path) -> Path:
    kiln.import_model(
        "tests.fixtures.tiny_models:tiny_classifier", repo, name="cls", input_shapes=[(1, 3, 8, 8)],
        task="classification", labels=["a", "b", "c"], preprocess=IMAGE_PRE, postprocess=IMAGE_POST,
    )  # fmt: skip
    return repo


def test_images_in_order_with_bad_files_reported_and_skipped(
    image_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(8, 8), (16, 12), (5, 9), (8, 8), (30, 30)]
    for i, (h, w) in enumerate(sizes):
        (folder / f"img{i}.png").write_bytes(png_bytes(gradient_image(h, w)))
    (folder / "img2_broken.png").write_bytes(b"\x89PNG but not really")
    (folder / "notes.md").write_text("not an input: folders yield known file types only")
    missing = tmp_path / "gone.png"
    out = tmp_path / "out.jsonl"
    code, _, err = run(
        ["predict", "cls", str(folder), str(missing), "--repo", str(image_repo), "-o", str(out), "--batch-size", "2"],
        capsys,
    )
    assert code == 1  # some inputs failed
    recs = records(out)
    assert [Path(r["input"]).name for r in recs] == [
        "img0.png", "img1.png", "img2.png", "img2_broken.png", "img3.png", "img4.png", "gone.png",
    ]  # fmt: skip
    assert "cannot decode the image" in recs[3]["error"] and "no such file" in recs[6]["error"]
    assert "skipped" in err and "img2_broken.png" in err and "gone.png" in err
    assert "5 predictions" in err and "2 failed" in err

    pipe = Pipeline.from_spec(kiln.Repository(image_repo).spec("cls"))
    model = tiny_models.tiny_classifier().eval()
    for rec, (h, w) in zip([r for r in recs if "output" in r], sizes, strict=True):
        x = pipe.preprocess([png_bytes(gradient_image(h, w))]).inputs["image"]
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(x)), dim=1)[0].numpy()
        top = np.argsort(-probs)[:2]
        assert [p["label"] for p in rec["output"]] == [["a", "b", "c"][i] for i in top]
        assert [p["score"] for p in rec["output"]] == pytest.approx(probs[top].tolist(), abs=1e-5)


def test_results_go_to_stdout_by_default(image_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "one.png"
    img.write_bytes(png_bytes(gradient_image(8, 8)))
    code, out, _ = run(["predict", "cls", str(img), "--repo", str(image_repo)], capsys)
    assert code == 0
    (rec,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rec["input"] == str(img) and len(rec["output"]) == 2


def test_text_file_one_sentence_a_line_with_mean_pooling(repo: Path, tmp_path: Path) -> None:
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    kiln.import_model(
        "tests.fixtures.tiny_models:token_embedder", repo, name="emb", input_shapes=[(1, 6), (1, 6)],
        input_dtypes=["int64", "int64"], dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}},
        assets=[tok], preprocess=[{"op": "tokenize", "args": {"tokenizer": "tokenizer.json", "buckets": [4, 8]}}],
        postprocess=[{"op": "mean_pool"}],
    )  # fmt: skip
    tok.unlink()  # the version holds its own copy: the spec names it relative to the version directory
    assert (repo / "emb" / "1" / "tokenizer.json").is_file()
    assert "tokenizer.json" in kiln.Repository(repo).manifest("emb").artifacts
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("the kiln fires clay\nhot pots\n\nclay pots cool slowly in the kiln\n")
    out = tmp_path / "emb.jsonl"
    assert kiln_main(["predict", "emb", str(sentences), "--repo", str(repo), "-o", str(out), "--batch-size", "2"]) == 0
    recs = records(out)
    assert [r["input"] for r in recs] == [f"{sentences}:1", f"{sentences}:2", f"{sentences}:4"]
    weights = tiny_models.token_embedder().emb.weight.detach().numpy()
    for rec, text in zip(recs, ["the kiln fires clay", "hot pots", "clay pots cool slowly in the kiln"], strict=True):
        ids = [WORDS.index(w) if w in WORDS else WORDS.index("[UNK]") for w in text.split()]
        want = weights[ids].mean(axis=0)
        np.testing.assert_allclose(rec["output"]["output"], want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)


def test_text_of_mixed_lengths_is_batched_by_length_and_written_in_input_order(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kiln predict`` groups sentences of similar length into a batch and pads it to the default
    buckets (at most 1.25x its longest sentence); the JSONL keeps the input order, and each output equals
    its sentence run alone at its exact length."""
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    kiln.import_model(
        "tests.fixtures.tiny_models:token_embedder", repo, name="emb", input_shapes=[(1, 6), (1, 6)],
        input_dtypes=["int64", "int64"], dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}},
        assets=[tok], preprocess=[{"op": "tokenize", "args": {"tokenizer": "tokenizer.json"}}],
        postprocess=[{"op": "mean_pool"}],
    )  # fmt: skip
    counts = [3, 27, 1, 14, 9, 30, 2, 17, 8, 22, 5, 11, 19, 4, 25, 6]
    vocabulary = [*WORDS[2:], "glaze"]  # one word the tokenizer does not know: [UNK]
    texts = [" ".join(vocabulary[(n * 7 + i) % len(vocabulary)] for i in range(n)) for n in counts]
    sentences = tmp_path / "mixed.txt"
    sentences.write_text("\n".join(texts) + "\n")

    batches: list[tuple[list[int], int]] = []  # each engine call's token counts and padded length
    real_load = kiln.predictor.load

    def recording_load(*args: Any, **kwargs: Any) -> kiln.predictor.Predictor:
        predictor = real_load(*args, **kwargs)
        predict = predictor.predict

        def run(feed: Any) -> dict[str, np.ndarray]:
            batches.append((feed["attention_mask"].sum(axis=1).tolist(), feed["input_ids"].shape[1]))
            return predict(feed)

        predictor.predict = run  # type: ignore[method-assign]
        return predictor

    monkeypatch.setattr(kiln.predictor, "load", recording_load)
    out = tmp_path / "emb.jsonl"
    assert kiln_main(["predict", "emb", str(sentences), "--repo", str(repo), "-o", str(out), "--batch-size", "4"]) == 0
    recs = records(out)
    assert [r["input"] for r in recs] == [f"{sentences}:{i}" for i in range(1, len(texts) + 1)]

    assert sorted(n for rows, _ in batches for n in rows) == sorted(counts) and len(batches) == 4
    assert [sorted(rows) for rows, _ in batches] == [sorted(counts)[k : k + 4] for k in range(0, 16, 4)]
    for rows, padded in batches:
        assert max(rows) <= padded <= 1.25 * max(rows), (rows, padded)

    with real_load(kiln.Repository(repo), "emb") as predictor:
        pipe = Pipeline.from_spec(predictor.spec, root=repo / "emb" / "1")
        for rec, text, n in zip(recs, texts, counts, strict=True):
            ids = np.array([[WORDS.index(w) if w in WORDS else WORDS.index("[UNK]") for w in text.split()]])
            assert ids.shape == (1, n)
            alone = pipe.postprocess(predictor.predict({"input_ids": ids, "attention_mask": np.ones_like(ids)}))
            np.testing.assert_allclose(rec["output"]["output"], alone[0]["output"], rtol=1e-5, atol=1e-6)


def kiln_main(argv: list[str]) -> int:
    from kiln.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_npy_files_one_instance_or_a_batch_and_a_bad_shape(repo: Path, tmp_path: Path) -> None:
    kiln.import_model("tests.fixtures.tiny_models:mlp", repo, name="mlp", input_shapes=[(1, 4)])
    rng = np.random.default_rng(0)
    one, many = rng.standard_normal(4).astype(np.float32), rng.standard_normal((3, 4))  # float64 is cast
    np.save(tmp_path / "a_one.npy", one)
    np.save(tmp_path / "b_many.npy", many)
    np.save(tmp_path / "c_bad.npy", np.zeros(5, np.float32))
    (tmp_path / "d_pickle.npy").write_bytes(b"not numpy")
    out = tmp_path / "out.jsonl"
    assert kiln_main(["predict", "mlp", str(tmp_path), "--repo", str(repo), "-o", str(out)]) == 1
    recs = records(out)
    assert [Path(r["input"]).name for r in recs] == [
        "a_one.npy", "b_many.npy[0]", "b_many.npy[1]", "b_many.npy[2]", "c_bad.npy", "d_pickle.npy",
    ]  # fmt: skip
    with torch.inference_mode():
        want = tiny_models.mlp().eval()(torch.from_numpy(np.vstack([one, many]).astype(np.float32))).numpy()
    got = np.array([r["output"]["output"] for r in recs[:4]])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert "must have shape [4]" in recs[4]["error"]
    assert "not a readable .npy" in recs[5]["error"]


def test_images_for_a_model_without_preprocessing_is_a_one_line_error(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kiln.import_model("tests.fixtures.tiny_models:mlp", repo, name="mlp", input_shapes=[(1, 4)])
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes(gradient_image(4, 4)))
    code, _, err = run(["predict", "mlp", str(img), "--repo", str(repo)], capsys)
    assert_one_line_error(code, err, "declares no pre-processing", "preprocess steps")
