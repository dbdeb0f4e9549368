"""The torchvision ResNet-50 that every backbone weights file must fit.

Its state dict's names and shapes (`resnet50_shapes`, checked by `check_resnet50_state_dict`) and
the input normalisation the weights take (`INPUT_MEAN`, `INPUT_STD`: torchvision's). Both the
weights cache (`embed.weights`) and the TF.js converter (`embed.weights_tfjs`) depend on these;
this module depends on neither.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from embed.errors import EmbedError

__all__ = ["INPUT_MEAN", "INPUT_STD", "check_resnet50_state_dict", "resnet50_shapes"]

# torchvision's standard input normalisation (RGB in 0..1), which the converted weights are
# folded to accept.
INPUT_MEAN = (0.485, 0.456, 0.406)
INPUT_STD = (0.229, 0.224, 0.225)


def resnet50_shapes() -> dict[str, torch.Size]:
    """{state dict key: shape} of torchvision's `resnet50` (classifier included), in its order."""
    import torchvision  # deferred: only the checks need the architecture

    # Built on the meta device: no memory, no random init cost; only names and shapes matter.
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_resnet50_state_dict(state: Mapping[str, object], where: str) -> None:
    """Raise EmbedError unless ``state`` has torchvision ResNet-50's keys and shapes, all finite.

    ``num_batches_tracked`` entries may be absent (older torchvision files lack them).
    The message names ``where``, the missing and unexpected keys (count + first few) and
    the first shape mismatches.
    """
    reference = resnet50_shapes()
    missing = [k for k in reference if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in reference]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    not_tensor = [k for k in state if k in reference and k not in tensors]
    mismatched = [
        f"{k} expected {tuple(reference[k])} got {tuple(tensors[k].shape)}"
        for k in reference
        if k in tensors and tensors[k].shape != reference[k]
    ]
    non_finite = [
        k
        for k in reference
        if k in tensors
        and tensors[k].is_floating_point()
        and not bool(torch.isfinite(tensors[k]).all())
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
    if not_tensor:
        problems.append(f"not tensors ({len(not_tensor)}): {', '.join(not_tensor[:5])}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:5])}")
    if non_finite:
        problems.append(f"NaN or inf in ({len(non_finite)}): {', '.join(non_finite[:5])}")
    if problems:
        raise EmbedError(f"{where}: not a torchvision ResNet-50 state dict: " + "; ".join(problems))
