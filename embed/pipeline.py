"""`build_store`, the image side's entry point: fill a feature store from an image source.

Roles as in clip-retrieval, each in its module: the reader (`embed.reader`: DataLoader worker
processes read, decode and resize images), the mapper (`embed.model_loop.embed_ids`: the frozen
backbone) and the writer (`embed.store_writer.StoreWriter`); settings in `embed.config`. This
module runs them for one store: it decides which ids to embed (those not stored yet and those
whose image changed), embeds them, and saves what it has when SIGTERM or SIGINT arrives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from common.files import reporting_write_errors
from embed.backbone import load_backbone
from embed.config import (
    EmbedConfig,
    EmbedSummary,
    embedding_identity,
    part_of,
    resolve_device,
    warn_if_small,
)
from embed.errors import EmbedError, EmbedInterrupted
from embed.model_loop import BatchTimer, embed_ids
from embed.reader import DECODE_INFO
from embed.sources import ImageSource, repeated_ids
from embed.store import fingerprinted_by_time
from embed.store_writer import StoreWriter
from embed.variants import AUTO, calibration_ids, default_variant, warn_if_unfaithful
from embed.weights import WeightsInfo

__all__ = [
    "build_store",
]


log = logging.getLogger(__name__)


def build_store(
    source: ImageSource,
    ids: Sequence[str] | None,
    store_dir: Path | str,
    dataset: str,
    weights: WeightsInfo,
    config: EmbedConfig,
) -> EmbedSummary:
    """Embed the ids of `ids` (None = all of `source.ids()`) that `store_dir` does not hold yet,
    and those whose image changed since it was embedded (by the source's fingerprints).

    With config.shard_count > 1 only the ids of part config.shard_index are embedded (see
    `part_of`); several such runs may write one store at once. Ids recorded as failed earlier
    are skipped unless config.retry_failed. Unreadable images are recorded in the manifest's
    failures and returned in the summary; they never stop the run.

    SIGTERM or SIGINT (main thread only) stop the run after the current batch: every row
    embedded so far is written, then EmbedInterrupted is raised (rerunning continues).

    config.variant "auto" resolves with the number of `ids` (`embed.variants.default_variant`:
    int8-mixed for a large data set on a CPU with VNNI int8). The int8 variants calibrate on
    `embed.variants.calibration_ids(ids)`, the same images in every part and every rerun.

    Raises EmbedError for repeated ids, a bad config, or a store locked by another writer of the
    same part; WriteError (common.files) when the store's folder cannot be written (read-only,
    full), naming the path; StoreMismatchError when the store was made with other weights,
    preprocessing, image size or views; EmbedInterrupted as above.
    """
    started = time.perf_counter()
    store_dir = Path(store_dir)
    ids = _unique_ids(source, ids)
    warn_if_small(config)
    device = resolve_device(config.device)
    if config.variant == AUTO:
        # "auto" knows here how many images the store is for: int8-mixed only where its
        # calibration is earned back (`default_variant`).
        config = replace(config, variant=default_variant(device, config.amp, len(ids)))
    identity = embedding_identity(weights, config)
    warn_if_unfaithful(identity["variant"])
    source_path = _describe(source)
    info = {"dataset": dataset, "source": source_path, "decode": DECODE_INFO}
    mine = _ids_of_part(ids, config)
    run = _Run()
    # A read-only or full disk ends the run with one error naming the path (every shard written
    # before it stays in the store), not an OSError traceback.
    with (
        reporting_write_errors(f"feature store {str(store_dir)!r}", store_dir),
        _StopSignals() as stop,
        _writer(store_dir, identity, info, config) as writer,
    ):
        _note_source(writer, source_path)
        now = _fingerprints(source, mine)
        plan = _plan(writer, mine, now, source, config)
        _log_plan(store_dir, mine, plan)
        if plan.todo and stop.received is None:
            model = load_backbone(weights, device, blocks=config.blocks, pooling=config.pooling)
            # int8 calibrates on images spread over the whole data set, never on what this run
            # happens to embed: a resumed or sharded build then computes the same function.
            calibrate_on = calibration_ids(ids)
            _embed(run, writer, source, plan.todo, now, model, config, stop, calibrate_on)
    # After the writer closed: the last shard and manifest are part of the run's cost.
    summary = _summarise(run, plan, writer, store_dir, config, started)
    _log_summary(summary, run.timer)
    if stop.received is not None:
        message = (
            f"interrupted by {stop.name}: {summary.embedded} rows saved to feature store "
            f"{str(store_dir)!r} ({summary.stored} in all); rerun the same command to continue"
        )
        log.warning("%s", message)
        raise EmbedInterrupted(message)
    return summary


def _unique_ids(source: ImageSource, ids: Sequence[str] | None) -> list[str]:
    """`ids` as strings (None = all of `source.ids()`); raises EmbedError for a repeated id."""
    ids = source.ids() if ids is None else [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = repeated_ids(ids)
        raise EmbedError(
            f"ids: {len(dup)} repeated id(s) ({', '.join(repr(i) for i in dup[:5])}); "
            "each image must appear once"
        )
    return ids


def _ids_of_part(ids: list[str], config: EmbedConfig) -> list[str]:
    """The ids this writer embeds (all of them unless the build is sharded), sorted."""
    return sorted(
        i
        for i in ids
        if config.shard_count == 1 or part_of(i, config.shard_count) == config.shard_index
    )


def _describe(source: ImageSource) -> str:
    """The source's folder or file as an absolute path: what a store records as `source`."""
    for attr in ("root", "path"):
        value = getattr(source, attr, None)
        if value is not None:
            return os.path.abspath(value)
    return repr(source)


class _StopSignals:
    """SIGTERM (what SLURM and `kill` send) and SIGINT (Ctrl-C) ask the run to stop after the
    current batch instead of ending the process at once, so the writer can save what it holds.

    Handlers are installed only in the main thread (Python delivers signals there, and
    `signal.signal` refuses other threads) and the previous ones are restored on exit. A second
    signal raises KeyboardInterrupt at once; the writer still saves its buffered rows.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; default it.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""


def _writer(store_dir: Path, identity: dict, info: dict, config: EmbedConfig) -> StoreWriter:
    return StoreWriter(
        store_dir,
        identity,
        shard_index=config.shard_index,
        shard_count=config.shard_count,
        shard_rows=config.shard_rows,
        max_shard_seconds=config.max_shard_seconds,
        info=info,
    )


def _note_source(writer: StoreWriter, source_path: str) -> None:
    recorded = writer.recorded.get("source")
    if recorded and recorded != source_path:
        log.info(
            "store %s was embedded from %s; this run reads %s: stored ids are kept unless their "
            "image fingerprint differs",
            writer.path,
            recorded,
            source_path,
        )


def _fingerprints(source: ImageSource, ids: list[str]) -> dict[str, str]:
    """The source's fingerprints of `ids` now; {} (every image unknown) for a source without
    them."""
    method = getattr(source, "fingerprints", None)
    if method is None or not ids:
        return {}
    t0 = time.perf_counter()
    found = method(ids)
    log.info("image fingerprints of %d ids read in %.1f s", len(ids), time.perf_counter() - t0)
    return found


@dataclass
class _Plan:
    """What a run does with each id of its part."""

    todo: list[str]  # to embed: not stored yet, or stored from an image that has changed
    skipped: list[str]  # stored, image unchanged (or not known to have changed)
    changed: list[str]
    previously_failed: dict[str, str]


def _plan(
    writer: StoreWriter, mine: list[str], now: dict[str, str], source, config: EmbedConfig
) -> _Plan:
    """Sort `mine` by what the store holds; changed images are marked to be embedded again."""
    changed = writer.changed({i: now[i] for i in mine if i in now})
    if changed:
        by_time = sum(fingerprinted_by_time(writer.stored_fingerprint(i)) for i in changed)
        how = getattr(source, "FINGERPRINT", "fingerprint")
        if by_time:
            # Said so that a user who only copied the folder knows why everything re-embeds.
            how = (
                f"{how}; {by_time} of them stored before the CRC was recorded, compared by "
                "size and modification time, which a copy of the folder moves"
            )
        log.warning(
            "%d image(s) changed since they were embedded (%s): embedding them again: ids %s",
            len(changed),
            how,
            ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else ""),
        )
        writer.supersede(changed)
    unknown = sum(1 for i in mine if i in writer.stored and writer.stored_fingerprint(i) is None)
    if unknown:
        log.info(
            "%d stored id(s) have no image fingerprint (embedded before fingerprints were "
            "recorded): whether their images changed cannot be told",
            unknown,
        )
    renew = set(changed)
    previously_failed = {
        i: writer.failures[i]
        for i in mine
        if i not in writer.stored and i in writer.failures and not config.retry_failed
    }
    return _Plan(
        todo=[
            i for i in mine if (i not in writer.stored or i in renew) and i not in previously_failed
        ],
        skipped=[i for i in mine if i in writer.stored and i not in renew],
        changed=changed,
        previously_failed=previously_failed,
    )


def _log_plan(store_dir: Path, mine: list[str], plan: _Plan) -> None:
    log.info(
        "store %s: %d ids for this part, %d already stored, %d changed, %d failed before%s, "
        "%d to embed",
        store_dir,
        len(mine),
        len(plan.skipped),
        len(plan.changed),
        len(plan.previously_failed),
        " (not retried; set retry_failed to retry)" if plan.previously_failed else "",
        len(plan.todo),
    )


@dataclass
class _Run:
    """What the embedding loop of one run did, filled in as it goes."""

    timer: BatchTimer = field(default_factory=BatchTimer)
    embedded: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    loop_start: float | None = None  # when the loop began, after the model was loaded


def _embed(
    run: _Run,
    writer: StoreWriter,
    source: ImageSource,
    todo: list[str],
    now: dict[str, str],
    model: torch.nn.Module,
    config: EmbedConfig,
    stop: _StopSignals,
    calibrate_on: list[str],
) -> None:
    """Embed `todo` into `writer` batch by batch, each row with its image's fingerprint in
    `now`; stops after the current batch once `stop` has received a signal. `calibrate_on`:
    the ids int8 calibrates on (`embed.variants.calibration_ids` of the data set)."""
    run.loop_start = time.perf_counter()  # the rate excludes loading the model
    batches = embed_ids(source, todo, model, config, timer=run.timer, calibrate_on=calibrate_on)
    with contextlib.closing(batches):
        for batch_ids, vectors, failures in batches:
            t0 = time.perf_counter()
            writer.append(batch_ids, vectors, [now.get(i) for i in batch_ids])
            if failures:
                writer.add_failures(failures)
                run.failed.update(failures)
            run.embedded += len(batch_ids)
            run.timer.write += time.perf_counter() - t0
            if stop.received is not None:
                break


def _summarise(
    run: _Run,
    plan: _Plan,
    writer: StoreWriter,
    store_dir: Path,
    config: EmbedConfig,
    started: float,
) -> EmbedSummary:
    loop_seconds = time.perf_counter() - run.loop_start if run.loop_start is not None else 0.0
    stored = len(writer.stored)
    seconds = time.perf_counter() - started
    processed = run.embedded + len(run.failed)
    rate = processed / loop_seconds if plan.todo and loop_seconds > 0 else 0.0
    return EmbedSummary(
        store_dir=store_dir,
        embedded=run.embedded,
        skipped_existing=len(plan.skipped),
        failed=run.failed,
        previously_failed=plan.previously_failed,
        seconds=seconds,
        images_per_s=rate,
        stored=stored,
        shard_index=config.shard_index,
        shard_count=config.shard_count,
        changed=plan.changed,
    )


def _log_summary(summary: EmbedSummary, timer: BatchTimer) -> None:
    previously_failed = summary.previously_failed
    log.info(
        "store %s: embedded %d, skipped %d already stored, %d failed%s, in %.1f s (%.1f images/s)",
        summary.store_dir,
        summary.embedded,
        summary.skipped_existing,
        len(summary.failed),
        f" (+{len(previously_failed)} failed earlier, not retried)" if previously_failed else "",
        summary.seconds,
        summary.images_per_s,
    )
    if timer.batches:
        log.info(
            "per batch: read wait %.3f s, infer %.3f s, write %.3f s (%d batches)",
            timer.read / timer.batches,
            timer.infer / timer.batches,
            timer.write / timer.batches,
            timer.batches,
        )
