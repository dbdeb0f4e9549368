"""lesionfuse commands: `invoke --list`. Each task parses its options and calls one function."""

from __future__ import annotations

import logging
import sys

from invoke import task


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


def _run(function, *args, **kwargs):
    from embed.errors import EmbedError
    from fuse.errors import RunError
    from tabular.errors import DataError

    try:
        return function(*args, **kwargs)
    except (EmbedError, DataError, RunError) as error:
        _fail(error)


@task(help={"weights": "use this torchvision resnet50 state dict instead of the cached one"})
def weights(c, weights=None):
    """Obtain and verify the backbone weights (cached; offline once cached)."""
    _logging()
    from embed.weights import ensure_weights

    info = _run(ensure_weights, weights_path=weights)
    print(f"weights: {info.path}\nsha256: {info.sha256}\nsource: {info.source}")


@task(help={"rows": "lesions in the synthetic data set", "trials": "Optuna trials for the GBDT"})
def demo(c, rows=1500, trials=3):
    """Make the synthetic demo data set, run the whole pipeline, print the report path."""
    _logging()
    from fuse.demo import run_demo

    report = _run(run_demo, rows=rows, trials=trials)
    print(f"report: {report}")


@task(
    help={
        "spec": "dataset spec TOML, or an ISIC 2024 Kaggle-layout directory",
        "image_size": "square input size in pixels (default 224)",
        "views": "1 = the plain image; more = fixed flips/rotations, each kept",
        "batch_size": "images per forward pass (default: 256 on CUDA, 32 on CPU)",
        "device": "auto, cpu or cuda",
        "weights": "torchvision resnet50 state dict to use instead of the cached weights",
        "shard": "i/n: embed only part i of n (for n parallel workers on one store)",
        "workers": "decode worker processes (default: chosen for the device)",
        "retry_failed": "try again the images an earlier run could not read",
    }
)
def embed(c, spec, image_size=224, views=1, batch_size=None, device="auto", weights=None,
          shard="0/1", workers=None, retry_failed=False):
    """Embed a data set's images into its feature store (resumable)."""
    _logging()
    from fuse.embedding import embed_spec

    _run(embed_spec, spec, image_size=int(image_size), views=int(views),
         batch_size=None if batch_size is None else int(batch_size), device=device,
         weights_path=weights, shard=shard, retry_failed=bool(retry_failed),
         num_workers=None if workers is None else int(workers))


@task(
    help={
        "spec": "dataset spec TOML, or an ISIC 2024 Kaggle-layout directory",
        "run": "run name (artifacts/runs/<run>) or a path",
        "trials": "Optuna trials (0 = default parameters); a rerun runs only the missing ones",
        "storage": "Optuna storage URL (default sqlite in the run folder; any RDB URL or journal:///file.log)",
        "image_pca": "PCA components of the image embeddings added as features (0 = metadata only; needs `invoke embed`)",
        "neg_ratio": "keep at most this many negatives per positive in each training part",
    }
)
def train_gbdt(c, spec, run, trials=0, storage=None, image_pca=None, neg_ratio=None):
    """Train the Optuna-tuned LightGBM ensemble on metadata (and image PCA) features."""
    _logging()
    from fuse.stages import train_gbdt as train

    _run(train, spec, run, trials=int(trials), storage=storage,
         image_pca=None if image_pca is None else int(image_pca),
         neg_ratio=None if neg_ratio is None else float(neg_ratio))


@task(
    help={
        "spec": "dataset spec TOML, or an ISIC 2024 Kaggle-layout directory",
        "run": "run name (artifacts/runs/<run>) or a path",
        "store": "feature store folder (default: the spec's store for the current weights)",
        "imbalance": "oversample, pos_weight or none",
        "epochs": "maximum epochs per fold",
    }
)
def train_fusion(c, spec, run, store=None, imbalance=None, epochs=None):
    """Train the fusion MLP on image embeddings plus one-hot metadata."""
    _logging()
    from fuse.stages import train_fusion as train

    _run(train, spec, run, store=store, imbalance=imbalance,
         max_epochs=None if epochs is None else int(epochs))


@task(help={"run": "run name or path", "sensitivity": "target sensitivity of the operating threshold"})
def stack(c, run, sensitivity=0.95):
    """Stack the fusion MLP with the LightGBM ensemble and write the evaluation report."""
    _logging()
    from fuse.stages import stack_and_report

    report = _run(stack_and_report, run, sensitivity=float(sensitivity))
    print(f"report: {report}")


@task(
    help={
        "run": "run name or path",
        "images": "folder of <id>.jpg|.jpeg|.png, or an HDF5 file of encoded images",
        "metadata": "CSV with the spec's columns (no target needed); optional",
        "out": "where to write the predictions CSV",
        "format": "csv (all columns) or kaggle (isic_id,target)",
        "batch_size": "images per forward pass (default: 256 on CUDA, 32 on CPU)",
        "device": "auto, cpu or cuda",
        "weights": "the torchvision resnet50 state dict the run was embedded with, if not the cached one",
        "store": "feature store folder to embed the images into first and reuse: a rerun embeds only what it lacks",
    }
)
def score(c, run, images, out, metadata=None, format="csv", batch_size=None, device="auto", weights=None,
          store=None):
    """Score a folder or HDF5 of new images with a trained run."""
    _logging()
    from fuse.stages import score_images

    _run(score_images, run, images=images, metadata=metadata, out=out, format=format,
         batch_size=None if batch_size is None else int(batch_size), device=device, weights=weights,
         store=store)


@task(help={"quick": "a short version with small sizes", "device": "auto, cpu or cuda"})
def bench(c, quick=False, device="auto"):
    """Throughput and memory figures, each beside its in-run baseline."""
    _logging()
    from fuse.bench import run_bench

    _run(run_bench, quick=quick, device=device)


@task(help={"k": "only tests matching this expression"})
def test(c, k=None):
    """Run the test suite."""
    selection = f" -k {k!r}" if k else ""
    c.run(f"{sys.executable} -m pytest{selection}", pty=False)


@task
def lint(c):
    """Check the code with ruff."""
    c.run(f"{sys.executable} -m ruff check .")


@task(pre=[lint, test])
def check(c):
    """Lint, then test."""
