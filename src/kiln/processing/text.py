"""Text pre-processing: a ``tokenizer.json`` through the ``tokenizers`` library, truncated, and padded
to a bucket length so that a batch's sequence length takes few distinct values (engines and caches
see a few dozen shapes, not one per batch) while padding stays small: the default buckets
(:func:`default_buckets`) pad a batch to at most 1.25 times its longest sentence. Padding is not
free, since attention and every layer run over the padded length too, so power-of-two buckets, which
may nearly double the work, would cost more than the extra shapes do.

A lone sentence (a batch of one) is the exception (:func:`single_buckets`): it pads to the next multiple
of 8 up to 64 tokens. At one row the engine's time barely moves between 10 and 24 tokens, while each
extra shape is one more compiled model whose weights compete for the CPU's cache: on MiniLM int8
(OpenVINO, one static model per shape) the shipped sentences took 0.99 ms each over the default
buckets' five shapes (10-20) and 0.77 ms over multiples of 8 (16, 24), measured in one run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from kiln.errors import ProcessingError, SpecError, first_line
from kiln.processing.registry import CollateOp, OpArgs, OpContext, register_op


class TokenizeArgs(OpArgs):
    tokenizer: str = Field(description="path to a tokenizer.json (relative paths: the model version directory)")
    max_length: int = Field(default=128, ge=1, description="longer texts are truncated")
    buckets: list[int] | None = Field(
        default=None,
        description="pad to the smallest bucket that fits the batch (default: default_buckets(max_length), "
        "at most 1.25x the longest sentence)",
    )
    single_buckets: list[int] | None = Field(
        default=None,
        description="the buckets for a lone sentence (default: single_buckets(max_length), multiples of 8 up to "
        "64, then the default buckets)",
    )
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    token_type_ids: str = "token_type_ids"
    dtype: str = "int64"

    @model_validator(mode="after")
    def _buckets(self) -> TokenizeArgs:
        for field, value in (("buckets", self.buckets), ("single_buckets", self.single_buckets)):
            if value is not None and (not value or any(b < 1 for b in value)):
                raise ValueError(f"{field} must be positive lengths")
        return self


def default_buckets(max_length: int) -> list[int]:
    """The bucket lengths a batch is padded to when the spec names none, ascending, the last one
    ``max_length``: every length up to 8, then steps that grow with the length (2 up to 16, 4 up to 32,
    8 up to 64, 16 up to 128 …, a quarter of the power of two below).

    The bound: a batch whose longest sentence has ``n`` tokens is padded to at most ``1.25 * n``
    (exactly ``n`` up to 8), whatever ``max_length``, with four shapes per doubling of the length.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    edges = list(range(1, min(8, max_length) + 1))
    low = 8
    while low < max_length:
        step = low // 4
        edges.extend(e for e in range(low + step, 2 * low + 1, step) if e < max_length)
        low *= 2
    if edges[-1] != max_length:
        edges.append(max_length)
    return edges


SINGLE_STEP = 8  # a lone sentence's lengths: multiples of this ...
SINGLE_UP_TO = 64  # ... up to this many tokens, then the default buckets


def single_buckets(max_length: int) -> list[int]:
    """The buckets a lone sentence pads to: multiples of 8 up to 64 tokens (fewer shapes where one row's
    time is nearly flat in its length), then :func:`default_buckets`."""
    coarse = [b for b in range(SINGLE_STEP, min(SINGLE_UP_TO, max_length) + 1, SINGLE_STEP)]
    return coarse + [b for b in default_buckets(max_length) if b > (coarse[-1] if coarse else 0)]


def bucket_length(longest: int, buckets: Sequence[int], max_length: int) -> int:
    """The smallest bucket that holds ``longest`` tokens, never above ``max_length``."""
    for b in sorted(buckets):
        if b >= longest:
            return min(b, max_length)
    return max_length


@register_op
class Tokenize(CollateOp):
    """Sentences -> ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model takes them)."""

    name = "tokenize"
    sorts_by_length = True
    Args = TokenizeArgs
    args: TokenizeArgs

    def __init__(self, args: TokenizeArgs, context: OpContext) -> None:
        super().__init__(args, context)
        from tokenizers import Tokenizer

        path = context.path(args.tokenizer)
        if not path.is_file():
            raise SpecError(f"tokenize: tokenizer file {path} does not exist")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise SpecError(f"tokenize: {path} is not a tokenizer.json: {first_line(exc)}") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=args.max_length)
        self.buckets = sorted(args.buckets) if args.buckets else default_buckets(args.max_length)
        if args.single_buckets:
            self.single = sorted(args.single_buckets)
        else:  # buckets the spec names hold for every batch, unless it names single ones too
            self.single = self.buckets if args.buckets else single_buckets(args.max_length)
        wanted = set(context.input_names) if context.spec else {args.input_ids, args.attention_mask}
        self.emit = [n for n in (args.input_ids, args.attention_mask, args.token_type_ids) if n in wanted]
        if args.input_ids not in self.emit:
            raise SpecError(
                f"tokenize: the model has no input {args.input_ids!r} (inputs: {sorted(wanted)}); "
                "name the ids input with the input_ids argument"
            )

    def length(self, value: Any) -> int:
        """The sentence's token count after truncation (what its row needs before padding); 0 for a value
        that is no text (collation reports it)."""
        if not isinstance(value, str):
            return 0
        try:
            return len(self.tokenizer.encode(value).ids)
        except Exception:  # a lone surrogate: collation names the instance and the reason
            return 0

    def __call__(self, values: Sequence[Any], meta: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise ProcessingError(self.name, f"expected a string, got {type(v).__name__}", index=i)
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") that JSON allowed through
                raise ProcessingError(
                    self.name, f"not valid Unicode text ({exc.reason} at {exc.start})", index=i
                ) from None
        encodings = self.tokenizer.encode_batch(list(values))
        buckets = self.single if len(encodings) == 1 else self.buckets
        length = bucket_length(max((len(e.ids) for e in encodings), default=1), buckets, self.args.max_length)
        dtype = np.dtype(self.args.dtype)
        pad_id = _pad_id(self.tokenizer)
        ids = np.full((len(values), length), pad_id, dtype=dtype)
        mask = np.zeros((len(values), length), dtype=dtype)
        types = np.zeros((len(values), length), dtype=dtype)
        for i, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[i, :n] = enc.ids
            mask[i, :n] = 1
            types[i, :n] = enc.type_ids
            meta[i]["tokens"] = n
        arrays = {self.args.input_ids: ids, self.args.attention_mask: mask, self.args.token_type_ids: types}
        return {name: arrays[name] for name in self.emit}


def _pad_id(tokenizer: Any) -> int:
    for token in ("[PAD]", "<pad>", "<PAD>"):
        idx = tokenizer.token_to_id(token)
        if idx is not None:
            return int(idx)
    return 0
