"""Image pre-processing ops: decode (Pillow), resize, letterbox, center-crop, normalize, HWC→CHW, dtype.

Geometric ops keep a PIL image and record in ``meta["transform"]`` how original pixel coordinates map
to model input ones (``x' = x * sx + tx``), so ``scale_boxes`` can map detections back. Raw instances
are bytes (a file's contents), ``{"b64": ...}`` (KServe V1 JSON), a PIL image or a uint8 array; never
a path, so a server cannot be made to read its own files.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from kiln.errors import first_line
from kiln.processing.registry import InstanceOp, OpArgs, register_op
from kiln.spec import DType

Size = tuple[int, int]
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}  # PIL.Image.Resampling values
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]


def _pil() -> Any:
    from PIL import Image

    return Image


def _size(value: int | list[int] | tuple[int, ...]) -> Size:
    """``224`` or ``[h, w]`` -> ``(h, w)``."""
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"size must be one int or [height, width], got {list(value)}")
    return (int(value[0]), int(value[1]))


def _compose(meta: dict[str, Any], sx: float, sy: float, tx: float, ty: float) -> None:
    """Follow the recorded transform with ``x' = x * sx + tx``."""
    osx, osy, otx, oty = meta.get("transform", (1.0, 1.0, 0.0, 0.0))
    meta["transform"] = (osx * sx, osy * sy, otx * sx + tx, oty * sy + ty)


def _upright(img: Any) -> Any:
    """Apply the EXIF orientation (a phone's portrait photo is stored sideways), as viewers and
    ``transformers``' image loading do; boxes then refer to the picture as people see it."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(img) or img


def _eight_bit(img: Any) -> Any:
    """16-bit and float images scaled to 8 bits: Pillow's own conversion clips them at 255."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return _pil().fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        return _pil().fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    return img


def _decode_problem(exc: Exception, head: bytes) -> str:
    """Pillow's reason in words about the bytes, not about its in-memory file (``<_io.BytesIO object at
    0x...>``); the caller names the file or the instance."""
    if type(exc).__name__ == "UnidentifiedImageError":
        return (
            f"Pillow recognises no image format in it (it starts with {head!r}); send a PNG, JPEG or other image file"
        )
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image", first_line(exc))


def _as_image(value: Any) -> Any:
    Image = _pil()
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(value))
    raise TypeError(f"expected an image, got {type(value).__name__}; put 'decode_image' first")


class DecodeArgs(OpArgs):
    mode: Literal["RGB", "L", "BGR"] = "RGB"
    max_pixels: int = Field(
        default=4096 * 4096, ge=1, description="refuse larger images (decompression bombs: 48 MiB decoded at most)"
    )


@register_op
class DecodeImage(InstanceOp):
    """Decode an encoded image (PNG, JPEG, …) with Pillow into the given colour mode."""

    name = "decode_image"
    Args = DecodeArgs
    args: DecodeArgs

    def __call__(self, value: Any, meta: dict[str, Any]) -> Any:
        Image = _pil()
        if isinstance(value, Mapping) and "b64" in value:
            try:
                value = base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise ValueError("the 'b64' field is not valid base64") from None
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                img = Image.open(io.BytesIO(bytes(value)))
                if img.width * img.height > self.args.max_pixels:
                    raise ValueError(f"{img.width}x{img.height} pixels is over the limit of {self.args.max_pixels}")
                img.load()
                img = _upright(_eight_bit(img))
            except ValueError:
                raise
            except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, OSError
                raise ValueError(f"cannot decode the image: {_decode_problem(exc, bytes(value[:16]))}") from None
        elif isinstance(value, (Image.Image, np.ndarray)):
            img = _as_image(value)
        else:
            raise TypeError(f"expected encoded image bytes, {{'b64': ...}} or an array, got {type(value).__name__}")
        mode = "RGB" if self.args.mode == "BGR" else self.args.mode
        if img.mode != mode:
            img = img.convert(mode)
        meta["orig_size"] = (img.height, img.width)
        meta.setdefault("transform", (1.0, 1.0, 0.0, 0.0))
        if self.args.mode == "BGR":
            return np.ascontiguousarray(np.asarray(img)[..., ::-1])
        return img


class ResizeArgs(OpArgs):
    size: int | list[int] = Field(description="[height, width], or one int: the shorter side keeps the aspect ratio")
    interpolation: Interpolation = "bilinear"

    @field_validator("size")
    @classmethod
    def _positive(cls, v: int | list[int]) -> int | list[int]:
        if any(s < 1 for s in ([v] if isinstance(v, int) else v)) or (isinstance(v, list) and len(v) != 2):
            raise ValueError("size must be a positive int or [height, width]")
        return v


@register_op
class Resize(InstanceOp):
    """Resize to ``[height, width]``, or the shorter side to ``size`` keeping the aspect ratio."""

    name = "resize"
    Args = ResizeArgs
    args: ResizeArgs

    def __call__(self, value: Any, meta: dict[str, Any]) -> Any:
        img = _as_image(value)
        if isinstance(self.args.size, int):
            scale = self.args.size / min(img.width, img.height)
            h, w = max(1, round(img.height * scale)), max(1, round(img.width * scale))
        else:
            h, w = _size(self.args.size)
        _compose(meta, w / img.width, h / img.height, 0.0, 0.0)
        return img.resize((w, h), _RESAMPLE[self.args.interpolation])


class LetterboxArgs(OpArgs):
    size: int | list[int]
    fill: int = Field(default=114, ge=0, le=255)
    interpolation: Interpolation = "bilinear"


@register_op
class Letterbox(InstanceOp):
    """Resize keeping the aspect ratio to fit ``size``, then pad the borders evenly with ``fill``."""

    name = "letterbox"
    Args = LetterboxArgs
    args: LetterboxArgs

    def __call__(self, value: Any, meta: dict[str, Any]) -> Any:
        Image = _pil()
        img = _as_image(value)
        in_h, in_w = img.height, img.width
        th, tw = _size(self.args.size)
        scale = min(th / in_h, tw / in_w)
        h, w = max(1, round(in_h * scale)), max(1, round(in_w * scale))
        if (h, w) != (in_h, in_w):
            img = img.resize((w, h), _RESAMPLE[self.args.interpolation])
        px, py = (tw - w) // 2, (th - h) // 2
        _compose(meta, w / in_w, h / in_h, px, py)
        if (h, w) == (th, tw):
            return img
        canvas = Image.new(img.mode, (tw, th), (self.args.fill,) * len(img.getbands()))
        canvas.paste(img, (px, py))
        return canvas


class CenterCropArgs(OpArgs):
    size: int | list[int]


@register_op
class CenterCrop(InstanceOp):
    """Cut the central ``[height, width]`` region (an image smaller than that is an error)."""

    name = "center_crop"
    Args = CenterCropArgs
    args: CenterCropArgs

    def __call__(self, value: Any, meta: dict[str, Any]) -> Any:
        img = _as_image(value)
        th, tw = _size(self.args.size)
        if img.height < th or img.width < tw:
            raise ValueError(f"image {img.width}x{img.height} is smaller than the crop {tw}x{th}; resize first")
        left, top = (img.width - tw) // 2, (img.height - th) // 2
        _compose(meta, 1.0, 1.0, -left, -top)
        return img.crop((left, top, left + tw, top + th))


class NormalizeArgs(OpArgs):
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)
    scale: float = Field(default=1 / 255, gt=0, description="applied first: 1/255 maps uint8 to [0, 1]")

    @field_validator("std")
    @classmethod
    def _nonzero(cls, v: list[float]) -> list[float]:
        if any(s == 0 for s in v):
            raise ValueError("std must not contain 0")
        return v


@register_op
class Normalize(InstanceOp):
    """``(pixels * scale - mean) / std`` per channel, as float32 HWC."""

    name = "normalize"
    Args = NormalizeArgs
    args: NormalizeArgs

    def __init__(self, args: NormalizeArgs, context: Any) -> None:
        super().__init__(args, context)
        if len(args.mean) != len(args.std):
            from kiln.errors import SpecError

            raise SpecError(f"normalize: mean has {len(args.mean)} values but std has {len(args.std)}")
        self._mul = (args.scale / np.asarray(args.std, np.float32)).astype(np.float32)
        self._add = (-np.asarray(args.mean, np.float32) / np.asarray(args.std, np.float32)).astype(np.float32)
        self._rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _row(self, width: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel factors tiled over one image row: numpy is slow when the innermost axis is 3 long."""
        key = (width, channels)
        row = self._rows.get(key)
        if row is None:
            mul = np.resize(self._mul, channels) if len(self._mul) == 1 else self._mul
            add = np.resize(self._add, channels) if len(self._add) == 1 else self._add
            row = (np.tile(mul, width), np.tile(add, width))
            self._rows[key] = row  # a benign race: threads would store equal arrays
        return row

    def __call__(self, value: Any, meta: dict[str, Any]) -> Any:
        arr = np.asarray(value)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"expected an [H, W, C] image, got shape {list(arr.shape)}")
        h, w, c = arr.shape
        if c != len(self._mul) and len(self._mul) != 1:
            raise ValueError(f"image has {c} channels but normalize has {len(self._mul)} means")
        out = np.array(arr, dtype=np.float32, order="C")  # C order: the reshape below must be a view
        mul, add = self._row(w, c)
        flat = out.reshape(h, w * c)
        flat *= mul
        flat += add
        return out


@register_op
class HwcToChw(InstanceOp):
    """Move channels first: ``[H, W, C]`` -> ``[C, H, W]`` (a 2-D image gets one channel)."""

    name = "hwc_to_chw"

    def __call__(self, value: Any, meta: dict[str, Any]) -> Any:
        arr = np.asarray(value)
        if arr.ndim == 2:
            return arr[None]
        if arr.ndim != 3:
            raise ValueError(f"expected an [H, W, C] image, got shape {list(arr.shape)}")
        return np.ascontiguousarray(arr.transpose(2, 0, 1))


class ToDtypeArgs(OpArgs):
    dtype: DType
    scale: float = 1.0


@register_op
class ToDtype(InstanceOp):
    """Convert to an array of ``dtype`` (after multiplying by ``scale``)."""

    name = "to_dtype"
    Args = ToDtypeArgs
    args: ToDtypeArgs

    def __call__(self, value: Any, meta: dict[str, Any]) -> Any:
        arr = np.asarray(value)
        if self.args.scale != 1.0:
            arr = arr * self.args.scale
        return arr.astype(self.args.dtype, copy=False)
