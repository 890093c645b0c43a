"""``kiln.optimize``: build every variant this machine can run, check its accuracy against the original
model, time it, and choose the fastest within the budget, with the evidence.

Everything is cached by variant id (recipe + source hash): a recipe is never built twice, and its
figures are reused while the validation data and timing settings are unchanged.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln.console import ProgressHook
from kiln.engines.base import EngineOptions, get_engine, load_engine
from kiln.errors import (
    AccuracyBudgetError,
    KilnError,
    NotFoundError,
    NoVariantBuiltError,
    NoVariantWithinBudgetError,
    PassNotApplicable,
    first_line,
)
from kiln.memory import check_batch_memory, host_meter
from kiln.optimize import accuracy, choice, timing
from kiln.optimize.config import OptimizeConfig
from kiln.optimize.data import DataSplit, Samples, load_split, load_training
from kiln.optimize.passes import PassContext, run_passes
from kiln.optimize.plan import COMPRESSED, enumerate_variants
from kiln.optimize.results import OptimizeResult, VariantResult, fmt_objective
from kiln.optimize.size import SizeFigures, count_size
from kiln.optimize.training import check_trainable
from kiln.recipe import PassStep, Recipe, compression_prefix, stage_key
from kiln.repository import REFERENCE, REFERENCE_ENGINE, Repository, Variant, VariantRecipe
from kiln.spec import ModelSpec

REPORT_FILE = "optimize.json"
SLOWER = "int8 slower than"  # the reason an int8 variant is rejected on speed


def optimize(
    repo: str | Path | Repository,
    model: str,
    config: OptimizeConfig | None = None,
    *,
    version: int | None = None,
    progress: ProgressHook | None = None,
    **overrides: Any,
) -> OptimizeResult:
    """Search the variants of ``model`` for the fastest within the accuracy budget and record it."""
    from kiln.hardware import detect, physical_cores

    start = time.perf_counter()
    config = OptimizeConfig.build(config, **overrides)
    repository = repo if isinstance(repo, Repository) else Repository(repo)
    spec = repository.spec(model)
    check_batch_memory(spec, config.batch_size, "optimize option", "batch_size")
    number, vdir = repository.resolve(model, version)
    manifest = repository.manifest(model, number)
    split = load_split(spec, config.data, manifest.source, config.calibration_samples, config.validation_samples)
    metric = accuracy.choose_metric(config, spec, split.validation)
    device = detect().device(config.device)  # a device this machine lacks is a clear error here
    calibration = None if split.calibration is None else split.calibration.fingerprint()
    train, untrainable = _training(config, spec, manifest.source, vdir)
    recipes, skipped = enumerate_variants(
        config, vdir, device, calibration, None if train is None else train.fingerprint(), untrainable
    )
    threads = config.threads or physical_cores()
    searcher = _Search(config, repository.variant(model, number, REFERENCE), manifest.source_hash, split, metric,
                       threads, progress, repository, train, manifest.source)  # fmt: skip
    results = searcher.run(recipes)
    results += [VariantResult(id="-", label=s.label, recipe=None, status="skipped", reason=s.reason) for s in skipped]
    searcher.confirm_int8(results)
    baseline = _baseline(results, searcher.original.engine)
    _judge(results, config, baseline)
    if searcher.final_round(results):
        _judge(results, config, baseline)
    chosen = _choose(results, config.objective)
    notes = list(split.notes)
    if chosen is None:
        tried = sum(1 for v in results if v.accuracy is not None)
        failed = [v for v in results if v.status == "failed"]
        if not tried and failed:
            raise NoVariantBuiltError(model, len(failed), f"{failed[0].label}: {failed[0].reason}")
        raise NoVariantWithinBudgetError(model, tried, config.budget_text(metric))
    current = repository.spec(model)
    earlier = None if config.replace else choice.better_earlier(searcher, current.chosen_variant, results, chosen)
    large = None if earlier is not None or not config.choose else choice.large_batch_partner(searcher, results, chosen)
    if earlier is not None and config.choose:
        notes.append(earlier)
    if large is not None:
        partner = next(v for v in results if v.id == large.variant)
        notes.append(f"batches of {large.from_rows} rows or more run on {partner.label} ({partner.id}), faster "
                     f"there than {chosen.label}")  # fmt: skip
    result = OptimizeResult(
        model, number, config.objective, metric, config.budget_text(metric), _order(results, config.objective),
        chosen.id, baseline.id if baseline else None, split.source, notes, time.perf_counter() - start,
    )  # fmt: skip
    repository.save_report(model, number, REPORT_FILE, result.to_dict())
    if config.choose and earlier is None and (current.chosen_variant, current.chosen_large) != (chosen.id, large):
        repository.save_spec(current.model_copy(update={"chosen_variant": chosen.id, "chosen_large": large}))
    return result


class _Search:
    def __init__(
        self, config: OptimizeConfig, reference: Variant, source_hash: str, split: DataSplit, metric: str,
        threads: int, progress: ProgressHook | None, repository: Repository, train: Samples | None = None,
        source: str = "",
    ) -> None:  # fmt: skip
        self.config = config
        self.repository = repository
        self.train = train  # what fine-tuning passes train on
        self.source = source  # the manifest's source: the factory that rebuilds the torch module
        self.reference_variant = reference
        self.original = repository.original(reference.model, reference.version)
        self.spec = spec = reference.spec
        self.vdir = vdir = reference.path
        self.source_hash = source_hash
        self.split = split
        self.metric = metric
        self.threads = threads
        self.batch_sizes = (1, config.batch_size)  # what the variants are timed at: static shapes for both
        self.progress = progress or (lambda what, done, total: None)
        self.reference: accuracy.Outputs | None = None
        self.detect = _detector(spec, vdir, split.validation) if metric == "map50" else None
        from kiln.hardware import machine_fingerprint

        self.timing_key = {"batch": config.batch_size, "threads": threads, "min_time_s": config.min_time_s,
                           "machine": machine_fingerprint(), "device": config.device}  # fmt: skip
        self.calibration = None if split.calibration is None else split.calibration.batches(config.batch_size)
        self.skips: dict[str, str] = repository.skipped_variants(reference.model, reference.version)

    def _remember_skip(self, vid: str, reason: str) -> None:
        """A pass with nothing to do is a property of the model: remember it so reruns build nothing."""
        self.skips[vid] = reason
        self.repository.save_skipped_variants(self.reference_variant.model, self.reference_variant.version, self.skips)

    def run(self, recipes: list[Recipe]) -> list[VariantResult]:
        total = len(recipes) + 1
        self.progress("running the original model on the validation data", 0, total)
        self.reference = self._reference_outputs()
        results = []
        for i, recipe in enumerate(recipes, start=1):
            results.append(self._one(recipe, self._say(recipe.label(), i, total)))
        self.progress("done", total, total)
        return results

    def _say(self, label: str, done: int, total: int) -> Callable[[str], None]:
        return lambda what: self.progress(f"{label}: {what}", done, total)

    def _reference_outputs(self) -> accuracy.Outputs:
        """The original model's outputs: eager PyTorch when imported from PyTorch, else ONNX Runtime fp32."""
        options = EngineOptions(intra_op_threads=self.threads)
        with load_engine(self.original.engine, self.original.path, self.spec, options) as e:
            return accuracy.run_all(e.run, self.split.validation, self.config.batch_size)

    def _one(self, recipe: Recipe, say: Callable[[str], None]) -> VariantResult:
        vid = recipe.variant_id(self.source_hash)
        result = VariantResult(id=vid, label=recipe.label(), recipe=recipe)
        try:
            if vid in self.skips:
                raise PassNotApplicable(self.skips[vid])
            variant = self._built(vid)
            if variant is None:
                say("building")
                variant = self._build(recipe, vid, say)
                result.built = True
            result.passes = variant.recipe.pass_reports if variant.recipe else []
            figures = variant.figures()
            fingerprint = self.split.fingerprint()
            acc = figures.get("accuracy")
            if acc and acc.get("fingerprint") == fingerprint and acc.get("metric") == self.metric:
                result.accuracy = accuracy.AccuracyFigures(**{k: v for k, v in acc.items() if k != "fingerprint"})
            tim = figures.get("timing")
            if tim and figures.get("timing_key") == self.timing_key and not self.config.retime:
                result.timing = timing.Timing(**tim)
            result.size = SizeFigures.from_dict(figures.get("size"))
            if result.accuracy is None or result.timing is None or result.size is None:
                result.fresh = True
                self._measure(recipe, variant, result, say)
                variant.save_figures({
                    "variant": vid, "label": result.label, "measured": datetime.now(UTC).isoformat(timespec="seconds"),
                    "accuracy": {**result.accuracy.to_dict(), "fingerprint": fingerprint} if result.accuracy else None,
                    "timing": result.timing.to_dict() if result.timing else None, "timing_key": self.timing_key,
                    "size": result.size.to_dict() if result.size else None,
                    "compile_s": result.timing.first_run_s if result.timing and _compiles(recipe) else None,
                    "passes": result.passes, "data": self.split.source,
                })  # fmt: skip
            if result.accuracy is not None:
                accuracy.check(vid, result.accuracy, self.config)
        except PassNotApplicable as exc:
            result.status, result.reason = "skipped", str(exc)
            self._remember_skip(vid, str(exc))
        except AccuracyBudgetError as exc:
            result.status, result.reason = "rejected", _budget_reason(exc)
        except KilnError as exc:
            result.status, result.reason = "failed", str(exc)
            self._record_failure(vid, str(exc))
        except Exception as exc:  # a library failing on one variant must not end the search
            first = first_line(exc, 200)
            result.status, result.reason = "failed", f"{type(exc).__name__}: {first}"
            self._record_failure(vid, f"{type(exc).__name__}: {str(exc).strip()}")
        return result

    def _record_failure(self, vid: str, text: str) -> None:
        """A built variant that failed keeps the failure's whole text in its ``figures.json`` (the table shows
        one line of it; ``report/optimize.json`` has the first line of each failure)."""
        try:
            variant = self.variant(vid)
            if variant.recipe is None:
                return
            variant.save_figures({**variant.figures(), "failure": text,
                                  "failed": datetime.now(UTC).isoformat(timespec="seconds")})  # fmt: skip
        except (KilnError, OSError):
            pass  # not built: nothing on disk to keep it in

    def variant(self, vid: str) -> Variant:
        return self.repository.variant(self.reference_variant.model, self.reference_variant.version, vid)

    def _built(self, vid: str) -> Variant | None:
        try:
            return self.variant(vid)
        except NotFoundError:
            return None

    def confirm_int8(self, results: list[VariantResult]) -> None:
        """Before an int8 variant is rejected as slower than its engine's fp32, time the two again,
        interleaved: on a shared machine one burst of load must not decide it."""
        obj = self.config.objective
        plain = _plain_fp32(results)
        for v in results:
            if v.recipe is None or v.recipe.int8 is None or v.status != "accepted" or v.timing is None:
                continue
            ref = plain.get(_engine_key(v.recipe))
            if ref is not None and (v.fresh or ref.fresh) and (v.objective(obj) or 0) > (ref.objective(obj) or 0):
                self._retime([v, ref], f"{v.label}: slower than {ref.label}? timing both again")

    def final_round(self, results: list[VariantResult]) -> bool:
        """Time the fastest few variants within the budget again, round-robin, and keep those figures: a
        choice between close variants should not hang on which one ran while the machine was busy. An
        int8 variant rejected on speed competes too, since the judgement is made again on these figures."""
        obj = self.config.objective
        contenders = (
            v
            for v in results
            if v.timing is not None
            and (v.status == "accepted" or (v.status == "rejected" and v.reason.startswith(SLOWER)))
        )
        ranked = sorted(contenders,
                        key=lambda v: v.objective(obj) or float("inf"))  # fmt: skip
        finalists = ranked[: self.config.finalists]
        if len(finalists) < 2 or not any(v.fresh for v in results):
            return False
        self._retime(finalists, f"final round: the {len(finalists)} fastest variants, interleaved")
        return True

    def _retime(self, variants: list[VariantResult], what: str) -> None:
        self.progress(what, 0, 1)
        validation = self.split.validation
        feed1, feed_n = validation.first(1), validation.first(self.config.batch_size)
        timed = [v for v in variants if v.recipe is not None and v.timing is not None]
        engines = []
        try:
            for v in timed:
                r = v.recipe
                if r is None:  # filtered above; keeps the type checker informed
                    continue
                options = EngineOptions(
                    r.device, r.precision, self.threads, run=dict(r.options), batch_sizes=self.batch_sizes
                )
                engine = load_engine(r.engine, self.variant(v.id).path, self.spec, options)
                engines.append(engine)
                for _ in range(3):  # warm-up (compiles again for torch.compile variants)
                    engine.run(feed1)
                    engine.run(feed_n)
            figures = timing.interleave([e.run for e in engines], feed1, feed_n, min_time_s=self.config.min_time_s)
        finally:
            for e in engines:
                e.close()
        for v, (latency, throughput) in zip(timed, figures, strict=True):
            if v.timing is None:
                continue
            v.timing = dataclasses.replace(v.timing, latency_ms=latency, throughput=throughput)
            variant = self.variant(v.id)
            stored = variant.figures()
            stored["timing"], stored["retimed_interleaved"] = v.timing.to_dict(), True
            variant.save_figures(stored)

    def _build(self, recipe: Recipe, vid: str, say: Callable[[str], None]) -> Variant:
        model, number = self.reference_variant.model, self.reference_variant.version
        with self.repository.new_variant(model, number) as staging:
            key = recipe.artifact_key(self.source_hash)
            donor = self.repository.find_variant(model, number, key)
            prefix = compression_prefix(recipe.passes)
            if donor is not None and donor.recipe is not None:  # same files, other run options (a hint, a precision)
                self.repository.share_artifacts(donor, staging)
                reports = donor.recipe.pass_reports
            elif prefix:  # pruned (and distilled) once for every engine and int8 kind that follows
                stage, reports = self._stage(prefix, say)
                self.repository.share_stage(stage, staging)
                rest = recipe.passes[len(prefix) :]
                reports = [*reports, *(r.to_dict() for r in run_passes(rest, self._context(staging, say)))]
                self.repository.keep_artifact(staging, get_engine(recipe.engine).artifact)
            else:
                self.repository.share_artifacts(self.reference_variant, staging, recipe.base_artifact)
                reports = [r.to_dict() for r in run_passes(recipe.passes, self._context(staging, say))]
            from kiln._version import __version__

            record = VariantRecipe.of(
                recipe, label=recipe.label(), variant_id=vid, artifact_key=key, source_hash=self.source_hash,
                pass_reports=reports, kiln_version=__version__, built=datetime.now(UTC).isoformat(timespec="seconds"),
            )  # fmt: skip
            return self.repository.save_variant(model, number, staging, record)

    def _context(self, work: Path, say: Callable[[str], None]) -> PassContext:
        return PassContext(
            work, self.spec, self.calibration, source=self.source, version_dir=self.vdir, train=self.train,
            validation=None, train_budget_s=self.config.train_budget_s, progress=say,  # stop on held-out training data
        )  # fmt: skip

    def _stage(self, prefix: tuple[PassStep, ...], say: Callable[[str], None]) -> tuple[Path, list[dict[str, Any]]]:
        """The files after the compression ``prefix`` (built once, kept as a stage of the version) and the
        reports of its passes."""
        model, number = self.reference_variant.model, self.reference_variant.version
        key = stage_key(self.source_hash, prefix)
        found = self.repository.stage(model, number, key)
        if found is not None:
            return found
        with self.repository.new_variant(model, number) as staging:
            for artifact in COMPRESSED:
                self.repository.share_artifacts(self.reference_variant, staging, artifact)
            reports = [r.to_dict() for r in run_passes(prefix, self._context(staging, say))]
            return self.repository.save_stage(model, number, key, staging, reports), reports

    def _measure(self, recipe: Recipe, variant: Variant, result: VariantResult, say: Callable[[str], None]) -> None:
        options = EngineOptions(recipe.device, recipe.precision, self.threads, run=dict(recipe.options),
                                batch_sizes=self.batch_sizes)  # fmt: skip
        with host_meter() as meter:  # peak memory over the load and the timing at batch 1 and N, as the bench meters
            t0 = time.perf_counter()
            engine = load_engine(recipe.engine, variant.path, self.spec, options)
            load_s = time.perf_counter() - t0
            try:
                validation: Samples = self.split.validation
                feed1, feed_n = validation.first(1), validation.first(self.config.batch_size)
                if _compiles(recipe):
                    say("compiling")
                say("timing")
                result.timing = timing.measure(engine.run, feed1, feed_n, min_time_s=self.config.min_time_s,
                                               warmup=self.config.warmup, load_s=load_s, threads=self.threads)  # fmt: skip
                meter.stop()
                say("checking accuracy")
                outputs = accuracy.run_all(engine.run, validation, self.config.batch_size)
                if self.reference is None:
                    raise RuntimeError("the reference outputs are computed before any variant")
                result.accuracy = accuracy.measure(
                    self.metric, self.spec, self.reference, outputs, validation.labels, self.detect
                )
            finally:
                meter.stop()
                engine.close()
                if _compiles(recipe):
                    get_engine(recipe.engine).reset_compiled()
        say("counting parameters and MACs")
        result.size = count_size(variant, get_engine(recipe.engine).artifact).with_peak(meter.delta, meter.kind)


def _detector(spec: ModelSpec, vdir: Path, samples: Samples) -> accuracy.Detect:
    """Outputs on ``samples`` -> boxes through the spec's own post-processing (decode, threshold, NMS),
    as served; the ops see the input tensors (the anchor grid follows the image size)."""
    from kiln.processing import Batch, Pipeline

    pipeline = Pipeline.from_spec(spec, root=vdir)
    batch = Batch(samples.inputs, [{} for _ in range(len(samples))])
    return lambda outputs: pipeline.postprocess(outputs, batch)


def _training(config: OptimizeConfig, spec: ModelSpec, source: str, vdir: Path) -> tuple[Samples | None, str | None]:
    """The training data for pruning/QAT when they are asked for, and why the model cannot be fine-tuned."""
    if not (config.prune or config.qat):
        return None, None
    try:
        check_trainable(source, vdir)
    except PassNotApplicable as exc:
        return None, str(exc)
    return load_training(spec, config.train_data, source), None


def _compiles(recipe: Recipe) -> bool:
    """Whether the variant compiles when it loads (torch.compile): its first run is compile time."""
    return not get_engine(recipe.engine).is_plain(recipe.options)


def _budget_reason(exc: AccuracyBudgetError) -> str:
    return f"out of budget: {exc.metric} {exc.value:.4g} (needs {exc.rule} {exc.bound:.4g})"


def _baseline(results: list[VariantResult], original: str) -> VariantResult | None:
    """What speed-ups are quoted against: the original model's engine at fp32 (torch eager for a PyTorch
    import), else the reference's (ONNX Runtime fp32)."""
    for engine in dict.fromkeys((original, REFERENCE_ENGINE)):
        for v in results:
            r = v.recipe
            if r is not None and r.engine == engine and not r.passes and r.is_reference and v.timing is not None:
                return v
    return None


def _engine_key(recipe: Recipe) -> tuple[str, Any]:
    return recipe.engine, get_engine(recipe.engine).peer_key(recipe.options)


def _plain_fp32(results: list[VariantResult]) -> dict[tuple[str, Any], VariantResult]:
    """Each engine's (and OpenVINO hint's) plain fp32 variant: what its int8 variants must beat."""
    return {
        _engine_key(v.recipe): v
        for v in results
        if v.recipe is not None and v.recipe.is_reference and v.timing is not None
    }


def _judge(results: list[VariantResult], config: OptimizeConfig, baseline: VariantResult | None) -> None:
    """Reject int8 slower than its engine's fp32; mark the Pareto frontier; compute speed-ups.

    A function of the figures alone: a speed verdict from an earlier call is taken back first, so a
    rerun that reads the same figures from disk reaches the same choice as the run that timed them."""
    obj = config.objective
    plain = _plain_fp32(results)
    for v in results:
        if v.status == "rejected" and v.reason.startswith(SLOWER):
            v.status, v.reason = "accepted", ""
    for v in results:
        if v.recipe is None or v.recipe.int8 is None or v.status != "accepted" or v.timing is None:
            continue
        ref = plain.get(_engine_key(v.recipe))
        if ref is not None and (v.objective(obj) or 0) > (ref.objective(obj) or 0):
            unit = fmt_objective(v, obj), fmt_objective(ref, obj)
            v.status, v.reason = "rejected", f"{SLOWER} {ref.label} ({unit[0]} vs {unit[1]})"
    measured = [v for v in results if v.timing is not None and v.accuracy is not None]
    for v in measured:
        speed, quality = -(v.objective(obj) or 0), v.accuracy.quality if v.accuracy else 0
        v.pareto = not any(
            (-(u.objective(obj) or 0) >= speed and u.accuracy is not None and u.accuracy.quality >= quality)
            and (-(u.objective(obj) or 0) > speed or u.accuracy.quality > quality)
            for u in measured
            if u is not v
        )
    if baseline is not None and baseline.timing is not None:
        b = baseline.objective(obj) or 0
        for v in results:
            if v.timing is not None:
                v.speedup = b / (v.objective(obj) or 1)


def _choose(results: list[VariantResult], objective: str) -> VariantResult | None:
    accepted = [v for v in results if v.status == "accepted" and v.timing is not None]
    if not accepted:
        return None
    best = min(accepted, key=lambda v: v.objective(objective) or float("inf"))
    best.status = "chosen"
    return best


def _order(results: list[VariantResult], objective: str) -> list[VariantResult]:
    rank = {"chosen": 0, "accepted": 0, "rejected": 0, "failed": 1, "skipped": 2}

    def key(v: VariantResult) -> tuple[int, float]:
        o = v.objective(objective)
        return (rank[v.status] if o is not None else max(rank[v.status], 1), o if o is not None else 0.0)

    return sorted(results, key=key)
