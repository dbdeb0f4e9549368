"""Fixtures of the embedding-loop tests: random weights, a small image folder, and the store
an uninterrupted run makes of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from storetools import N_IMAGES, random_weights, tiny_config, write_folder

from embed.backbone import load_backbone
from embed.pipeline import build_store
from embed.sources import FolderSource
from embed.store import FeatureStore

__all__ = ["folder", "model", "reference", "weights"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_weights(tmp_path_factory.mktemp("weights") / "random-resnet50.pth")


@pytest.fixture(scope="module")
def model(weights):
    return load_backbone(weights, "cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_folder(root, N_IMAGES, size=(40, 40))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, folder, weights) -> FeatureStore:
    """The uninterrupted single-process store of `folder` that other runs must equal."""
    store = tmp_path_factory.mktemp("reference") / "store"
    summary = build_store(FolderSource(folder), None, store, "toy", weights, tiny_config())
    assert summary.embedded == N_IMAGES and summary.stored == N_IMAGES
    return FeatureStore.open(store)
