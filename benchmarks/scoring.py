"""How fast scoring is end to end, beside the embedding pipeline alone on the same images, and
what the reasons and the triage page add to it.

`bench_scoring` writes a folder of `n_images` JPEGs (the run's own training images, cycled under new
ids) with a metadata CSV (their rows, target dropped), then times, in the same process and run:

1. the baseline, the embedding pipeline alone: weights check (`ensure_weights`), backbone load and
   `embed.model_loop.embed_ids` over the folder with the run's image size and views, vectors kept
   in memory (what `invoke embed` does, less writing a store);
2. `fuse.scoring.score.score` on the same folder and CSV, end to end, without explanations
   (`explain=False`, no page): the same, plus reading the metadata, loading every stage's fold
   models, metadata features, predictions, the final model and writing the CSV;
3. `fuse.scoring.score.score` as `invoke score` runs it by default: 2. plus the `reasons` column
   (LightGBM's SHAP values, every row), the triage page (thumbnails of the rows shown) and a
   Grad-CAM saliency overlay for up to `overlays` flagged lesions (a backbone pass and a backward
   pass through the fusion MLPs each, `fuse.scoring.saliency`).

The embedding baseline runs once untimed first (page cache, CUDA context, kernel choice), then
the three run `repeats` times each, in turn; the fastest of each counts. The ratio of 2.'s rate to
1.'s says what scoring costs beyond embedding (the target is >= 0.8); the ratio of 3.'s time to
2.'s says what the reasons, the page and its overlays cost.

`bench_startup` (run by `bench_scoring` too) times what a clinician scoring a handful of lesions
waits for: `invoke score` on `STARTUP_IMAGES` images in a fresh process (start-up included: imports,
weights check, models, page), beside the bare import of torch, lightgbm and pandas in a fresh
process, alternately, the median of each; the target is a ratio of at most 1.5.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import synchronize
from fuse.errors import RunError
from fuse.scoring.score import read_scoring_metadata, score
from fuse.stores import run_identity
from runfolder.layout import RunLayout
from tabular.spec import DatasetSpec, spec_from_identity

__all__ = [
    "BARE_IMPORT",
    "OVERLAYS",
    "PNG_MAGIC",
    "STARTUP_IMAGES",
    "STARTUP_TARGET",
    "TARGET_RATIO",
    "bench_scoring",
    "bench_startup",
]

log = logging.getLogger(__name__)

TARGET_RATIO = 0.8
# `invoke score` of a few images in a fresh process, against the bare import of its heavy libraries.
STARTUP_IMAGES = 10
STARTUP_TARGET = 1.5
BARE_IMPORT = "import torch, lightgbm, pandas"
_REPO = Path(__file__).resolve().parents[1]
# Flagged lesions given a saliency overlay in the explained run (`invoke score`'s default).
OVERLAYS = 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_scoring(
    run_dir: Path | str,
    n_images: int = 2000,
    *,
    weights: Path | str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    num_workers: int | None = None,
    workdir: Path | str | None = None,
    repeats: int = 1,
    overlays: int = OVERLAYS,
    startup_images: int = STARTUP_IMAGES,
    startup_repeats: int = 3,
) -> dict:
    """Images/s of `score` end to end and of the embedding pipeline alone, on the same images.

    Args:
        run_dir: a run ready to score (`invoke stack` done) whose spec has images.
        n_images: images in the benchmark folder (the run's images, cycled), >= 1.
        weights, batch_size, device, num_workers: as in `fuse.scoring.score.score`.
        workdir: where the folder and outputs go (default: a temporary folder, removed after);
            `predictions.csv` (plain), `predictions-explained.csv` and `triage.html` (explained).
        repeats: timed runs of each side (the fastest counts), >= 1.
        overlays: flagged lesions given a saliency overlay in the explained run, >= 0.
        startup_images, startup_repeats: `bench_startup`'s images (0: not run) and repeats.

    Returns:
        dict: n_images, device, image_size, views, batch_size, embed_only_s,
        embed_only_images_per_s, score_s, score_images_per_s (scoring without reasons or page),
        ratio (score rate / embedding rate), target_ratio, meets_target, explained_s,
        explained_images_per_s (with reasons, triage page and overlays), explained_over_plain
        (explained time / plain scoring time), overlays_asked, overlays (drawn on the page),
        flagged, final, repeats, rows_with_error, startup (`bench_startup`'s; not with 0 images).

    Raises:
        RunError: as `score`; no run at `run_dir`; the run's spec has no images, or no stage of
            the run read images; the weights differ from the run's; `n_images` or `repeats` < 1.
    """
    _check_counts(n_images, repeats, overlays)
    run, spec, images = _image_run(run_dir)
    identity = run_identity(run)
    if identity is None:
        raise RunError(
            f"run {run.dir}: no stage was trained on image embeddings; nothing to compare "
            "scoring with"
        )
    from embed.sources import open_source

    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="score-bench-")) if workdir is None else Path(workdir)
    try:
        folder, metadata = _bench_folder(workdir, spec, open_source(images), n_images)
        sides = _Sides(
            run.dir,
            folder,
            metadata,
            workdir,
            identity,
            weights,
            batch_size,
            device,
            num_workers,
            overlays,
        )
        ids = [p.stem for p in sorted(folder.iterdir())]
        sides.embedding_alone(ids[: min(len(ids), 2 * sides.batch_size)])  # warm-up, untimed
        seconds, embedded, result, explained = _fastest(sides, ids, repeats)
        drawn = (workdir / "triage.html").read_text().count('alt="saliency of ')
        startup = None
        if startup_images:
            startup = bench_startup(
                run.dir,
                startup_images,
                weights=weights,
                device=device,
                workdir=workdir / "startup",
                repeats=startup_repeats,
            )
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    figures = {
        "n_images": n_images,
        "device": sides.device_name(),
        "image_size": int(identity["image_size"]),
        "views": int(identity["views"]),
        "batch_size": sides.batch_size,
        "embedded": embedded,
        "repeats": repeats,
        **_rates(n_images, *seconds),
        "overlays_asked": overlays,
        "overlays": drawn,
        "flagged": int(explained["flagged"].fillna(False).sum()),
        "final": result.attrs.get("final"),
        "rows_with_error": int((result["error"] != "").sum()),
        **({"startup": startup} if startup else {}),
    }
    log.info("score bench: %s", json.dumps(figures))
    return figures


def _check_counts(n_images, repeats, overlays=0) -> None:
    """RunError naming `n_images` or `repeats` (>= 1) or `overlays` (>= 0) when not such a count."""
    if not isinstance(n_images, int) or n_images < 1:
        raise RunError(f"n_images: expected a positive integer, got {n_images!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise RunError(f"repeats: expected a positive integer, got {repeats!r}")
    if isinstance(overlays, bool) or not isinstance(overlays, int) or overlays < 0:
        raise RunError(f"overlays: expected an integer >= 0, got {overlays!r}")


def _image_run(run_dir: Path | str) -> tuple[RunLayout, DatasetSpec, Path]:
    """The run, its spec and the spec's images; RunError when there is no run or its spec's
    images are not there."""
    run = RunLayout(Path(run_dir)).require()
    spec = spec_from_identity(run.read_record()["spec"])
    if spec.images is None or not Path(spec.images).exists():
        raise RunError(
            f"run {run.dir}: its spec '{spec.name}' has no images at {spec.images}; nothing to "
            "score"
        )
    return run, spec, Path(spec.images)


class _Sides:
    """The two things `bench_scoring` times on one folder: the embedding pipeline alone, and
    `score` (plain or explained). Built before any timing: weights other than the run's are
    refused here, as `score` would refuse them."""

    def __init__(
        self,
        run_dir: Path,
        folder: Path,
        metadata: Path,
        workdir: Path,
        identity: dict,
        weights,
        batch_size: int | None,
        device: str,
        num_workers: int | None,
        overlays: int,
    ):
        from embed.config import (
            config_for_identity,
            embedding_identity,
            resolve_device,
            settle_config,
        )
        from embed.errors import StoreMismatchError
        from embed.identity import check_identity
        from embed.weights import ensure_weights

        self.run_dir, self.folder, self.metadata, self.workdir = run_dir, folder, metadata, workdir
        self.weights, self.device, self.num_workers, self.overlays = (
            weights,
            device,
            num_workers,
            overlays,
        )
        self.asked_batch_size = batch_size
        self.resolved = resolve_device(device)
        # The embedding settings scoring uses: the run's image size and views.
        self.config = settle_config(
            config_for_identity(
                identity,
                batch_size=batch_size,
                device=device,
                num_workers=num_workers,
                progress=False,
            ),
            self.resolved,
        )
        self.batch_size = int(self.config.batch_size or 1)  # settled: always set
        info = ensure_weights(Path(weights) if weights else None)
        try:
            check_identity(
                embedding_identity(info, self.config),
                identity,
                "scoring",
                "the run's models were trained on",
                hint=f"weights at hand: {info.path}; pass the file the run was trained with",
            )
        except StoreMismatchError as error:
            raise RunError(str(error)) from error

    def device_name(self) -> str:
        import torch

        if self.resolved.type == "cuda":
            return torch.cuda.get_device_name(self.resolved)
        return f"cpu ({torch.get_num_threads()} threads)"

    def embedding_alone(self, subset: list[str]) -> tuple[float, int]:
        """(seconds, images embedded): weights check, backbone load and the embedding loop."""
        from embed.backbone import load_backbone
        from embed.model_loop import embed_ids
        from embed.sources import FolderSource
        from embed.weights import ensure_weights

        config = self.config
        start = time.perf_counter()
        info = ensure_weights(Path(self.weights) if self.weights else None)
        model = load_backbone(info, "cpu", blocks=config.blocks, pooling=config.pooling)
        count = 0
        for batch_ids, _, _ in embed_ids(FolderSource(self.folder), subset, model, config):
            count += len(batch_ids)
        synchronize(self.resolved)
        return time.perf_counter() - start, count

    def scoring(self, explained: bool) -> tuple[float, pd.DataFrame]:
        """(seconds, predictions) of `score` on the folder, with or without reasons and page."""
        extra = (
            {"explain": True, "page": self.workdir / "triage.html", "overlays": self.overlays}
            if explained
            else {"explain": False, "page": None}
        )
        out = self.workdir / ("predictions-explained.csv" if explained else "predictions.csv")
        start = time.perf_counter()
        result = score(
            self.run_dir,
            self.folder,
            self.metadata,
            out,
            batch_size=self.asked_batch_size,
            device=self.device,
            weights=self.weights,
            num_workers=self.num_workers,
            progress=False,
            **extra,
        )
        synchronize(self.resolved)
        return time.perf_counter() - start, result


def _fastest(sides: _Sides, ids: list[str], repeats: int):
    """((embed_s, score_s, explained_s), images embedded, plain and explained predictions): each
    side `repeats` times in turn, the fastest of each counts."""
    embed_s = score_s = explained_s = float("inf")
    for _ in range(repeats):
        seconds, embedded = sides.embedding_alone(ids)
        embed_s = min(embed_s, seconds)
        seconds, result = sides.scoring(explained=False)
        score_s = min(score_s, seconds)
        seconds, explained = sides.scoring(explained=True)
        explained_s = min(explained_s, seconds)
    return (embed_s, score_s, explained_s), embedded, result, explained


def _rates(n_images: int, embed_s: float, score_s: float, explained_s: float) -> dict:
    """The rates and ratios of `bench_scoring`'s figures from its fastest seconds."""
    embed_rate = n_images / embed_s
    score_rate = n_images / score_s
    return {
        "embed_only_s": round(embed_s, 3),
        "embed_only_images_per_s": round(embed_rate, 2),
        "score_s": round(score_s, 3),
        "score_images_per_s": round(score_rate, 2),
        "ratio": round(score_rate / embed_rate, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": score_rate / embed_rate >= TARGET_RATIO,
        "explained_s": round(explained_s, 3),
        "explained_images_per_s": round(n_images / explained_s, 2),
        "explained_over_plain": round(explained_s / score_s, 3),
    }


def bench_startup(
    run_dir: Path | str,
    n_images: int = STARTUP_IMAGES,
    *,
    weights: Path | str | None = None,
    device: str = "auto",
    workdir: Path | str | None = None,
    repeats: int = 3,
    page: bool = True,
) -> dict:
    """Seconds of `invoke score` on `n_images` images in a fresh process, beside the bare import.

    Each repeat runs, one after the other, `python -c "import torch, lightgbm, pandas"` and
    `invoke score --run R --images DIR --metadata CSV --out PREDS.csv` (as a user runs it: the
    triage page with its overlays, unless `page` is False), each in a new process from this
    repository's root; the median of each counts (a loaded machine makes single runs noisy).
    One untimed scoring comes first: the first with a weights file also saves the backbone's
    stages as TorchScript (`embed.backbone_cache`), which every later one loads.

    Args:
        run_dir: a run ready to score whose spec has images.
        n_images: images scored (the run's images, cycled), >= 1.
        weights, device: as `invoke score`'s `--weights` and `--device`.
        workdir: where the images and outputs go (default: a temporary folder, removed after).
        repeats: pairs of timings, >= 1.
        page: write the triage page (with `invoke score`'s default overlays) or `--no-html`.

    Returns:
        dict: n_images, repeats, page, bare_import_s and score_s (medians), bare_import_all_s and
        score_all_s (every timing), ratio (score_s / bare_import_s), target_ratio, meets_target,
        load_average (1-minute, before and after).

    Raises:
        RunError: `n_images` or `repeats` < 1; as `bench_scoring` for the run; the score
            command failed (its last output lines are in the message).
    """
    _check_counts(n_images, repeats)
    run, spec, images = _image_run(run_dir)
    from embed.sources import open_source

    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="score-startup-")) if workdir is None else Path(workdir)
    try:
        folder, metadata = _bench_folder(workdir, spec, open_source(images), n_images)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
        }
        score_cmd = [
            sys.executable,
            "-m",
            "invoke",
            "score",
            "--run",
            str(run.dir.resolve()),
            "--images",
            str(folder),
            "--metadata",
            str(metadata),
            "--out",
            str(workdir / "predictions.csv"),
            "--device",
            device,
            *(["--weights", str(weights)] if weights else []),
            *([] if page else ["--no-html"]),
        ]
        bare_cmd = [sys.executable, "-c", BARE_IMPORT]

        # Untimed: the first scoring with a weights file saves the backbone's stages as
        # TorchScript (`embed.backbone_cache`), once; a clinician's later scorings load them.
        _timed(score_cmd, env)
        load_before = os.getloadavg()[0]
        bare, scored = [], []
        for _ in range(repeats):
            bare.append(_timed(bare_cmd, env))
            scored.append(_timed(score_cmd, env))
        load_after = os.getloadavg()[0]
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    bare_s, score_s = statistics.median(bare), statistics.median(scored)
    figures = {
        "n_images": n_images,
        "repeats": repeats,
        "page": page,
        "bare_import": BARE_IMPORT,
        "bare_import_s": round(bare_s, 3),
        "score_s": round(score_s, 3),
        "bare_import_all_s": [round(x, 3) for x in bare],
        "score_all_s": [round(x, 3) for x in scored],
        "ratio": round(score_s / bare_s, 3),
        "target_ratio": STARTUP_TARGET,
        "meets_target": score_s / bare_s <= STARTUP_TARGET,
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }
    log.info("score start-up bench: %s", json.dumps(figures))
    return figures


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of `cmd` in a new process from the repository's root; RunError with the last
    lines of its output when it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RunError(f"{' '.join(cmd[:4])} ... exited {done.returncode}: {tail}")
    return seconds


def _bench_folder(workdir: Path, spec: DatasetSpec, source, n_images: int) -> tuple[Path, Path]:
    """`workdir/images/<id>.jpg|png` (the run's images cycled) and `workdir/metadata.csv`."""
    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    frame = read_scoring_metadata(Path(spec.metadata), spec)
    available = set(map(str, source.ids()))
    frame = frame[frame[spec.id].isin(available)].reset_index(drop=True)
    if frame.empty:
        raise RunError(
            f"run spec '{spec.name}': none of its metadata rows has an image in {spec.images}"
        )
    rows = []
    for i in range(n_images):
        row = frame.iloc[i % len(frame)].to_dict()
        data = source.read_bytes(str(row[spec.id]))
        new_id = f"bench{i:06d}"
        suffix = ".png" if data.startswith(PNG_MAGIC) else ".jpg"
        (folder / f"{new_id}{suffix}").write_bytes(data)
        row[spec.id] = new_id
        rows.append(row)
    metadata = workdir / "metadata.csv"
    pd.DataFrame(rows).to_csv(metadata, index=False)
    return folder, metadata
