"""The backbone's stages as TorchScript: the eager model's outputs bit for bit, without
torchvision, and rebuilt whenever the record or the file says they may not stand for the weights."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from storetools import random_weights

from embed.backbone import load_backbone, prepare_model
from embed.backbone_cache import (
    SCRIPT_FORMAT,
    ScriptedStagesResNet,
    load_backbone_for,
    load_cached_backbone,
    script_paths,
)
from embed.errors import EmbedError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def weights(tmp_path):
    return random_weights(tmp_path / "random-resnet50.pth", seed=3)


def _batch(n: int = 3, size: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 3, size, size)


def _outputs(model: torch.nn.Module, x: torch.Tensor, amp: bool) -> torch.Tensor:
    """As the embedding loop calls it: channels_last, inference mode, bf16 autocast or not."""
    model = prepare_model(model, "cpu")
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        if amp:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x).float()
        return model(x).float()


def _is_scripted(model: torch.nn.Module) -> bool:
    return isinstance(model.layer1, torch.jit.ScriptModule)


@pytest.mark.parametrize("first_amp", [True, False])
def test_scripted_stages_give_the_eager_vectors_bit_for_bit(weights, first_amp):
    eager = load_backbone(weights, "cpu")
    made = load_cached_backbone(weights, "cpu")  # builds and saves the script
    script, record = script_paths(weights)
    assert script.is_file() and record.is_file()
    assert json.loads(record.read_text())["format"] == SCRIPT_FORMAT
    loaded = load_cached_backbone(weights, "cpu")
    assert _is_scripted(loaded) and not _is_scripted(made)
    x = _batch()
    # Both call orders, past the TorchScript profiling executor's first runs.
    for amp in [first_amp, not first_amp] * 2:
        expected = _outputs(eager, x, amp)
        assert torch.equal(_outputs(loaded, x, amp), expected)
        assert torch.equal(_outputs(made, x, amp), expected)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def test_scripted_stages_run_without_torchscripts_optimizing_executor(weights):
    load_cached_backbone(weights, "cpu")
    loaded = load_cached_backbone(weights, "cpu")
    assert isinstance(loaded, ScriptedStagesResNet)
    seen: list[bool] = []

    class Spy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch._C._get_graph_executor_optimize())
            return x

    loaded.maxpool = Spy()
    loaded.forward_to(_batch(1), "layer3")
    assert seen == [False]
    assert torch._C._get_graph_executor_optimize()  # restored for everyone else's scripts


def test_grad_cam_halves_match_eager_through_scripted_layers(weights):
    blocks = ("layer3", "layer4")
    eager = load_backbone(weights, "cpu", blocks=blocks, pooling="avg")
    load_cached_backbone(weights, "cpu", blocks=blocks, pooling="avg")
    loaded = load_cached_backbone(weights, "cpu", blocks=blocks, pooling="avg")
    assert _is_scripted(loaded)
    x = _batch(2)
    found = []
    for model in (eager, loaded):
        with torch.no_grad():
            activation = model.forward_to(x, "layer3")
        activation.requires_grad_(True)
        (gradient,) = torch.autograd.grad(model.pooled_from(activation).sum(), activation)
        found.append((activation.detach(), gradient))
    assert torch.equal(found[0][0], found[1][0])
    assert torch.equal(found[0][1], found[1][1])


def test_a_cached_backbone_loads_without_importing_torchvision(weights):
    load_cached_backbone(weights, "cpu")
    code = (
        "import sys; from pathlib import Path; from embed.weights import WeightsInfo; "
        "from embed.backbone_cache import load_cached_backbone; "
        f"w = WeightsInfo(path=Path({str(weights.path)!r}), sha256={weights.sha256!r}, "
        "source='t'); "
        "m = load_cached_backbone(w); "
        "print(type(m.layer1).__name__, 'torchvision' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RecursiveScriptModule", "False"]


def test_a_changed_script_file_is_rebuilt(weights, caplog):
    load_cached_backbone(weights, "cpu")
    script, _ = script_paths(weights)
    data = bytearray(script.read_bytes())
    data[-100] ^= 0xFF
    script.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="embed.backbone_cache"):
        rebuilt = load_cached_backbone(weights, "cpu")
    assert "changed since it was saved" in caplog.text
    assert not _is_scripted(rebuilt)  # built from the weights again, and saved again
    x = _batch()
    expected = _outputs(load_backbone(weights, "cpu"), x, False)
    assert torch.equal(_outputs(load_cached_backbone(weights, "cpu"), x, False), expected)


@pytest.mark.parametrize(
    "key, value",
    [("torch_version", "0.0.1"), ("weights_sha256", "ab" * 32), ("stages", ["conv1"])],
)
def test_a_record_made_for_something_else_is_rebuilt(weights, caplog, key, value):
    load_cached_backbone(weights, "cpu")
    _, record = script_paths(weights)
    content = json.loads(record.read_text())
    record.write_text(json.dumps({**content, key: value}))
    with caplog.at_level(logging.INFO, logger="embed.backbone_cache"):
        model = load_cached_backbone(weights, "cpu")
    assert f"made for another ['{key}']" in caplog.text
    assert not _is_scripted(model)
    assert json.loads(record.read_text())[key] == content[key]  # saved again, right this time


def test_an_unwritable_folder_keeps_the_eager_model(weights, caplog, monkeypatch):
    def refuse(path, write, **_):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("embed.backbone_cache.atomic_write", refuse)
    with caplog.at_level(logging.INFO, logger="embed.backbone_cache"):
        model = load_cached_backbone(weights, "cpu")
    assert "imports torchvision each time" in caplog.text
    assert not any(p.exists() for p in script_paths(weights))
    x = _batch()
    assert torch.equal(_outputs(model, x, False), _outputs(load_backbone(weights, "cpu"), x, False))


def test_changed_weights_are_refused(weights):
    weights.path.write_bytes(weights.path.read_bytes() + b"\0")
    with pytest.raises(
        EmbedError, match=r"weights .*random-resnet50.pth: sha256 .* the file changed"
    ):
        load_cached_backbone(weights, "cpu")


def test_variants_that_rewrite_the_model_get_the_python_modules(weights):
    model = load_backbone_for(weights, "folded", "cpu")
    assert not _is_scripted(model)
    assert not any(p.exists() for p in script_paths(weights))
    load_backbone_for(weights, "eager", "cpu")
    assert _is_scripted(load_backbone_for(weights, "eager", "cpu"))
