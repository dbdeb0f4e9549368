"""lesionfuse commands: `invoke --list`. Each task parses its options and calls one function.

Every option is a named flag (`--spec S`), none positional: invoke fills a positional argument with
the next word, so `invoke embed --help` took "--help" as the spec. No option has a short form
either: invoke would make them up from the first free letter (`-h` was `--shard`), shadowing `-h`
for help. Required options are checked here, naming the option and what it takes.
"""

from __future__ import annotations

import logging
import sys

from invoke import task

from common.shutdown import skip_final_collection
from embed.pooled import DEFAULT_BLOCKS, DEFAULT_POOLING  # torch-free: --help stays fast

# The command line's process ends after its tasks: skip the shutdown's sweep over every object
# torch and the others made (about 0.5 s of each command's exit; `common.shutdown`).
skip_final_collection()


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _fail(error: ValueError) -> None:
    """Print a user-facing error without a traceback and exit non-zero."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


SPEC_HELP = "required: dataset spec TOML, or an ISIC 2024 Kaggle-layout directory"
RUN_HELP = "required: run name (artifacts/runs/<run>) or a path"
_REQUIRED = {
    "spec": SPEC_HELP,
    "run": RUN_HELP,
    "images": "required: folder of <id>.jpg|.jpeg|.png, or an HDF5 file of encoded images",
    "out": "required: where to write the predictions CSV",
}


def _task(**kwargs):
    """`@task` with every option a named flag without a short form (see the module docstring)."""
    return task(positional=[], auto_shortflags=False, **kwargs)


def _require(name: str, **given) -> None:
    """Exit with a message naming the required options of task `name` that were not given."""
    missing = [option for option, value in given.items() if value is None]
    if not missing:
        return
    flags = " and ".join(f"--{option.replace('_', '-')}" for option in missing)
    what = "; ".join(
        f"--{option.replace('_', '-')}: {_REQUIRED[option].removeprefix('required: ')}"
        for option in missing
    )
    print(
        f"error: invoke {name} needs {flags} ({what}); see `invoke {name} --help`", file=sys.stderr
    )
    sys.exit(2)


def _number(option: str, value, kind=int, default=None):
    """`value` (a command-line string) as `kind` (`default` when not given); exits 2 naming the
    option when it is not a number of that kind. Numeric options default to None in the task
    signatures for this: invoke would convert an option with an int default itself, and a typo
    would end in its traceback."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        print(f"error: --{option.replace('_', '-')} expects {what}, got {value!r}", file=sys.stderr)
        sys.exit(2)


def _run(function, *args, **kwargs):
    from common.errors import LesionfuseError

    try:
        return function(*args, **kwargs)
    except LesionfuseError as error:
        _fail(error)


@_task(help={"weights": "use this torchvision resnet50 state dict instead of the cached one"})
def weights(c, weights=None):
    """Obtain and verify the backbone weights (cached; offline once cached)."""
    _logging()
    from embed.weights import ensure_weights

    # Always the whole file: other commands trust a hash recorded while the file is unchanged.
    info = _run(ensure_weights, weights_path=weights, full_check=True)
    print(f"weights: {info.path}\nsha256: {info.sha256}\nsource: {info.source}")


@_task(
    help={
        "rows": "lesions in the synthetic data set (default 1500)",
        "trials": "Optuna trials for the GBDT (default 3)",
    }
)
def demo(c, rows=None, trials=None):
    """Make the synthetic demo data set, run the whole pipeline, print the report path."""
    _logging()
    from fuse.demo import run_demo

    report = _run(
        run_demo,
        rows=_number("rows", rows, default=1500),
        trials=_number("trials", trials, default=3),
    )
    print(f"report: {report}")


@_task(
    help={
        "spec": SPEC_HELP,
        "image_size": "square input size in pixels (default 224)",
        "views": "1 = the plain image (default); more = fixed flips/rotations, each kept",
        "zoom": "add a centre zoom view: the central fraction of each side resized to the input "
        "size, kept as one more view (default: none; for dermoscopy 0.5, README 'Where the "
        "backbone looks')",
        "blocks": "ResNet-50 stages pooled into the vector, comma-separated (default: "
        + ",".join(DEFAULT_BLOCKS)
        + ")",
        "pooling": "avg or gem (generalised mean, p=3), for every block (default: "
        + DEFAULT_POOLING
        + ")",
        "batch_size": "images per forward pass (default: 256 on CUDA, 32 on CPU)",
        "device": "auto, cpu or cuda",
        "weights": "torchvision resnet50 state dict to use instead of the cached weights",
        "shard": "i/n: embed only part i of n (for n parallel workers on one store)",
        "workers": "decode worker processes (default: chosen for the device)",
        "variant": "how the backbone is computed: auto (the measured default here), eager, "
        "folded, jit-frozen, "
        "compiled, int8-mixed or int8; recorded in the store's identity",
        "retry_failed": "try again the images an earlier run could not read",
    }
)
def embed(
    c,
    spec=None,
    image_size=None,
    views=None,
    zoom=None,
    blocks=None,
    pooling=None,
    batch_size=None,
    device="auto",
    weights=None,
    shard="0/1",
    workers=None,
    retry_failed=False,
    variant="auto",
):
    """Embed a data set's images into its feature store (resumable)."""
    _require("embed", spec=spec)
    _logging()
    from fuse.commands import embed_spec

    _run(
        embed_spec,
        spec,
        image_size=_number("image_size", image_size, default=224),
        views=_number("views", views, default=1),
        zoom=_number("zoom", zoom, kind=float),
        blocks=blocks or DEFAULT_BLOCKS,
        pooling=pooling or DEFAULT_POOLING,
        batch_size=_number("batch_size", batch_size),
        device=device,
        weights_path=weights,
        shard=shard,
        retry_failed=bool(retry_failed),
        num_workers=_number("workers", workers),
        variant=variant,
    )


@_task(
    help={
        "spec": SPEC_HELP,
        "run": RUN_HELP,
        "trials": "Optuna trials (0 = default parameters); a rerun runs only the missing ones",
        "storage": "Optuna storage URL (default sqlite in the run folder; any RDB URL or journal:///file.log)",
        "image_pca": "PCA components of the image embeddings added as features (0 = metadata "
        "only; needs `invoke embed`)",
        "neg_ratio": "negatives kept per positive in each training part, a different draw per "
        "seed (default 50: "
        "down-samples only where negatives outnumber positives more than 50 to 1, e.g. ISIC 2024; "
        "0 = keep every negative); validation parts are never sampled",
        "store": "feature store folder for the image PCA (default: the spec's store for the "
        "current weights)",
        "trial_patience": "early-stopping rounds of an Optuna trial's models (default: the "
        "ensembles' 50); 10 cuts a trial to about 0.6x but may choose other parameters (README "
        "'Shorter trials'); a study keeps one patience",
    }
)
def train_gbdt(
    c,
    spec=None,
    run=None,
    trials=None,
    storage=None,
    image_pca=None,
    neg_ratio=None,
    store=None,
    trial_patience=None,
):
    """Train the Optuna-tuned LightGBM ensemble on metadata (and image PCA) features."""
    _require("train-gbdt", spec=spec, run=run)
    _logging()
    from fuse.commands import train_gbdt as train

    _run(
        train,
        spec,
        run,
        trials=_number("trials", trials, default=0),
        storage=storage,
        image_pca=_number("image_pca", image_pca),
        neg_ratio=_number("neg_ratio", neg_ratio, float),
        store=store,
        trial_patience=_number("trial_patience", trial_patience),
    )


@_task(
    help={
        "spec": SPEC_HELP,
        "run": RUN_HELP,
        "store": "feature store folder (default: the spec's store for the current weights)",
        "imbalance": "oversample, pos_weight or none",
        "epochs": "maximum epochs per fold",
        "members": "MLPs per fold, each its own seed, averaged (default: FusionConfig.members)",
        "mixup_alpha": "mixup of the MLP's input vectors in training, Beta(alpha, alpha); 0 = none "
        "(default: FusionConfig.mixup_alpha)",
        "ema_epochs": "validate and keep a moving average of the weights over about this many "
        "epochs; 0 = the raw weights (default: FusionConfig.ema_epochs)",
        "schedule": "learning rate over training: constant or cosine "
        "(default: FusionConfig.schedule)",
    }
)
def train_fusion(
    c,
    spec=None,
    run=None,
    store=None,
    imbalance=None,
    epochs=None,
    members=None,
    mixup_alpha=None,
    ema_epochs=None,
    schedule=None,
):
    """Train the fusion MLP on image embeddings plus one-hot metadata."""
    _require("train-fusion", spec=spec, run=run)
    _logging()
    from fuse.commands import train_fusion as train

    _run(
        train,
        spec,
        run,
        store=store,
        imbalance=imbalance,
        max_epochs=_number("epochs", epochs),
        members=_number("members", members),
        mixup_alpha=_number("mixup_alpha", mixup_alpha, float),
        ema_epochs=_number("ema_epochs", ema_epochs, float),
        schedule=schedule,
    )


@_task(
    help={
        "run": RUN_HELP,
        "sensitivity": "target sensitivity of the operating threshold (default 0.95)",
        "patient_ranks": "also give the stack each base score's rank within its patient "
        "(specs with a patient column; off by default: it gained nothing "
        "measured)",
    }
)
def stack(c, run=None, sensitivity=None, patient_ranks=False):
    """Stack the fusion MLP with the LightGBM ensemble and write the evaluation report."""
    _require("stack", run=run)
    _logging()
    from fuse.commands import stack_and_report

    sensitivity = _number("sensitivity", sensitivity, float, default=0.95)
    report = _run(stack_and_report, run, sensitivity=sensitivity, patient_ranks=patient_ranks)
    print(f"report: {report}")


@_task(
    help={
        "run": RUN_HELP,
        "images": "folder of <id>.jpg|.jpeg|.png, or an HDF5 file of encoded images; required "
        "unless the "
        "run is tabular-only (a spec without images), which scores --metadata rows alone",
        "metadata": "CSV with the spec's columns (no target needed); optional with --images, "
        "required "
        "for a tabular-only run",
        "out": _REQUIRED["out"],
        "format": "csv (all columns) or kaggle (isic_id,target)",
        "batch_size": "images per forward pass (default: 256 on CUDA, 32 on CPU)",
        "device": "auto, cpu or cuda",
        "weights": "the torchvision resnet50 state dict the run was embedded with, if not the "
        "cached one",
        "store": "feature store folder to embed the images into first and reuse: a rerun embeds "
        "only what it lacks",
        "prevalence": "share of malignant lesions where the images come from (default: the "
        "training data's); "
        "moves `probability` to that prior",
        "html": "where to write the triage page (default: beside --out, e.g. preds.html)",
        "no_html": "write no triage page",
        "overlays": "flagged lesions on the triage page that get a Grad-CAM saliency overlay "
        "(default 20; 0 = none)",
    }
)
def score(
    c,
    run=None,
    images=None,
    out=None,
    metadata=None,
    format="csv",
    batch_size=None,
    device="auto",
    weights=None,
    store=None,
    prevalence=None,
    html=None,
    no_html=False,
    overlays=None,
):
    """Score new images (or, for a tabular-only run, metadata rows) with a trained run."""
    _require("score", run=run, out=out)
    if images is None and metadata is None:
        print(
            "error: invoke score needs --images (a folder or HDF5 of images) or, for a "
            "tabular-only run, "
            "--metadata CSV; see `invoke score --help`",
            file=sys.stderr,
        )
        sys.exit(2)
    _logging()
    from fuse.commands import score_images

    _run(
        score_images,
        run,
        images=images,
        metadata=metadata,
        out=out,
        output_format=format,
        batch_size=_number("batch_size", batch_size),
        device=device,
        weights=weights,
        store=store,
        prevalence=_number("prevalence", prevalence, float),
        html=html,
        page=not no_html,
        overlays=_number("overlays", overlays, default=20),
    )


@_task(
    help={
        "quick": "a short version with small sizes",
        "device": "auto, cpu or cuda",
        "parts": "comma-separated parts to run: embedding,gbdt,tuning,fusion,scoring "
        "(default: all)",
        "out": "where to write the figures as JSON (default: artifacts/bench/bench.json)",
        "weights": "embedding part: this torchvision resnet50 state dict instead of the cached "
        "weights",
        "random_weights": "embedding part: a random-initialised ResNet-50 of the same shape "
        "(throughput only, "
        "no weights file needed)",
        "images": "embedding part: a folder or HDF5 to read images from (default: synthetic "
        "ISIC-like crops)",
        "n_images": "embedding part: images to embed (default 192, 64 with --quick)",
        "image_size": "embedding part: model input side, px (default 224)",
        "batch_size": "embedding and scoring parts: images per batch (default: 256 on CUDA, 32 on "
        "CPU)",
        "num_workers": "embedding and scoring parts: decoding processes (default: chosen for the "
        "device)",
        "rounds": "embedding part: timed rounds, the best counts (default 2)",
        "store_rows": "embedding part: rows of the store write/read figures, 0 skips them "
        "(default 100000, 20000 with --quick)",
        "no_amp": "embedding part: fp32 instead of mixed precision",
        "rows": "gbdt and fusion parts: one row count instead of 10000 (--quick) or "
        "10000,50000,401059",
        "score_images": "scoring part: images to score (default 2000, 200 with --quick)",
        "run": "scoring part: the run to score (default: the demo run, made first if absent); "
        "--weights then applies to it too",
    }
)
def bench(
    c,
    quick=False,
    device="auto",
    parts=None,
    out=None,
    weights=None,
    random_weights=False,
    images=None,
    n_images=None,
    image_size=None,
    batch_size=None,
    num_workers=None,
    rounds=None,
    store_rows=None,
    no_amp=False,
    rows=None,
    score_images=None,
    run=None,
):
    """Throughput and memory figures, each beside its in-run baseline."""
    _logging()
    from benchmarks.run import run_bench

    _run(
        run_bench,
        quick=quick,
        out=out,
        device=device,
        parts=parts,
        weights=weights,
        random_weights=random_weights,
        images=images,
        n_images=_number("n_images", n_images),
        image_size=_number("image_size", image_size, default=224),
        batch_size=_number("batch_size", batch_size),
        num_workers=_number("num_workers", num_workers),
        rounds=_number("rounds", rounds, default=2),
        store_rows=_number("store_rows", store_rows),
        amp=not no_amp,
        rows=_number("rows", rows),
        score_images=_number("score_images", score_images),
        run=run,
    )


@_task(help={"k": "only tests matching this expression", "quick": "skip the tests marked slow"})
def test(c, k=None, quick=False):
    """Run the test suite (`--quick`: without the tests marked slow)."""
    selection = f" -k {k!r}" if k else ""
    if quick:
        selection += " -m 'not slow'"
    c.run(f"{sys.executable} -m pytest{selection}", pty=False)


@_task()
def lint(c):
    """Check the code with ruff: its rules, and the formatting `ruff format` gives."""
    c.run(f"{sys.executable} -m ruff check .")
    c.run(f"{sys.executable} -m ruff format --check .")


@_task()
def typecheck(c):
    """Check the packages' types with mypy (settings in pyproject.toml)."""
    c.run(f"{sys.executable} -m mypy")


@_task(pre=[lint, typecheck, test])
def check(c):
    """Lint, type-check, then test."""
