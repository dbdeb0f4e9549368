"""The backbone's stages kept once as TorchScript, so that scoring a few images skips torchvision.

Building the backbone with `embed.backbone.load_backbone` imports torchvision, and torchvision's
`ops` import `torch._dynamo` (with sympy, triton and `torch.distributed`): about 1.4 s of a
clinician's wait for a handful of images, more than embedding them. The first scoring with a
weights file therefore builds the backbone as usual and saves the stages it runs (stem, layer1 up
to the deepest pooled block) with `torch.jit.script` beside the weights file:

    <weights>.script-<last stage>.pt      the scripted stages (layer3: 34 MB of the 100 MB file)
    <weights>.script-<last stage>.json    what they were made from, and the file's sha256

Later scorings load them with `torch.jit.load` (about 0.1 s, torchvision never imported) into the
same `PooledResNet`, whose pooling, `forward_to` and `pooled_from` (Grad-CAM) stay eager Python.
The scripted stages call the same aten operators with the same weights, so the vectors are the
eager model's bit for bit, in float32 and under the bf16 autocast scoring uses (tested; on the
demo's 10 test images max |diff| 0).

The record is checked before the file is loaded: its format, the weights' sha256 (which
`file_sha256` confirms is the file's now), the stride layout, the stages, the torch version (a
TorchScript archive belongs to the torch that wrote it) and the script file's own sha256. Any
difference, or a file that does not load, means the stages are built and saved again; a folder
that cannot be written only means torchvision is imported each time (logged). Only the "eager"
variant runs on scripted stages: the others rewrite the model with torch.fx, which needs the
Python modules (`load_backbone_for`).
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import warnings
from pathlib import Path
from typing import cast

import torch

from common.files import atomic_write, atomic_write_json
from embed.backbone import PooledResNet, load_backbone
from embed.errors import EmbedError
from embed.pooled import BLOCKS, DEFAULT_BLOCKS, DEFAULT_POOLING, check_features
from embed.weights import WeightsInfo, file_sha256

__all__ = [
    "SCRIPT_FORMAT",
    "SCRIPTED_VARIANTS",
    "ScriptedStagesResNet",
    "load_backbone_for",
    "load_cached_backbone",
    "script_paths",
]

log = logging.getLogger(__name__)

SCRIPT_FORMAT = "lesionfuse-backbone-script/1"
# Variants that run the model as it is; the others trace it with torch.fx (`embed.variants`).
SCRIPTED_VARIANTS = ("eager",)
_STEM = ("conv1", "bn1", "relu", "maxpool")


def script_paths(weights: WeightsInfo, blocks=DEFAULT_BLOCKS) -> tuple[Path, Path]:
    """(scripted stages, their JSON record) beside the weights file, for the stages `blocks` need
    (the stem and layer1 up to the deepest of `blocks`)."""
    last = _stages(tuple(blocks))[-1]
    base = Path(weights.path)
    return (
        base.with_name(f"{base.name}.script-{last}.pt"),
        base.with_name(f"{base.name}.script-{last}.json"),
    )


def load_backbone_for(
    weights: WeightsInfo,
    variant: str,
    device: torch.device | str = "cpu",
    *,
    blocks=DEFAULT_BLOCKS,
    pooling: str = DEFAULT_POOLING,
) -> PooledResNet:
    """`load_cached_backbone` for a variant in `SCRIPTED_VARIANTS`, else `load_backbone`.

    variant: the resolved inference variant the model will run as (`embed.variants`).
    Returns a `PooledResNet` (N, 3, H, W) float32 -> (N, feature_dim(blocks)) float32.
    Raises EmbedError as `load_backbone`.
    """
    if variant in SCRIPTED_VARIANTS:
        return load_cached_backbone(weights, device, blocks=blocks, pooling=pooling)
    # Without keep_classifier, load_backbone returns a PooledResNet (annotated as Module).
    return cast(PooledResNet, load_backbone(weights, device, blocks=blocks, pooling=pooling))


def load_cached_backbone(
    weights: WeightsInfo,
    device: torch.device | str = "cpu",
    *,
    blocks=DEFAULT_BLOCKS,
    pooling: str = DEFAULT_POOLING,
) -> PooledResNet:
    """The model `load_backbone(weights, device, blocks=blocks, pooling=pooling)` returns, its
    stages loaded from the TorchScript copy beside the weights (made and saved on the first call).

    Same contract as `load_backbone` without `keep_classifier`: eval mode, `requires_grad`
    False, on `device` in the default memory format; (N, 3, H, W) float32 -> (N,
    feature_dim(blocks)) float32, equal to the eager model's bit for bit.

    Raises EmbedError when the weights file changed since it was verified or does not load, or
    for an unknown block or pooling.
    """
    blocks = check_features(blocks, pooling)
    actual = file_sha256(weights.path)  # hashed again only if the file changed since
    if actual != weights.sha256:
        raise EmbedError(
            f"weights {weights.path}: sha256 {actual} differs from {weights.sha256} verified "
            "earlier; the file changed. Rerun `invoke weights` (or pass --weights again)."
        )
    stages = _stages(blocks)
    script, record = script_paths(weights, blocks)
    loaded = _load_script(script, record, _expected(weights, stages))
    if loaded is None:
        model = cast(PooledResNet, load_backbone(weights, "cpu", blocks=blocks, pooling=pooling))
        _save_script(model, stages, script, record, _expected(weights, stages))
    else:
        model = ScriptedStagesResNet(loaded, blocks, pooling)
        model.float()
        model.eval()
        model.requires_grad_(False)
    return model.to(device)


class ScriptedStagesResNet(PooledResNet):
    """A `PooledResNet` whose stages are TorchScript modules, run by TorchScript's plain
    interpreter (`torch.jit.optimized_execution(False)`).

    Why: the optimizing executor spends each stage's first calls of a new input type (bf16
    autocast for embedding, float32 for Grad-CAM) profiling and rewriting the graph, about 0.1 s
    of a few images' scoring on a 2-core CPU, and it has nothing to fuse in convolutions, batch
    norms and ReLUs: the interpreter calls the same aten operators, so the outputs are the same bit
    for bit (tested). The flag is set around each call, in the calling thread (it is per thread).
    """

    def forward_to(self, x: torch.Tensor, block: str) -> torch.Tensor:
        with torch.jit.optimized_execution(False):
            return super().forward_to(x, block)

    def pooled_from(self, activation: torch.Tensor) -> torch.Tensor:
        with torch.jit.optimized_execution(False):
            return super().pooled_from(activation)


def _stages(blocks: tuple[str, ...]) -> tuple[str, ...]:
    """The stem's modules and the stages up to the deepest of `blocks`, in forward order."""
    deepest = max(BLOCKS.index(b) for b in blocks)
    return (*_STEM, *BLOCKS[: deepest + 1])


def _expected(weights: WeightsInfo, stages: tuple[str, ...]) -> dict:
    """What a record must say for its script to stand for these weights and stages here."""
    return {
        "format": SCRIPT_FORMAT,
        "weights_sha256": weights.sha256,
        "stride_layout": weights.stride_layout,
        "stages": list(stages),
        "torch_version": str(torch.__version__),
    }


def _load_script(script: Path, record: Path, expected: dict) -> torch.nn.Module | None:
    """The scripted stages when `record` matches `expected` and the file's sha256; else None
    (logged: they are then built and saved again)."""
    try:
        recorded = json.loads(record.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.info("backbone script record %s unreadable (%s); building it again", record, error)
        return None
    differs = [key for key, value in expected.items() if recorded.get(key) != value]
    if differs:
        log.info("backbone script %s was made for another %s; building it again", script, differs)
        return None
    try:
        if file_sha256(script) != recorded.get("sha256"):
            log.warning("backbone script %s changed since it was saved; building it again", script)
            return None
        with warnings.catch_warnings():
            # torch 2.14 marks TorchScript deprecated (a FutureWarning on every load); it works.
            warnings.filterwarnings("ignore", category=FutureWarning)
            loaded = torch.jit.load(str(script), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any failure to read it means: build it again
        log.warning("backbone script %s does not load (%s); building it again", script, error)
        return None
    if not all(hasattr(loaded, name) for name in expected["stages"]):
        log.warning("backbone script %s lacks a stage; building it again", script)
        return None
    return loaded


def _save_script(
    model: PooledResNet, stages: tuple[str, ...], script: Path, record: Path, expected: dict
) -> None:
    """Script `model`'s `stages` and save them with their record (the file first, so a record
    never names a missing file); a folder that cannot be written is logged and skipped."""
    started = dt.datetime.now(dt.UTC)
    sequence = torch.nn.Sequential(collections.OrderedDict((n, getattr(model, n)) for n in stages))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            scripted = torch.jit.script(sequence)
            atomic_write(script, lambda f: torch.jit.save(scripted, f))
        sha = file_sha256(script)
        atomic_write_json(
            record,
            {
                **expected,
                "file": script.name,
                "sha256": sha,
                "created_utc": started.isoformat(timespec="seconds"),
            },
        )
    except OSError as error:
        log.info(
            "cannot save the backbone's stages as TorchScript beside the weights (%s); scoring "
            "imports torchvision each time",
            error,
        )
        return
    except Exception as error:  # noqa: BLE001 - a torch without TorchScript: eager it stays
        log.warning("cannot script the backbone's stages (%s); scoring stays eager", error)
        return
    log.info("saved the backbone's stages as TorchScript: %s (later scorings load it)", script)
