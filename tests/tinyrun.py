"""A tiny trained and stacked run for the scoring tests: synthetic ISIC 2024-layout data, a
random-initialised ResNet-50 (no weights file needed), one LightGBM seed, two fusion epochs.

What it checks is plumbing, never model quality; about half a minute on two cores.
"""

from __future__ import annotations

from pathlib import Path


def train_tiny_run(root: Path, image_size: int = 32) -> dict:
    """Make the data under `root`, embed it at `image_size` px, train every stage and stack.

    Returns {"root", "data", "run", "weights", "spec", "store"}.
    """
    import torch
    import torchvision

    from fuse.commands import embed_spec, train_gbdt
    from fuse.demo.synthetic import make_isic2024_like
    from fuse.fusion import train_fusion
    from fuse.model import FusionConfig
    from fuse.stack import StackConfig, stack
    from tabular.gbdt import GBDTConfig
    from tabular.spec import load_spec

    data = root / "data"
    make_isic2024_like(data, n_rows=60, n_patients=12, prevalence=0.25, seed=0,
                       image_size_range=(24, 40), test_rows=6)
    torch.manual_seed(0)
    weights = root / "random-resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    summary = embed_spec(data, image_size=image_size, weights_path=weights, stores=root / "stores",
                         device="cpu", num_workers=0)
    spec = load_spec(data)
    run = root / "run"
    train_gbdt(data, run, image_pca=4, store=summary.store_dir,
               config=GBDTConfig(seeds=(0,), extra_components=4, num_boost_round=40,
                                 early_stopping_rounds=10, num_threads=1))
    train_fusion(spec, run, summary.store_dir,
                 FusionConfig(max_epochs=2, image_hidden=16, meta_hidden=8, fused_hidden=8,
                              batch_size=32, device="cpu"), baselines=False)
    stack(run, config=StackConfig(num_boost_round=30))
    return {"root": root, "data": data, "run": run, "weights": weights, "spec": spec,
            "store": summary.store_dir}
