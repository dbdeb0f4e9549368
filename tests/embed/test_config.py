"""Settings of an embedding run (`embed.config`): checks with messages naming the setting, the
device, batch size and workers chosen for the machine (CPU affinity capped by a container's
quota), shards of a build, and the image sizes the backbone can use."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import embed.config as embed_config
import embed.model_loop as model_loop
from embed.config import (
    VIEWS,
    EmbedConfig,
    parse_shard,
    part_of,
    resolve_device,
)
from embed.errors import EmbedError
from embed.pooled import DEFAULT_BLOCKS
from embed.reader import apply_view


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 0}, r"EmbedConfig.image_size: expected a positive integer, got 0"),
        ({"batch_size": -1}, r"EmbedConfig.batch_size: expected a positive integer, got -1"),
        ({"views": 9}, r"EmbedConfig.views: expected 1..8, got 9"),
        ({"views": 0}, r"EmbedConfig.views: expected 1..8, got 0"),
        (
            {"shard_index": 2, "shard_count": 2},
            r"EmbedConfig.shard_index: expected 0..1 for shard_count=2, got 2",
        ),
        ({"shard_count": 0}, r"EmbedConfig.shard_count: expected a positive integer, got 0"),
        ({"shard_rows": 0}, r"EmbedConfig.shard_rows: expected a positive integer, got 0"),
        ({"max_pixels": 0}, r"EmbedConfig.max_pixels: expected a positive integer, got 0"),
        (
            {"max_shard_seconds": 0},
            r"EmbedConfig.max_shard_seconds: expected a number > 0, got 0",
        ),
        (
            {"max_shard_seconds": True},
            r"EmbedConfig.max_shard_seconds: expected a number > 0, got True",
        ),
        ({"num_workers": -1}, r"EmbedConfig.num_workers: expected None or an integer >= 0, got -1"),
        (
            {"device": "tpu"},
            r"EmbedConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'",
        ),
    ],
)
def test_config_is_checked(kwargs, message):
    with pytest.raises(EmbedError, match=message):
        EmbedConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_refused():
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(EmbedError, match=r"device='cuda' but no CUDA GPU is available"):
        resolve_device("cuda")


def test_views_are_the_eight_symmetries_of_the_square():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    outs = [apply_view(x, v) for v in range(len(VIEWS))]
    assert torch.equal(outs[0], x)
    assert outs[1][0, 0, 0].tolist() == [2.0, 1.0, 0.0]  # hflip
    assert outs[2][0, 0, 0].tolist() == [6.0, 7.0, 8.0]  # vflip
    assert torch.equal(outs[6][0, 0], x[0, 0].T)  # transpose
    assert torch.equal(outs[7][0, 0], x[0, 0].flip(0).flip(1).T)  # anti-transpose
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    with pytest.raises(EmbedError, match=r"view: expected 0..7, got 8"):
        apply_view(x, 8)


@pytest.mark.parametrize(
    "cpus, cpu_workers, cuda_workers", [(2, 0, 1), (4, 0, 2), (16, 1, 14), (64, 4, 16)]
)
def test_default_num_workers(monkeypatch, cpus, cpu_workers, cuda_workers):
    monkeypatch.setattr(embed_config, "_cpu_count", lambda: cpus)
    assert embed_config.default_num_workers("cpu") == cpu_workers
    assert embed_config.default_num_workers("cuda") == cuda_workers


def test_batch_size_and_workers_default_by_device(monkeypatch):
    monkeypatch.setattr(embed_config, "_cpu_count", lambda: 16)
    assert embed_config.default_batch_size("cuda:0") == 256
    assert embed_config.default_batch_size("cpu") == 32
    gpu = embed_config.settle_config(EmbedConfig(), torch.device("cuda"))
    assert (gpu.batch_size, gpu.num_workers) == (256, 14)
    mine = embed_config.settle_config(
        EmbedConfig(batch_size=8, num_workers=0), torch.device("cuda")
    )
    assert (mine.batch_size, mine.num_workers) == (8, 0)  # what the user set is kept
    assert model_loop.batches_in_flight(torch.device("cuda")) == 2
    assert model_loop.batches_in_flight(torch.device("cpu")) == 0
    with pytest.raises(
        EmbedError, match=r"EmbedConfig.batch_size: expected a positive integer, got 0"
    ):
        EmbedConfig(batch_size=0)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(EmbedError, match=r"--shard: expected i/n such as 0/4, got 'x'"):
        parse_shard("x")
    with pytest.raises(EmbedError, match=r"--shard: expected i/n with 0 <= i < n, got '4/4'"):
        parse_shard("4/4")


def test_part_of_is_a_stable_balanced_split():
    ids = [f"ISIC_{i:07d}" for i in range(2000)]
    parts = [part_of(i, 4) for i in ids]
    assert part_of("ISIC_0000000", 4) == parts[0]  # no per-process hash seed
    counts = np.bincount(parts, minlength=4)
    assert counts.min() > 400


@pytest.mark.parametrize(
    "v2, v1, expected",
    [
        ("max 100000\n", None, None),
        ("400000 100000\n", None, 4),
        ("150000 100000\n", None, 2),  # 1.5 CPUs: a second worker still has half a core
        (None, ("-1", "100000"), None),
        (None, ("200000", "100000"), 2),
        (None, None, None),
        ("garbage\n", None, None),
    ],
)
def test_container_cpu_quota_caps_the_cpu_count(tmp_path, v2, v1, expected):
    v2_path = tmp_path / "cpu.max"
    v1_path = tmp_path / "cpu" / "cpu.cfs_quota_us"
    if v2 is not None:
        v2_path.write_text(v2)
    if v1 is not None:
        v1_path.parent.mkdir()
        v1_path.write_text(v1[0])
        (v1_path.parent / "cpu.cfs_period_us").write_text(v1[1])
    assert embed_config.cgroup_cpu_limit((v2_path, v1_path)) == expected


def test_cpu_count_takes_the_smaller_of_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(embed_config, "cgroup_cpu_limit", lambda: 3)
    assert embed_config._cpu_count() == min(3, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(embed_config, "cgroup_cpu_limit", lambda: None)
    assert embed_config._cpu_count() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("image_size", "blocks", "minimum"),
    [
        (1, DEFAULT_BLOCKS, 16),
        (8, ("layer3",), 16),
        (15, ("layer3",), 16),
        (16, ("layer4",), 32),
        (31, ("layer3", "layer4"), 32),
        (3, ("layer1",), 4),
    ],
)
def test_image_sizes_the_backbone_cannot_use_are_refused(image_size, blocks, minimum):
    with pytest.raises(
        EmbedError,
        match=rf"--image-size \(EmbedConfig.image_size\) {image_size}: the backbone needs "
        rf"at least {minimum} px for blocks {','.join(blocks)}.*use --image-size "
        rf"{minimum} or more",
    ):
        EmbedConfig(image_size=image_size, blocks=blocks)
