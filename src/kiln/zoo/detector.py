"""A DAMO-YOLO-style object detector that kiln trains offline on shapes it draws itself, in two sizes.

The data: circles, squares and triangles on noisy gradient backgrounds, with exact boxes, generated
from a fixed seed (nothing is downloaded). The model: a CSP backbone, a PAN-style neck and an
anchor-free head per level (class logits trained with Quality Focal Loss on the IoU, ltrb distances
trained with GIoU loss, as in DAMO-YOLO's ZeroHead, without the distribution regression). Trained
weights are cached as safetensors under the kiln cache, keyed by the recipe, with the validation
mAP@0.5 in their metadata, so each size is trained once per machine.

:data:`SIZES` holds the two sizes of the same architecture:

- ``small`` (:func:`build_model`): 64 px, 0.17 M parameters, about 0.2 ms per image in ONNX Runtime;
  trains in about 25 s on 2 idle cores.
- ``large`` (:func:`build_large_model`): 256 px, twice the channels, 4-14 shapes per image, about
  3 ms per image: big enough that structured pruning and int8 have real work to remove. It trains on
  128 px images of the same scenes (the network is fully convolutional, so it runs at 256 px
  unchanged, and a training step costs a quarter) in about 2 minutes on 2 idle cores.

When other processes keep both cores busy, two training threads slow to a crawl (both sizes, by 5-10x);
``OMP_NUM_THREADS=1`` then trains faster.

Import it like any PyTorch model; each size's ``preprocess`` and ``postprocess`` are the processing
steps to write into its spec (:data:`PREPROCESS` and :data:`POSTPROCESS` for the small one), so
``kiln predict`` turns PNG files into labelled boxes::

    size = SIZES["large"]
    kiln.import_model(size.factory, repo, name="shapes", weights=train(size="large").weights,
                      input_shapes=[size.input_shape], task="detection", labels=LABELS,
                      preprocess=size.preprocess, postprocess=size.postprocess)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from kiln.errors import KilnError
from kiln.zoo import _cache

SizeName = Literal["small", "large"]
INPUT_NAME = "image"
LABELS = ["circle", "square", "triangle"]
STRIDES = (8, 16)
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
Split = tuple[dict[str, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DetectorSize:
    """One size of the detector: its widths, its input size and the training recipe (its cache key).

    ``widths`` are the backbone's (stem, stem, /8 stage, /16 stage) channels, ``neck`` the PAN's and
    ``head`` each head's hidden channels; the recipe's ``arch`` names them, so changing them changes
    the cache key (a unit test holds the two together).
    """

    name: SizeName
    factory: str
    image_size: int
    widths: tuple[int, int, int, int]
    neck: int
    head: int
    max_detections: int
    recipe: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.image_size, self.image_size)

    @property
    def train_image_size(self) -> int:
        """The size of the images it trains on (smaller than its input for the large one: 4x cheaper)."""
        return int(self.recipe.get("train_image_size", self.image_size))

    @property
    def preprocess(self) -> list[dict[str, Any]]:
        return [
            {"op": "decode_image", "args": {"mode": "RGB"}},
            {"op": "letterbox", "args": {"size": [self.image_size, self.image_size], "fill": 114}},
            {"op": "normalize", "args": {"mean": list(MEAN), "std": list(STD)}},
            {"op": "hwc_to_chw"},
        ]

    @property
    def postprocess(self) -> list[dict[str, Any]]:
        return [
            {"op": "yolo_decode", "args": {"strides": list(STRIDES)}},
            {"op": "score_threshold", "args": {"threshold": 0.25}},
            {"op": "nms", "args": {"iou_threshold": 0.5, "max_detections": self.max_detections}},
            {"op": "scale_boxes"},
        ]


SMALL = DetectorSize(
    name="small", factory="kiln.zoo.detector:build_model", image_size=64, widths=(12, 24, 48, 64), neck=48,
    head=32, max_detections=20,
    recipe={  # any change gives a new cache key
        "arch": "csp12-24-48-64/pan48/anchor-free-qfl-giou/v2", "seed": 0, "train_images": 2400, "val_images": 300,
        "epochs": 6, "batch_size": 32, "lr": 5e-3, "sizes": [12, 28], "weight_decay": 5e-4, "center_radius": 1.5,
    },
)  # fmt: skip
LARGE = DetectorSize(
    name="large", factory="kiln.zoo.detector:build_large_model", image_size=256, widths=(24, 48, 96, 128), neck=96,
    head=64, max_detections=50,
    recipe={
        "arch": "csp24-48-96-128/pan96-head64/anchor-free-qfl-giou/v1", "seed": 0, "train_images": 3000,
        "train_image_size": 128, "train_shapes": [1, 4], "val_images": 200, "shapes": [4, 14], "epochs": 6,
        "batch_size": 32, "lr": 4e-3, "sizes": [16, 40], "weight_decay": 5e-4, "center_radius": 1.5,
    },
)  # fmt: skip
SIZES: dict[str, DetectorSize] = {"small": SMALL, "large": LARGE}

# The small size, as the names ``kiln import`` examples and tests have always used.
FACTORY = SMALL.factory
IMAGE_SIZE = SMALL.image_size
INPUT_SHAPE = SMALL.input_shape
RECIPE = SMALL.recipe
PREPROCESS = SMALL.preprocess
POSTPROCESS = SMALL.postprocess


def get_size(size: SizeName | DetectorSize) -> DetectorSize:
    if isinstance(size, DetectorSize):
        return size
    if size not in SIZES:
        raise KilnError(f"unknown detector size {size!r}; the sizes are {sorted(SIZES)}")
    return SIZES[size]


# ---- the model ----------------------------------------------------------------------------------------
def build_model() -> Any:
    """The untrained small detector (the factory ``kiln import`` calls). Input: normalized RGB, NCHW."""
    return _build(SMALL)


def build_large_model() -> Any:
    """The untrained large detector (256 px, twice the channels): the same architecture, wider."""
    return _build(LARGE)


def _build(size: DetectorSize) -> Any:
    import torch
    from torch import nn
    from torch.nn import functional as F

    def conv(c_in: int, c_out: int, k: int = 3, s: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    class Bottleneck(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.body = nn.Sequential(conv(c, c, 3), conv(c, c, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    class CSP(nn.Module):
        """Cross Stage Partial block: half the channels go through the bottlenecks, half skip them."""

        def __init__(self, c_in: int, c_out: int, n: int = 1) -> None:
            super().__init__()
            h = c_out // 2
            self.main, self.skip = conv(c_in, h, 1), conv(c_in, h, 1)
            self.blocks = nn.Sequential(*(Bottleneck(h) for _ in range(n)))
            self.fuse = conv(2 * h, c_out, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fuse(torch.cat([self.blocks(self.main(x)), self.skip(x)], dim=1))

    class Head(nn.Module):
        def __init__(self, c: int, hidden: int, num_classes: int) -> None:
            super().__init__()
            self.stem = conv(c, hidden, 3)
            self.cls = nn.Conv2d(hidden, num_classes, 1)
            self.reg = nn.Conv2d(hidden, 4, 1)
            nn.init.constant_(cast(torch.Tensor, self.cls.bias), -4.6)  # prior 0.01: few anchors hold objects
            nn.init.constant_(cast(torch.Tensor, self.reg.bias), 0.5)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.stem(x)
            return self.cls(h).flatten(2).transpose(1, 2), F.softplus(self.reg(h)).flatten(2).transpose(1, 2)

    class ShapesDetector(nn.Module):
        def __init__(self, num_classes: int = len(LABELS)) -> None:
            super().__init__()
            w1, w2, w3, w4 = size.widths
            neck, head = size.neck, size.head
            self.stem = nn.Sequential(conv(3, w1, 3, 2), conv(w1, w2, 3, 2))  # /4
            self.c3 = nn.Sequential(conv(w2, w3, 3, 2), CSP(w3, w3))  # /8
            self.c4 = nn.Sequential(conv(w3, w4, 3, 2), CSP(w4, w4))  # /16
            self.lateral = conv(w4, neck, 1)
            self.top_down = CSP(neck + w3, neck)
            self.down = conv(neck, neck, 3, 2)
            self.bottom_up = CSP(2 * neck, neck)
            self.heads = nn.ModuleList([Head(neck, head, num_classes), Head(neck, head, num_classes)])

        def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
            c3 = self.c3(self.stem(image))
            c4 = self.c4(c3)
            p4 = self.lateral(c4)
            p3 = self.top_down(torch.cat([F.interpolate(p4, size=c3.shape[-2:], mode="nearest"), c3], dim=1))
            n4 = self.bottom_up(torch.cat([self.down(p3), p4], dim=1))
            outs = [head(x) for head, x in zip(self.heads, (p3, n4), strict=True)]
            return {"scores": torch.cat([o[0] for o in outs], dim=1), "boxes": torch.cat([o[1] for o in outs], dim=1)}

    return ShapesDetector()


# ---- the data -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapesData:
    images: np.ndarray  # [N, H, W, 3] uint8
    boxes: list[np.ndarray]  # per image [K, 5]: x1, y1, x2, y2, class_id

    def ground_truth(self) -> list[list[dict[str, Any]]]:
        return [[{"box": b[:4].tolist(), "class_id": int(b[4])} for b in bs] for bs in self.boxes]


def draw_image(
    rng: np.random.Generator,
    image_size: int = IMAGE_SIZE,
    shapes: tuple[int, int] = (1, 4),
    sizes: tuple[int, int] = (12, 28),
) -> tuple[np.ndarray, np.ndarray]:
    """One noisy image with ``shapes`` (inclusive range) shapes of ``sizes`` px and their boxes ``[K, 5]``
    (x1, y1, x2, y2, class_id); a shape that finds no place overlapping the others by under 0.2 IoU
    after 20 tries is left out."""
    from PIL import Image, ImageDraw

    base = rng.uniform(40, 215, size=3)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / image_size
    gx, gy = rng.uniform(-40, 40, size=2)
    bg = base[None, None, :] + (gx * xx + gy * yy)[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    boxes: list[list[float]] = []
    for _ in range(int(rng.integers(shapes[0], shapes[1] + 1))):
        for _attempt in range(20):
            s = int(rng.integers(sizes[0], sizes[1] + 1))
            x0, y0 = (int(v) for v in rng.integers(0, image_size - s, size=2))
            box = [x0, y0, x0 + s, y0 + s]
            if all(_overlap(box, b) < 0.2 for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, len(LABELS)))
        color = rng.uniform(0, 255, size=3)
        while np.abs(color - base).max() < 80:
            color = rng.uniform(0, 255, size=3)
        fill = tuple(int(c) for c in color)
        x1, y1 = x0 + s - 1, y0 + s - 1
        if cls == 0:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif cls == 1:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([(x0 + (s - 1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        boxes.append([*box, cls])
    noise = rng.normal(0, rng.uniform(4, 16), size=(image_size, image_size, 3))
    noisy = np.asarray(img, dtype=np.float32) + noise
    return np.clip(noisy, 0, 255).astype(np.uint8), np.asarray(boxes, dtype=np.float32).reshape(-1, 5)


def _overlap(a: list[int], b: list[float]) -> float:
    from kiln.task_metrics import box_iou

    return float(box_iou(np.asarray(a[:4]), np.asarray(b[:4]))[0, 0])


def make_data(n: int, seed: int, size: SizeName | DetectorSize = "small") -> ShapesData:
    """``n`` images at the size's input resolution, with its number and sizes of shapes."""
    spec = get_size(size)
    return _draw(n, seed, spec.image_size, tuple(spec.recipe.get("shapes", (1, 4))), tuple(spec.recipe["sizes"]))


def _draw(n: int, seed: int, image_size: int, shapes: tuple[int, ...], sizes: tuple[int, ...]) -> ShapesData:
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for _ in range(n):
        img, b = draw_image(rng, image_size, (shapes[0], shapes[1]), (sizes[0], sizes[1]))
        images.append(img)
        boxes.append(b)
    return ShapesData(np.stack(images), boxes)


def training_images(size: SizeName | DetectorSize = "small", n: int | None = None) -> ShapesData:
    """The images the size trains on: at ``train_image_size``, the recipe's seed (the first ``n``)."""
    spec = get_size(size)
    r = spec.recipe
    shapes = r.get("train_shapes", r.get("shapes", (1, 4)))
    return _draw(r["train_images"] if n is None else n, r["seed"], spec.train_image_size, shapes, r["sizes"])


def val_data(size: SizeName | DetectorSize = "small") -> ShapesData:
    """The validation split (its own seed, so it never overlaps the training images)."""
    spec = get_size(size)
    return make_data(spec.recipe["val_images"], spec.recipe["seed"] + 1, spec)


def write_pngs(data: ShapesData, directory: Path) -> list[Path]:
    """Save images as PNG files (``000000.png`` …) plus ``ground_truth.json``; returns the image paths."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(data.images):
        path = directory / f"{i:06d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    truth = {p.name: gt for p, gt in zip(paths, data.ground_truth(), strict=True)}
    (directory / "ground_truth.json").write_text(json.dumps(truth))
    return paths


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images -> the model's normalized NCHW float32 input (what PREPROCESS computes)."""
    x = (images.astype(np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def _split(data: ShapesData) -> Split:
    from kiln.task_metrics import pad_boxes

    return {INPUT_NAME: to_input(data.images)}, pad_boxes(data.boxes)


def optimize_data(calibration_images: int = 128) -> tuple[Split, Split]:
    """``(calibration, validation)`` for ``kiln optimize``: calibrate on training images, hold the
    budget on the validation split's mAP@0.5 (its boxes padded to ``[N, M, 5]`` as ``labels``)."""
    return _split(training_images(SMALL, calibration_images)), _split(val_data(SMALL))


def large_optimize_data(calibration_images: int = 128) -> tuple[Split, Split]:
    """:func:`optimize_data` for the large size. It trains on 128 px images, but the optimizer feeds
    its 256 px input, so calibration draws 256 px images from the training seed (the validation
    split has its own)."""
    return _split(make_data(calibration_images, LARGE.recipe["seed"], LARGE)), _split(val_data(LARGE))


def train_data() -> Split:
    """The small size's training split as ``(inputs, labels)`` (boxes padded to ``[N, M, 5]``), for the
    passes that fine-tune (distillation, quantization-aware training)."""
    return _split(training_images(SMALL))


def large_train_data(images: int = 1024) -> Split:
    """The large size's fine-tuning split: ``images`` 256 px images from the training seed (800 MB as
    float32; with 384 a 65 % pruned model stopped improving at mAP@0.5 −0.022, short of the −0.02 budget)."""
    return _split(make_data(images, LARGE.recipe["seed"], LARGE))


# ---- training -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainedDetector:
    weights: Path
    val_map50: float
    train_seconds: float
    cached: bool


def recipe_key(size: SizeName | DetectorSize = "small") -> str:
    return _cache.recipe_key(get_size(size).recipe)


def weights_path(
    cache_dir: Path | None = None, *, size: SizeName | DetectorSize = "small", overrides: dict[str, Any] | None = None
) -> Path:
    spec = get_size(size)
    stem = "shapes-detector" if spec is SMALL else f"shapes-detector-{spec.name}"
    return _cache.trained_weights_path(stem, {**spec.recipe, **(overrides or {})}, cache_dir)


def predict_boxes(
    model: Any, images: np.ndarray, batch_size: int = 64, *, size: SizeName | DetectorSize = "small"
) -> list[list[dict[str, Any]]]:
    """Detections for uint8 NHWC images, through the same decode/threshold/NMS steps as the size's
    ``postprocess``."""
    import torch

    from kiln.processing.detection import batched_nms, decode

    post = get_size(size).postprocess
    thr, nms_args = post[1]["args"]["threshold"], post[2]["args"]
    height, width = images.shape[1:3]
    out: list[list[dict[str, Any]]] = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            res = model(torch.from_numpy(to_input(images[i : i + batch_size])))
            for d in decode(res["scores"].numpy(), res["boxes"].numpy(), height, width, STRIDES):
                d = d.select(np.nonzero(d.scores >= thr)[0])
                d = d.select(batched_nms(d.boxes, d.scores, d.class_ids, nms_args["iou_threshold"]))
                out.append(d.select(np.arange(min(len(d.scores), nms_args["max_detections"]))).to_json())
    return out


def evaluate(model: Any, data: ShapesData, size: SizeName | DetectorSize = "small") -> float:
    from kiln.task_metrics import map50

    return map50(predict_boxes(model, data.images, size=size), data.ground_truth())


def train(
    cache_dir: Path | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    *,
    size: SizeName | DetectorSize = "small",
    overrides: dict[str, Any] | None = None,
) -> TrainedDetector:
    """Train (or reuse the cached) detector of the given size; ``progress(epoch, epochs)`` is called per
    epoch. ``overrides`` change recipe entries (a short schedule for a test: ``{"epochs": 1, ...}``):
    they are part of the cache key, so such weights never stand in for the recipe's own."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = get_size(size)
    recipe = {**base.recipe, **(overrides or {})}
    spec = base if recipe == base.recipe else replace(base, recipe=recipe)
    path = weights_path(cache_dir, size=base, overrides=overrides)
    if path.is_file() and not force:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return TrainedDetector(path, float(meta.get("val_map50", "nan")), float(meta.get("train_seconds", 0)), True)

    import torch

    from kiln.processing.detection import anchor_points
    from kiln.task_metrics import pad_boxes
    from kiln.zoo._boxes import detection_loss, flip_boxes

    start, cpu_start = time.perf_counter(), time.process_time()
    data, val = training_images(spec), val_data(spec)
    torch.manual_seed(recipe["seed"])
    gen = np.random.default_rng(recipe["seed"])
    model = _build(spec).to(memory_format=torch.channels_last)  # faster oneDNN convolutions on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    epochs, bs = recipe["epochs"], recipe["batch_size"]
    steps = epochs * (len(data.images) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps, pct_start=0.15)
    x_all = torch.from_numpy(to_input(data.images)).contiguous(memory_format=torch.channels_last)
    side = spec.train_image_size
    pts, strides = (torch.from_numpy(a) for a in anchor_points(side, side, STRIDES))
    for epoch in range(epochs):
        model.train()
        order = gen.permutation(len(x_all))
        for i in range(0, len(order) - bs + 1, bs):
            idx = order[i : i + bs]
            xb = x_all[idx]
            gts = pad_boxes([data.boxes[j] for j in idx])
            if gen.random() < 0.5:  # horizontal flip: every shape class is mirror-symmetric
                xb = xb.flip(-1)
                gts = flip_boxes(gts, side)
            out = model(xb)
            loss = detection_loss(out["scores"], out["boxes"], gts, pts, strides, recipe["center_radius"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress is not None:
            progress(epoch + 1, epochs)
    val_map = evaluate(model, val, spec)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"val_map50": f"{val_map:.6f}", "train_seconds": f"{seconds:.2f}",
                                        "train_cpu_seconds": f"{cpu_seconds:.2f}",
                                        "recipe": json.dumps(recipe, sort_keys=True)})  # fmt: skip
    tmp.replace(path)
    return TrainedDetector(path, val_map, seconds, False)
