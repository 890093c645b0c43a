"""Does `kiln predict` keep the engine busy? Images/s of the whole run (read PNG files, decode,
letterbox, normalize, engine, box decode, NMS, JSON lines) against the engine's own images/s on
already-decoded batches of the same size, with the same engine threads, measured in the same run.

    .venv/bin/python benchmarks/predict_throughput.py            # the shapes detector (trained once, cached)
    .venv/bin/python benchmarks/predict_throughput.py --model cnn --image-size 160

``--model cnn`` is a small ResNet-style classifier (random weights: throughput does not depend on
them) fed larger PNGs with resize + center-crop, for a model whose compute outweighs decoding.
The CPU columns (this process, all threads) show how much work decoding adds: on a machine whose
cores are all busy, the ratio cannot beat engine CPU / predict CPU however well the two overlap.

Each round times the engine alone, then the overlapped run, then a run without prefetch (one worker),
back to back; the ratios are taken within a round and the median over rounds is printed, so that load
from other processes on a shared machine hits both sides of each ratio alike.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def cnn_factory() -> Any:
    """A ResNet-style classifier (stem, 3 stages of residual blocks, global pool), 3x128x128 input."""
    import torch
    from torch import nn

    def block(c_in: int, c_out: int, stride: int) -> nn.Module:
        class Residual(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
                )  # fmt: skip
                self.skip = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.relu(self.body(x) + (x if self.skip is None else self.skip(x)))

        return Residual()

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(),
        block(32, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2), block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    ).eval()  # fmt: skip


def import_model(kind: str, repo: Path, untrained: bool) -> tuple[str, Any]:
    import kiln
    from kiln.zoo import detector

    if kind == "detector":
        weights = None if untrained else detector.train(progress=lambda e, n: print(f"  training {e}/{n}")).weights
        kiln.import_model(
            detector.FACTORY, repo, name="shapes", weights=weights, input_shapes=[detector.INPUT_SHAPE],
            task="detection", labels=detector.LABELS, preprocess=detector.PREPROCESS, postprocess=detector.POSTPROCESS,
        )  # fmt: skip
        return "shapes", detector
    kiln.import_model(
        cnn_factory(), repo, name="cnn", input_shapes=[(1, 3, 128, 128)], task="classification",
        labels=[f"class{i}" for i in range(10)],
        preprocess=[{"op": "decode_image"}, {"op": "resize", "args": {"size": 144}},
                    {"op": "center_crop", "args": {"size": 128}},
                    {"op": "normalize", "args": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
                    {"op": "hwc_to_chw"}],
        postprocess=[{"op": "softmax"}, {"op": "top_k", "args": {"k": 5}}],
    )  # fmt: skip
    return "cnn", None


def write_images(kind: str, n: int, size: int, folder: Path) -> list[Path]:
    from PIL import Image

    from kiln.zoo import detector

    if kind == "detector":
        return detector.write_pngs(detector.make_data(n, seed=99), folder)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        # smooth content compresses like a photo more than noise does
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR)
        path = folder / f"{i:05d}.png"
        img.save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["detector", "cnn"], default="detector")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=160, help="PNG side for --model cnn")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="engine intra-op threads to try")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--untrained", action="store_true", help="detector: skip training (few boxes to NMS)")
    args = parser.parse_args()

    import kiln
    from kiln.batch import plan, predict_files
    from kiln.processing import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        repo, folder = Path(tmp) / "repo", Path(tmp) / "images"
        print(f"importing the {args.model} model …", flush=True)
        name, _ = import_model(args.model, repo, args.untrained)
        paths = write_images(args.model, args.images, args.image_size, folder)
        size_kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        spec = kiln.Repository(repo).spec(name)
        pipe = Pipeline.from_spec(spec)
        raws = [p.read_bytes() for p in paths]
        batches = [pipe.preprocess(raws[i : i + args.batch_size]).inputs for i in range(0, len(raws), args.batch_size)]
        n = len(paths)
        print(f"{n} PNG files ({size_kb:.1f} KiB each), batch size {args.batch_size}, {args.workers} workers")
        print(
            f"{'engine threads':>14} {'engine img/s':>13} {'predict img/s':>14} {'ratio':>6} {'(range)':>12} "
            f"{'no-prefetch ratio':>18} {'CPU ms/img engine':>18} {'CPU ms/img predict':>19}"
        )
        for threads in args.threads:
            predictor = kiln.load(repo, name, threads=threads)
            for b in batches[:2]:
                predictor.predict(b)  # warm up
            engine, overlapped, sequential = [], [], []
            cpu: dict[str, list[float]] = {"engine": [], "predict": []}
            for _ in range(args.rounds):
                start, cpu_start = time.perf_counter(), time.process_time()
                for b in batches:
                    predictor.predict(b)
                engine.append(n / (time.perf_counter() - start))
                cpu["engine"].append((time.process_time() - cpu_start) / n * 1e3)
                for prefetch, workers, sink in ((2, args.workers, overlapped), (0, 1, sequential)):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    summary = predict_files(
                        pipe, predictor.predict, plan(pipe, [folder]), io.StringIO(), args.batch_size, workers, prefetch
                    )
                    sink.append(summary.succeeded / (time.perf_counter() - start))
                    if prefetch:
                        cpu["predict"].append((time.process_time() - cpu_start) / n * 1e3)
                    if summary.failed:
                        sys.exit(f"{summary.failed} images failed: {summary.errors[:3]}")
            ratios = [o / e for o, e in zip(overlapped, engine, strict=True)]
            seq_ratios = [s / e for s, e in zip(sequential, engine, strict=True)]
            e, o = statistics.median(engine), statistics.median(overlapped)
            r, s = statistics.median(ratios), statistics.median(seq_ratios)
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
            ce, cp = statistics.median(cpu["engine"]), statistics.median(cpu["predict"])
            print(
                f"{threads:>14} {e:>13.0f} {o:>14.0f} {r:>6.2f} {spread:>12} {s:>18.2f} {ce:>18.2f} {cp:>19.2f}",
                flush=True,
            )
            predictor.close()


if __name__ == "__main__":
    main()
