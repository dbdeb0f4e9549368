"""A tiny trained and stacked run for the scoring tests: synthetic ISIC 2024-layout data, a
random-initialised ResNet-50 (no weights file needed), one LightGBM seed, two fusion epochs.

What it checks is plumbing, never model quality; about half a minute on two cores.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["tiny_fusion_config", "tiny_gbdt_config", "train_tiny_run", "train_tiny_tabular_run"]


def tiny_gbdt_config():
    """The LightGBM settings of the tiny run: one seed, 40 rounds, 4 image components, 1 thread."""
    from tabular.gbdt_config import GBDTConfig

    return GBDTConfig(
        seeds=(0,),
        extra_components=4,
        num_boost_round=40,
        early_stopping_rounds=10,
        num_threads=1,
    )


def tiny_fusion_config():
    """The fusion settings of the tiny run: two epochs of a small MLP on the CPU."""
    from fuse.fusion.model import FusionConfig

    return FusionConfig(
        max_epochs=2,
        image_hidden=16,
        meta_hidden=8,
        fused_hidden=8,
        batch_size=32,
        device="cpu",
    )


def train_tiny_run(root: Path, image_size: int = 32) -> dict:
    """Make the data under `root`, embed it at `image_size` px, train every stage and stack.

    Returns {"root", "data", "run", "weights", "spec", "store"}.
    """
    import torch
    import torchvision

    from fuse.commands import embed_spec, train_gbdt
    from fuse.demo.synthetic import make_isic2024_like
    from fuse.fusion import train_fusion
    from fuse.stacking.stack import StackConfig, stack
    from tabular.spec import load_spec

    data = root / "data"
    make_isic2024_like(
        data,
        n_rows=60,
        n_patients=12,
        prevalence=0.25,
        seed=0,
        image_size_range=(24, 40),
        test_rows=6,
    )
    torch.manual_seed(0)
    weights = root / "random-resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    summary = embed_spec(
        data,
        image_size=image_size,
        weights_path=weights,
        stores=root / "stores",
        device="cpu",
        num_workers=0,
    )
    spec = load_spec(data)
    run = root / "run"
    train_gbdt(
        data,
        run,
        image_pca=4,
        store=summary.store_dir,
        config=tiny_gbdt_config(),
    )
    train_fusion(
        spec,
        run,
        summary.store_dir,
        tiny_fusion_config(),
        baselines=False,
    )
    stack(run, config=StackConfig(num_boost_round=30))
    return {
        "root": root,
        "data": data,
        "run": run,
        "weights": weights,
        "spec": spec,
        "store": summary.store_dir,
    }


_TABULAR_SPEC = """[dataset]
name = "tiny-tabular"
metadata = "metadata.csv"
id = "image_id"
target = "target"
group = "lesion_id"
categorical = ["sex", "site"]
numeric = ["age", "size"]
"""


def train_tiny_tabular_run(root: Path, n_rows: int = 300) -> dict:
    """A tabular-only run (a spec without images) trained with one LightGBM seed and stacked
    (`invoke stack`: LightGBM becomes the final model, with the report); a few seconds.

    The target depends on age and size; two rows per lesion (the group). Returns {"data" (the
    folder with spec.toml and metadata.csv), "spec", "run", "report", "frame" (the metadata)}.
    """
    import numpy as np
    import pandas as pd

    from fuse.commands import stack_and_report, train_gbdt
    from tabular.gbdt_config import GBDTConfig

    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    group = np.repeat(np.arange(n_rows // 2), 2)[:n_rows]
    age = rng.normal(55, 15, n_rows // 2)[group].round()
    size = rng.gamma(2.0, 2.0, n_rows).round(2)
    signal = 0.06 * (age - 55) + 0.3 * (size - 4) + rng.normal(0, 1, n_rows)
    frame = pd.DataFrame(
        {
            "image_id": [f"IMG_{i:05d}" for i in range(n_rows)],
            "lesion_id": [f"L{g:04d}" for g in group],
            "age": age,
            "sex": rng.choice(["male", "female"], n_rows),
            "site": rng.choice(["back", "face", "leg", "arm"], n_rows),
            "size": size,
            "target": (signal > np.quantile(signal, 0.7)).astype(int),
        }
    )
    frame.to_csv(data / "metadata.csv", index=False)
    (data / "spec.toml").write_text(_TABULAR_SPEC)
    run = root / "run"
    train_gbdt(
        data / "spec.toml",
        run,
        config=GBDTConfig(seeds=(0,), num_boost_round=40, early_stopping_rounds=10, num_threads=1),
    )
    report = stack_and_report(run)
    return {"data": data, "spec": data / "spec.toml", "run": run, "report": report, "frame": frame}
