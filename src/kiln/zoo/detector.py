"""A DAMO-YOLO-style object detector that kiln trains offline on shapes it draws itself.

The data: circles, squares and triangles on noisy gradient backgrounds, with exact boxes, generated
from a fixed seed (nothing is downloaded). The model: a small CSP backbone, a PAN-style neck and an
anchor-free head per level (class logits trained with Quality Focal Loss on the IoU, ltrb distances
trained with GIoU loss, as in DAMO-YOLO's ZeroHead, without the distribution regression). Trained
weights are cached as safetensors under the kiln cache, keyed by the recipe, with the validation
mAP@0.5 in their metadata; training takes about 25 s on 2 idle cores (about 5 minutes when other
processes keep both cores busy), once.

Import it like any PyTorch model; :data:`PREPROCESS` and :data:`POSTPROCESS` are the processing steps
to write into its spec, so ``kiln predict`` turns PNG files into labelled boxes::

    kiln.import_model(FACTORY, repo, name="shapes", weights=train().weights, input_shapes=[INPUT_SHAPE],
                      task="detection", labels=LABELS, preprocess=PREPROCESS, postprocess=POSTPROCESS)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from kiln.zoo import _cache

FACTORY = "kiln.zoo.detector:build_model"
INPUT_NAME = "image"
IMAGE_SIZE = 64
INPUT_SHAPE = (1, 3, IMAGE_SIZE, IMAGE_SIZE)
LABELS = ["circle", "square", "triangle"]
STRIDES = (8, 16)
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

PREPROCESS: list[dict[str, Any]] = [
    {"op": "decode_image", "args": {"mode": "RGB"}},
    {"op": "letterbox", "args": {"size": [IMAGE_SIZE, IMAGE_SIZE], "fill": 114}},
    {"op": "normalize", "args": {"mean": list(MEAN), "std": list(STD)}},
    {"op": "hwc_to_chw"},
]
POSTPROCESS: list[dict[str, Any]] = [
    {"op": "yolo_decode", "args": {"strides": list(STRIDES)}},
    {"op": "score_threshold", "args": {"threshold": 0.25}},
    {"op": "nms", "args": {"iou_threshold": 0.5, "max_detections": 20}},
    {"op": "scale_boxes"},
]

# The training recipe; any change gives a new cache key.
RECIPE: dict[str, Any] = {
    "arch": "csp12-24-48-64/pan48/anchor-free-qfl-giou/v2",
    "seed": 0,
    "train_images": 2400,
    "val_images": 300,
    "epochs": 6,
    "batch_size": 32,
    "lr": 5e-3,
    "sizes": [12, 28],
    "weight_decay": 5e-4,
    "center_radius": 1.5,
}


# ---- the model ----------------------------------------------------------------------------------------
def build_model() -> Any:
    """The untrained detector (the factory ``kiln import`` calls). Input: normalized RGB, NCHW."""
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
            self.stem = nn.Sequential(conv(3, 12, 3, 2), conv(12, 24, 3, 2))  # /4
            self.c3 = nn.Sequential(conv(24, 48, 3, 2), CSP(48, 48))  # /8
            self.c4 = nn.Sequential(conv(48, 64, 3, 2), CSP(64, 64))  # /16
            self.lateral = conv(64, 48, 1)
            self.top_down = CSP(96, 48)
            self.down = conv(48, 48, 3, 2)
            self.bottom_up = CSP(96, 48)
            self.heads = nn.ModuleList([Head(48, 32, num_classes), Head(48, 32, num_classes)])

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


def draw_image(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One noisy image with 1–4 shapes (12–28 px) and their boxes ``[K, 5]`` (x1, y1, x2, y2, class_id)."""
    from PIL import Image, ImageDraw

    base = rng.uniform(40, 215, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gx, gy = rng.uniform(-40, 40, size=2)
    bg = base[None, None, :] + (gx * xx + gy * yy)[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    boxes: list[list[float]] = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            s = int(rng.integers(RECIPE["sizes"][0], RECIPE["sizes"][1] + 1))
            x0, y0 = (int(v) for v in rng.integers(0, size - s, size=2))
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
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(4, 16), size=(size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8), np.asarray(boxes, dtype=np.float32).reshape(-1, 5)


def _overlap(a: list[int], b: list[float]) -> float:
    from kiln.task_metrics import box_iou

    return float(box_iou(np.asarray(a[:4]), np.asarray(b[:4]))[0, 0])


def make_data(n: int, seed: int) -> ShapesData:
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for _ in range(n):
        img, b = draw_image(rng)
        images.append(img)
        boxes.append(b)
    return ShapesData(np.stack(images), boxes)


def train_data() -> ShapesData:
    return make_data(RECIPE["train_images"], RECIPE["seed"])


def val_data() -> ShapesData:
    """The validation split (its own seed, so it never overlaps the training images)."""
    return make_data(RECIPE["val_images"], RECIPE["seed"] + 1)


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


def optimize_data(calibration_images: int = 128) -> tuple[tuple[dict[str, np.ndarray], np.ndarray], tuple[Any, Any]]:
    """``(calibration, validation)`` for ``kiln optimize``: calibrate on training images, hold the
    budget on the validation split's mAP@0.5 (its boxes padded to ``[N, M, 5]`` as ``labels``)."""
    from kiln.task_metrics import pad_boxes

    calib = make_data(calibration_images, RECIPE["seed"])  # the first training images
    val = val_data()
    return ({INPUT_NAME: to_input(calib.images)}, pad_boxes(calib.boxes)), (
        {INPUT_NAME: to_input(val.images)},
        pad_boxes(val.boxes),
    )


# ---- training -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainedDetector:
    weights: Path
    val_map50: float
    train_seconds: float
    cached: bool


def recipe_key() -> str:
    return _cache.recipe_key(RECIPE)


def weights_path(cache_dir: Path | None = None) -> Path:
    return _cache.trained_weights_path("shapes-detector", RECIPE, cache_dir)


def predict_boxes(model: Any, images: np.ndarray, batch_size: int = 64) -> list[list[dict[str, Any]]]:
    """Detections for uint8 NHWC images, through the same decode/threshold/NMS steps as POSTPROCESS."""
    import torch

    from kiln.processing.detection import batched_nms, decode

    thr = POSTPROCESS[1]["args"]["threshold"]
    nms_args = POSTPROCESS[2]["args"]
    out: list[list[dict[str, Any]]] = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            res = model(torch.from_numpy(to_input(images[i : i + batch_size])))
            for d in decode(res["scores"].numpy(), res["boxes"].numpy(), IMAGE_SIZE, IMAGE_SIZE, STRIDES):
                d = d.select(np.nonzero(d.scores >= thr)[0])
                d = d.select(batched_nms(d.boxes, d.scores, d.class_ids, nms_args["iou_threshold"]))
                out.append(d.select(np.arange(min(len(d.scores), nms_args["max_detections"]))).to_json())
    return out


def evaluate(model: Any, data: ShapesData) -> float:
    from kiln.task_metrics import map50

    return map50(predict_boxes(model, data.images), data.ground_truth())


def train(
    cache_dir: Path | None = None, force: bool = False, progress: Callable[[int, int], None] | None = None
) -> TrainedDetector:
    """Train (or reuse the cached) detector; ``progress(epoch, epochs)`` is called per epoch."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = weights_path(cache_dir)
    if path.is_file() and not force:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return TrainedDetector(path, float(meta.get("val_map50", "nan")), float(meta.get("train_seconds", 0)), True)

    import torch

    start, cpu_start = time.perf_counter(), time.process_time()
    data, val = train_data(), val_data()
    torch.manual_seed(RECIPE["seed"])
    gen = np.random.default_rng(RECIPE["seed"])
    model = build_model().to(memory_format=torch.channels_last)  # faster oneDNN convolutions on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    epochs, bs = RECIPE["epochs"], RECIPE["batch_size"]
    steps = epochs * (len(data.images) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["lr"], total_steps=steps, pct_start=0.15)
    x_all = torch.from_numpy(to_input(data.images)).contiguous(memory_format=torch.channels_last)
    from kiln.processing.detection import anchor_points
    from kiln.task_metrics import pad_boxes

    pts, strides = (torch.from_numpy(a) for a in anchor_points(IMAGE_SIZE, IMAGE_SIZE, STRIDES))
    for epoch in range(epochs):
        model.train()
        order = gen.permutation(len(x_all))
        for i in range(0, len(order) - bs + 1, bs):
            idx = order[i : i + bs]
            xb = x_all[idx]
            gts = pad_boxes([data.boxes[j] for j in idx])
            if gen.random() < 0.5:  # horizontal flip: every shape class is mirror-symmetric
                xb = xb.flip(-1)
                gts = _flip_boxes(gts)
            out = model(xb)
            loss = _loss(out["scores"], out["boxes"], gts, pts, strides)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress is not None:
            progress(epoch + 1, epochs)
    val_map = evaluate(model, val)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"val_map50": f"{val_map:.6f}", "train_seconds": f"{seconds:.2f}",
                                        "train_cpu_seconds": f"{cpu_seconds:.2f}",
                                        "recipe": json.dumps(RECIPE, sort_keys=True)})  # fmt: skip
    tmp.replace(path)
    return TrainedDetector(path, val_map, seconds, False)


def _flip_boxes(g: np.ndarray) -> np.ndarray:
    g = g.copy()
    x1 = IMAGE_SIZE - g[..., 2]
    g[..., 2] = IMAGE_SIZE - g[..., 0]
    g[..., 0] = x1
    return g


def _assign(gt: Any, pts: Any, strides: Any) -> tuple[Any, Any]:
    """Anchor points inside a box and within ``center_radius`` strides of its centre are positives; the
    smallest box wins a point claimed by several. ``gt [B, M, 5]`` -> matched box per point ``[B, N, 5]``
    and the positive mask ``[B, N]``."""
    import torch

    x, y = pts[None, :, 0:1], pts[None, :, 1:2]  # [1, N, 1]
    x1, y1, x2, y2, cls = (gt[:, None, :, i] for i in range(5))  # [B, 1, M]
    inside = (x > x1) & (x < x2) & (y > y1) & (y < y2) & (cls >= 0)
    r = RECIPE["center_radius"] * strides[None, :, None]
    near = ((x - (x1 + x2) / 2).abs() < r) & ((y - (y1 + y2) / 2).abs() < r)
    ok = inside & near  # [B, N, M]
    area = torch.where(ok, ((x2 - x1) * (y2 - y1)).expand_as(ok), torch.full_like(ok, float("inf"), dtype=gt.dtype))
    best = area.argmin(dim=2)  # [B, N]
    matched = torch.gather(gt, 1, best[..., None].expand(-1, -1, 5))
    return matched, ok.any(dim=2)


def _loss(scores: Any, dists: Any, gts: np.ndarray, pts: Any, strides: Any) -> Any:
    """Quality Focal Loss on IoU-valued class targets plus GIoU loss on the positive points."""
    import torch
    from torch.nn import functional as F

    from kiln.zoo._boxes import giou_loss, iou

    matched, pos = _assign(torch.from_numpy(gts), pts, strides)
    d = dists * strides[None, :, None]
    pred = torch.cat([pts[None] - d[..., :2], pts[None] + d[..., 2:]], dim=-1)
    pb, gb = pred[pos], matched[pos]
    num_pos = max(int(pos.sum()), 1)
    targets = torch.zeros_like(scores)
    if len(pb):
        quality = iou(pb.detach(), gb[:, :4]).clamp(min=0.01)
        b_idx, n_idx = pos.nonzero(as_tuple=True)
        targets[b_idx, n_idx, gb[:, 4].long()] = quality
        box = giou_loss(pb, gb[:, :4]).sum() / num_pos
    else:
        box = scores.sum() * 0
    p = scores.sigmoid()
    qfl = F.binary_cross_entropy_with_logits(scores, targets, reduction="none") * (p - targets).abs().pow(2)
    return qfl.sum() / num_pos + 2.0 * box
