"""kiln's chosen variant against the recipes a skilled user builds by hand with one tool, on the same
imported ONNX file, with the same calibration data, timed round-robin in one process.

    pip install -e ".[bench]"
    python benchmarks/vs_hand_tuned.py [--dir kiln-bench-hand] [--models digits,minilm,mobilenetv2,resnet50]
                                       [--reuse] [--quick] [--preset cpu-latency]

The models are imported and optimized exactly as ``benchmarks/optimize_zoo.py`` does (its ``MODELS``
table, data and default accuracy budgets), into ``DIR/repo``; ``--reuse`` skips that for a model whose
repository already has a chosen variant (``--dir kiln-bench`` reuses optimize_zoo's own run), and
reuses the hand-quantized files kept under ``DIR/hand``. The hand recipes, each from the version's
``model.onnx``:

- OpenVINO int8: ``nncf.quantize`` on ``Core().read_model(onnx)`` (``ModelType.TRANSFORMER`` for MiniLM, as
  NNCF's guide says), reshaped to a static batch, compiled with the LATENCY hint and otherwise default
  properties: on this CPU that runs the non-quantized ops in bf16;
- OpenVINO bf16 and fp32 (``INFERENCE_PRECISION_HINT`` bf16 / f32), reshaped static, LATENCY hint;
- ONNX Runtime fp32 (``ORT_ENABLE_ALL``, intra-op threads = physical cores), and static int8 QDQ
  (``quant_pre_process`` then ``quantize_static``, per channel, defaults otherwise).

OpenVINO runs through ``request.infer(feed, share_inputs=True)``, ONNX Runtime through
``session.run(None, feed)``, kiln's choice through ``kiln.load(...).predict``. Each of ``ROUNDS`` rounds
times every contestant (the order rotating) at batch 1 (median latency) and batch 16 (items/s); the
figure is the median over rounds. Accuracy is against ONNX Runtime fp32 on the held-out split kiln
validated on, judged by kiln's own budget: "best hand recipe" is the fastest one within it. For MiniLM
it also embeds the sentences kiln ships, tokenization included on both sides: kiln through its
pipeline at real length, the best hand recipe padded to 128 tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import optimize_zoo  # (its MODELS table and data; it also keeps transformers offline)

Feed = Mapping[str, np.ndarray]
Call = Callable[[Feed], Any]
BATCH = 16
BATCHES = (1, BATCH)
SEQ = 128  # the fixed length a user pads MiniLM's inputs to
FULL, QUICK = (7, 0.5), (3, 0.1)  # rounds, seconds per contestant and batch size in each round


def _noop() -> None:
    return None


@dataclass
class Contestant:
    """One way to run the model: a call per batch size (what is timed) and how to read its output."""

    label: str
    calls: dict[int, Call]
    first: Callable[[Any], np.ndarray]  # the call's result -> the model's (single) output
    hand: bool = True
    close: Callable[[], None] = _noop
    accuracy: str = ""
    within: bool = False
    latency: list[float] = field(default_factory=list)  # ms per round, batch 1
    throughput: list[float] = field(default_factory=list)  # items/s per round, batch 16

    @property
    def ms(self) -> float:
        return statistics.median(self.latency)

    @property
    def tput(self) -> float:
        return statistics.median(self.throughput)


@dataclass
class Setup:
    """What kiln's search used for this model: its config (budget), spec, data split and metric."""

    config: Any
    spec: Any
    split: Any
    metric: str
    onnx: Path
    version: int


# ---- kiln's side ----------------------------------------------------------------------------------------
def prepare(name: str, repo: Path, preset: str, reuse: bool, console: Any) -> None:
    """Import and optimize as optimize_zoo does, unless ``reuse`` and the model already has a choice."""
    from kiln.errors import KilnError
    from kiln.repository import Repository

    if reuse:
        with contextlib.suppress(KilnError):
            chosen = Repository(repo).variant(name)
            if not chosen.is_reference:
                console.print(f"{name}: reusing kiln's choice in {repo}: {chosen.label} ({chosen.id})")
                return
    optimize_zoo.run_model(name, repo, preset, console)


def setup(name: str, repo: Path, preset: str) -> Setup:
    from kiln.optimize.accuracy import choose_metric
    from kiln.optimize.config import OptimizeConfig
    from kiln.optimize.data import load_split
    from kiln.repository import ONNX_FILE, Repository

    repository = Repository(repo)
    config = OptimizeConfig.build(preset=preset, **optimize_zoo.MODELS[name]["optimize"])
    reference = repository.variant(name, None, "reference")
    source = repository.manifest(name, reference.version).source
    split = load_split(reference.spec, config.data, source, config.calibration_samples, config.validation_samples)
    metric = choose_metric(config, reference.spec, split.validation)
    return Setup(config, reference.spec, split, metric, reference.path / ONNX_FILE, reference.version)


# ---- the hand recipes -----------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The quantizers' progress bars and advice (stdout, warnings): not this benchmark's output."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def nncf_int8(core: Any, onnx: Path, calibration: Any, out: Path, transformer: bool) -> None:
    """NNCF post-training quantization over the same calibration samples kiln used, saved as IR."""
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    items = [{k: v[i : i + 1] for k, v in calibration.inputs.items()} for i in range(len(calibration))]
    kwargs: dict[str, Any] = {"subset_size": len(items)}
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    with quiet():
        quantized = nncf.quantize(core.read_model(str(onnx)), nncf.Dataset(items), **kwargs)
    ov.save_model(quantized, str(out), compress_to_fp16=False)


def ort_int8(onnx: Path, batches: list[dict[str, np.ndarray]], out: Path) -> None:
    """ONNX Runtime static QDQ int8, per channel, after the documented pre-processing (without symbolic
    shape inference when that fails, as on MiniLM's dynamic sequence length; else none)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    pre = out.with_name("ort-pre.onnx")
    pre.unlink(missing_ok=True)
    with contextlib.chdir(out.parent):  # the quantizer leaves scratch files in the working directory
        for skip_symbolic in (False, True):
            with quiet(), contextlib.suppress(Exception):
                quant_pre_process(str(onnx), str(pre), skip_symbolic_shape=skip_symbolic)
                break
        with quiet():
            quantize_static(
                str(pre if pre.is_file() else onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True
            )


def ov_static(core: Any, path: Path, feeds: Mapping[int, Feed], config: dict[str, str]) -> dict[int, Call]:
    """One compiled model per batch size, every input reshaped to that static shape."""
    calls: dict[int, Call] = {}
    for b, feed in feeds.items():
        model = core.read_model(str(path))
        model.reshape({i.get_any_name(): [b, *feed[i.get_any_name()].shape[1:]] for i in model.inputs})
        request = core.compile_model(model, "CPU", config).create_infer_request()
        calls[b] = functools.partial(request.infer, share_inputs=True)
    return calls


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    from kiln.hardware import physical_cores

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = physical_cores()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def hand_recipes(s: Setup, work: Path, reuse: bool, feeds: Mapping[int, Feed]) -> list[Contestant]:
    """The recipes, ONNX Runtime fp32 (the accuracy reference) first."""
    import openvino as ov

    core = ov.Core()
    work.mkdir(parents=True, exist_ok=True)
    ov_int8, ort_q = work / "ov-int8.xml", work / "ort-int8.onnx"
    if not (reuse and ov_int8.is_file()):
        nncf_int8(core, s.onnx, s.split.calibration, ov_int8, transformer=s.spec.task == "embedding")
    if not (reuse and ort_q.is_file()):
        ort_int8(s.onnx, s.split.calibration.batches(s.config.batch_size), ort_q)

    def ov_first(result: Any) -> np.ndarray:
        return np.array(result.to_tuple()[0])  # copied: the request reuses its output buffers

    def ort(label: str, path: Path) -> Contestant:
        session = ort_session(path)
        return Contestant(label, {b: functools.partial(session.run, None) for b in feeds}, lambda r: r[0])

    latency = {"PERFORMANCE_HINT": "LATENCY"}
    return [
        ort("onnxruntime fp32", s.onnx),
        ort("onnxruntime int8 static QDQ" + ("" if (work / "ort-pre.onnx").is_file() else " (no pre-processing)"), ort_q),
        Contestant("openvino fp32 static", ov_static(core, s.onnx, feeds, {**latency, "INFERENCE_PRECISION_HINT": "f32"}), ov_first),
        Contestant("openvino bf16 static", ov_static(core, s.onnx, feeds, {**latency, "INFERENCE_PRECISION_HINT": "bf16"}), ov_first),
        # default precision, as a user compiles it: bf16 for the ops left unquantized on this CPU
        Contestant("openvino int8 (nncf) static", ov_static(core, ov_int8, feeds, latency), ov_first),
    ]  # fmt: skip


# ---- accuracy -------------------------------------------------------------------------------------------
def outputs_of(c: Contestant, samples: Any, batch: int = BATCH) -> np.ndarray:
    """``c``'s output on every sample, in batches of ``batch`` (the last one padded: shapes are static)."""
    parts = []
    for start in range(0, len(samples), batch):
        feed = {k: v[start : start + batch] for k, v in samples.inputs.items()}
        rows = len(next(iter(feed.values())))
        feed = {k: np.ascontiguousarray(np.concatenate([v, np.repeat(v[-1:], batch - rows, axis=0)])) for k, v in feed.items()}  # fmt: skip
        parts.append(np.array(c.first(c.calls[batch](feed)))[:rows])
    return np.concatenate(parts)


def judge(s: Setup, reference: np.ndarray, out: np.ndarray) -> tuple[str, bool]:
    """The figure kiln's budget is on (and top-1 agreement for classifiers), and whether it is within."""
    from kiln.errors import AccuracyBudgetError
    from kiln.optimize.accuracy import check, measure

    name = s.spec.outputs[0].name
    a = measure(s.metric, s.spec, {name: reference}, {name: out}, s.split.validation.labels)
    try:
        check("hand", a, s.config)
        ok = True
    except AccuracyBudgetError:
        ok = False
    text = {"top1": f"top-1 {a.top1 or 0:.2%} (fp32 {a.reference_value:.2%})", "cosine": f"cosine {a.cosine_mean:.4f}",
            "sqnr": f"SQNR {a.sqnr_db:.1f} dB"}.get(a.metric, f"{a.metric} {a.value:.4g}")  # fmt: skip
    if s.spec.task != "embedding":
        text += f", agrees {np.mean(out.argmax(1) == reference.argmax(1)):.1%}"
    return text, ok


# ---- timing ---------------------------------------------------------------------------------------------
def median_call(call: Callable[[], Any], seconds: float, min_calls: int) -> float:
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def race(contestants: list[Contestant], feeds: Mapping[int, Feed], rounds: int, seconds: float) -> None:
    """Warm every contestant, then ``rounds`` rounds, each timing all of them (in a rotating order)."""
    for c in contestants:
        for b in BATCHES:
            for _ in range(5):
                c.calls[b](feeds[b])
    for r in range(rounds):
        for c in contestants[r % len(contestants) :] + contestants[: r % len(contestants)]:
            c.latency.append(median_call(functools.partial(c.calls[1], feeds[1]), seconds, 5) * 1e3)
            c.throughput.append(BATCH / median_call(functools.partial(c.calls[BATCH], feeds[BATCH]), seconds, 2))


# ---- MiniLM on real sentences ---------------------------------------------------------------------------
def sentences_race(predictor: Any, best: Mapping[int, Contestant], reference: Contestant, rounds: int,
                   seconds: float, console: Any) -> list[str]:  # fmt: skip
    """Sentences/s over the sentences kiln ships, tokenization included on both sides: kiln's choice
    through kiln's pipeline (its buckets; plain order, as ``kiln predict`` reads them), against the best
    hand recipe at each batch size on inputs padded to 128 tokens."""
    from rich.table import Table

    from kiln.optimize.accuracy import cosine_rows
    from kiln.processing import OpContext, Pipeline
    from kiln.processing.text import Tokenize, TokenizeArgs
    from kiln.zoo import minilm

    texts = minilm.sentences()
    pipeline = Pipeline.from_spec(predictor.spec, root=predictor.handle.version_dir)
    fixed = Tokenize(TokenizeArgs(tokenizer=str(minilm.tokenizer_path()), max_length=SEQ, buckets=[SEQ]), OpContext())
    out = predictor.spec.outputs[0].name

    def chunks(b: int, pad: bool) -> list[list[str]]:
        parts = [texts[i : i + b] for i in range(0, len(texts), b)]
        return [p + [p[-1]] * (b - len(p)) for p in parts] if pad else parts

    def kiln_pass(b: int) -> Callable[[], list[np.ndarray]]:
        return lambda: [predictor.predict(pipeline.preprocess(p).inputs)[out] for p in chunks(b, pad=False)]

    def hand_pass(c: Contestant, b: int) -> Callable[[], list[np.ndarray]]:
        return lambda: [c.first(c.calls[b](fixed(p, [{} for _ in p]))) for p in chunks(b, pad=True)]

    runs = {
        (who, b): kiln_pass(b) if who == "kiln" else hand_pass(best[b], b) for b in BATCHES for who in ("kiln", "hand")
    }
    mine = np.concatenate(kiln_pass(BATCH)())
    ref = np.concatenate(hand_pass(reference, BATCH)())[: len(texts)]
    figures: dict[tuple[str, int], list[float]] = {k: [] for k in runs}
    for run in runs.values():  # warm: kiln's dynamic shapes compile on first sight
        run()
    for r in range(rounds):
        keys = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]
        for key in keys:
            figures[key].append(len(texts) / median_call(runs[key], seconds, 1))
    sps = {k: statistics.median(v) for k, v in figures.items()}
    t = Table(title=f"minilm: the {len(texts)} sentences kiln ships, sentences/s incl. tokenization, median of "
                    f"{rounds} interleaved rounds", title_justify="left")  # fmt: skip
    for col in (
        "batch",
        "kiln's choice, kiln's pipeline (real length)",
        "best hand recipe, padded to 128",
        "kiln ÷ hand",
    ):
        t.add_column(col, justify="right" if col != "best hand recipe, padded to 128" else "left")
    for b in BATCHES:
        t.add_row(str(b), f"{sps['kiln', b]:,.1f}", f"{best[b].label}: {sps['hand', b]:,.1f}",
                  f"{sps['kiln', b] / sps['hand', b]:.2f}×")  # fmt: skip
    console.print(t)
    console.print(f"minilm: kiln's embeddings at real length vs onnxruntime fp32 at 128: mean cosine "
                  f"{np.mean(cosine_rows(ref, mine)):.5f}", highlight=False)  # fmt: skip
    checks = []
    for b, bar in ((1, 3.0), (BATCH, 5.0)):
        ratio = sps["kiln", b] / sps["hand", b]
        checks.append(f"minilm sentences, batch {b}: kiln ÷ best fixed-128 ({best[b].label}) = {ratio:.2f}× "
                      f"(needs ≥ {bar:.0f}×): {'PASS' if ratio >= bar else 'FAIL'}")  # fmt: skip
    return checks


# ---- one model ------------------------------------------------------------------------------------------
def bench_model(name: str, root: Path, preset: str, reuse: bool, rounds: int, seconds: float,
                console: Any) -> tuple[list[str], list[str]]:  # fmt: skip
    """The table for one model; returns (checks with PASS/FAIL, headline lines)."""
    from rich.table import Table

    import kiln

    repo = root / "repo"
    s = setup(name, repo, preset)
    validation = s.split.validation
    feeds = {b: validation.first(b) for b in BATCHES}
    with console.status(f"{name}: quantizing and compiling the hand recipes …"):
        hands = hand_recipes(s, root / "hand" / name / f"v{s.version}", reuse, feeds)
    predictor = kiln.load(repo, name, batch_sizes=BATCHES)  # the sizes it runs: static shapes where it pays
    out = s.spec.outputs[0].name
    mine = Contestant(f"kiln's choice: {predictor.handle.label}", dict.fromkeys(BATCHES, predictor.predict),
                      lambda r: r[out], hand=False, close=predictor.close)  # fmt: skip
    everyone = [mine, *hands]
    checks: list[str] = []
    try:
        with console.status(f"{name}: accuracy on {len(validation)} held-out samples …"):
            reference = outputs_of(hands[0], validation)
            for c in everyone:
                c.accuracy, c.within = judge(s, reference, outputs_of(c, validation))
        with console.status(f"{name}: timing, {rounds} interleaved rounds …"):
            race(everyone, feeds, rounds, seconds)
        ort = hands[0]
        t = Table(title=f"{name}: batch-1 p50 latency and batch-{BATCH} throughput, median of {rounds} interleaved "
                        f"rounds; accuracy vs onnxruntime fp32 ({s.config.budget_text(s.metric)})",
                  title_justify="left")  # fmt: skip
        for col in ("contestant", "p50 b=1", "× ORT fp32", f"items/s b={BATCH}", "× ORT fp32", "accuracy", "budget"):
            t.add_column(col, justify="left" if col in ("contestant", "accuracy", "budget") else "right")
        for c in everyone:
            t.add_row(c.label, f"{c.ms:.3f} ms", f"{ort.ms / c.ms:.2f}×", f"{c.tput:,.1f}", f"{c.tput / ort.tput:.2f}×",
                      c.accuracy, "within" if c.within else "[red]outside[/]")  # fmt: skip
        console.print(t)
        fair = [c for c in hands if c.within]  # never empty: ONNX Runtime fp32 is the reference itself
        best1, best_n = min(fair, key=lambda c: c.ms), max(fair, key=lambda c: c.tput)
        lat, tput = mine.ms / best1.ms, mine.tput / best_n.tput
        checks.append(f"{name}: batch-1 latency kiln ÷ best hand recipe within budget ({best1.label}, "
                      f"{best1.ms:.3f} ms) = {lat:.2f} (needs ≤ 1.00): {'PASS' if lat <= 1.0 else 'FAIL'}")  # fmt: skip
        checks.append(f"{name}: batch-{BATCH} throughput kiln ÷ best hand recipe within budget ({best_n.label}, "
                      f"{best_n.tput:,.1f}/s) = {tput:.2f} (needs ≥ 1.00): {'PASS' if tput >= 1.0 else 'FAIL'}")  # fmt: skip
        if not mine.within:
            checks.append(f"{name}: kiln's choice is within its own budget here ({mine.accuracy}): FAIL")
        headline = (f"{name}: kiln's choice ÷ onnxruntime fp32: batch-1 latency {mine.ms / ort.ms:.2f} (below 1 is "
                    f"faster), batch-{BATCH} throughput {mine.tput / ort.tput:.2f} (above 1 is faster)")  # fmt: skip
        console.print(headline, highlight=False)
        if name == "minilm":
            checks += sentences_race(predictor, {1: best1, BATCH: best_n}, ort, rounds, seconds, console)
    finally:
        for c in everyone:
            c.close()
    return checks, [headline]


def main(argv: Sequence[str] | None = None) -> int:
    from kiln.console import console

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("kiln-bench-hand"))
    parser.add_argument("--models", default="digits,minilm,mobilenetv2,resnet50")
    parser.add_argument("--preset", default="cpu-latency", help="kiln optimize's preset (optimize_zoo's default)")
    parser.add_argument("--reuse", action="store_true", help="skip import/optimize where a choice exists")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK[0]} short rounds (a smoke test)")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if name not in optimize_zoo.MODELS:
            parser.error(f"unknown model {name!r}; choose from {sorted(optimize_zoo.MODELS)}")
    rounds, seconds = QUICK if args.quick else FULL
    checks: list[str] = []
    headlines: list[str] = []
    start = time.perf_counter()
    for name in names:
        console.rule(f"[bold]{name}[/]")
        prepare(name, args.dir / "repo", args.preset, args.reuse, console)
        more, lines = bench_model(name, args.dir, args.preset, args.reuse, rounds, seconds, console)
        checks += more
        headlines += lines
    console.rule("checks")
    for line in headlines + checks:
        console.print(line, highlight=False)
    console.print(f"total {time.perf_counter() - start:.0f} s")
    return 0 if all(line.endswith("PASS") for line in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
