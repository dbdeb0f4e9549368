"""Inference variants of the frozen backbone: the same function, computed different ways.

A variant turns a loaded backbone (any ``torch.nn.Module`` in eval mode mapping (N, 3, H, W)
float32 to (N, D) pooled features) into a callable with the same contract, float32 out:

- ``eager``: the module as it is, channels_last, under the device's autocast (bf16 on CPUs with
  native bf16, fp16 on CUDA, none on other CPUs) when ``amp``;
- ``folded``: every BatchNorm folded into the convolution before it
  (``torch.fx.experimental.optimization.fuse``), then as ``eager``;
- ``jit-frozen``: BatchNorm folded, ``torch.jit.trace`` + ``torch.jit.freeze`` +
  ``torch.jit.optimize_for_inference`` (oneDNN conv + add + ReLU fusion, prepacked weights);
  with ``amp`` on a bf16 CPU the folded module is traced in bf16 (as autocast runs it);
- ``compiled``: ``torch.compile`` (inductor, ``freezing``: constant-folded, prepacked weights)
  under the same autocast as ``eager``; needs a C++ compiler and compiles on the first call and
  for every new batch shape (the callable pads a short batch to the first batch's size);
- ``int8-mixed``: post-training static quantization, FX graph mode, x86 backend: per-channel
  int8 weights, per-tensor uint8 activations ranged on `CALIBRATION_IMAGES` real images of the
  data set being embedded (`calibration_ids`), the stem and the pooling in float32, the later
  stages' activation ranges their observed extremes (GeM's cube lives on the largest values,
  which a histogram fit clips). Faithful (see `MEASURED`); for CPUs with VNNI int8. CPU only.
- ``int8``: the same with every layer int8 and every activation range a histogram fit: faster
  still, but not faithful (its stores are kept apart, `embed.identity.UNFAITHFUL_VARIANTS`);
  kept so that stores built with it stay readable and can be completed. CPU only.

Whether a variant is faithful is measured, not assumed: `centred_cosine` compares its vectors
with fp32 eager vectors of the same images, id by id. `default_variant` is what "auto" resolves
to, from the figures measured on this project's machines (see its comments).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Iterable

import torch

from embed.backbone import autocast_context, cpu_bf16_supported
from embed.errors import EmbedError
from embed.fidelity import centred_cosine, embed_batches
from embed.identity import UNFAITHFUL_VARIANTS

log = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("eager", "folded", "jit-frozen", "compiled", "int8-mixed", "int8")
AUTO = "auto"
# Variants that run only on a CPU.
_CPU_ONLY: tuple[str, ...] = ("int8-mixed", "int8")
# The bars a variant must clear to be used in place of fp32 eager (issue 14): centred cosine to
# the fp32 vectors of the same images, image by image, and the HAM10000 development out-of-fold
# ROC AUC of the fusion MLP within this much of fp32's.
MIN_CENTRED_COSINE = 0.99
# A variant whose worst image falls a little below that bar may still be used where the HAM10000
# check showed the models cannot tell (issue 22): int8-mixed's store (worst image 0.980 against
# eager bf16's) gave the final blend within a tenth of that check's bars. `cosine_bar` says which.
TOLERATED_CENTRED_COSINE: dict[str, float] = {"int8-mixed": 0.98}
_MAX_ROC_AUC_DROP = 0.003
# Real images of the data set being embedded that the int8 variant calibrates its activation
# ranges on (`calibration_ids` picks them); fewer make the ranges depend on which images happened
# to be chosen.
CALIBRATION_IMAGES = 256


@functools.cache
def cpu_vnni_supported() -> bool:
    """True when this CPU has AVX512-VNNI or AVX-VNNI (int8 dot products)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    except OSError:
        pass
    return False


def has_compiler() -> bool:
    """True when a C++ compiler is on PATH (inductor's CPU code needs one)."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def check_variant(name: str) -> str:
    """``name`` when it is "auto" or one of `VARIANTS`; else EmbedError listing them."""
    if name != AUTO and name not in VARIANTS:
        raise EmbedError(f"variant: expected 'auto' or one of {', '.join(VARIANTS)}, got {name!r}")
    return name


def default_variant(device: torch.device | str, amp: bool = True, images: int | None = None) -> str:
    """What "auto" resolves to on ``device`` (with mixed precision ``amp``) for an embedding of
    ``images`` images (None: not known, as for scoring or a bench).

    Only a variant that is faster than eager on that kind of hardware *and* faithful (centred
    cosine to fp32 per image about 0.99 or more, and the HAM10000 final blend's out-of-fold ROC
    AUC within 0.003 and pAUC80 within 0.002 of the eager store's) may be a default. From
    `MEASURED` (torch 2.14, 224 px, batch 32, the real weights, HAM10000 images):

    - CPU with VNNI int8 (AVX512-VNNI, AVX-VNNI or AMX) and amp, embedding at least
      `INT8_AUTO_MIN_IMAGES` images: "int8-mixed". On a 2-core Intel Xeon with AMX its
      model-only ceiling was 1.91x eager bf16's in the bench (2.93x in an idle probe), for
      about 45 s of calibration on 256 images of the data set and tracing, which a few thousand
      images earn back (fewer, or an unknown number, keep the float default below); its worst
      image of 512 reached a centred cosine of 0.987 to fp32 (1st percentile 0.991, median
      0.995), below the 0.99 bar, and the HAM10000 blend trained on its store stayed within a
      tenth of the bars (README): `cosine_bar`. CPUs without VNNI compute int8 with a
      multiply-add that saturates at full 8-bit range: not measured, so not a default there.
    - CPU computing in fp32 (no native bf16, or amp off) without VNNI: "folded", 1.13x eager's
      ceiling for about 2 s of folding per process (2-core AMD EPYC). jit-frozen (1.21x) and
      compiled (1.20x) are faster per image but cost 15-25 s (tracing, freezing, profiling) and
      12-60 s (compiling, and a C++ compiler) before the first batch, more than they save on a
      few hundred images (scoring a folder, every test); pass --variant jit-frozen for a large
      embed. All three give fp32's vectors up to summation order: 99.8% of the stored float16
      values equal fp32 eager's and the rest differ by one float16 step, as two batch
      compositions of eager itself do, so the fusion MLP sees the same store. amp off means
      fp32 was asked for: "folded" then even with VNNI.
    - CPU with native bf16 and amp but without VNNI (no such CPU is known): "eager".
    - CUDA: "eager" (nothing here was measured on a GPU; cuDNN already fuses what matters).
    """
    kind = torch.device(device).type
    if kind != "cpu":
        return "eager"
    if amp and cpu_vnni_supported() and images is not None and images >= INT8_AUTO_MIN_IMAGES:
        return _DEFAULT_VNNI_CPU
    if amp and cpu_bf16_supported():
        return _DEFAULT_BF16_CPU
    return _DEFAULT_FP32_CPU


_DEFAULT_VNNI_CPU = "int8-mixed"
# Images an embedding must hold for "auto" to take int8-mixed: its setup (about 45 s on 2 cores)
# against what it saves per image (Intel Xeon with AMX: 15.9 -> 8.4 ms in the bench, 14 -> 4.8
# ms idle; AMD EPYC about 71 -> 30-40 ms) pays off after about 1,500-6,000 images; a small embed
# (the demo's 1,500 images, a test) stays in float.
INT8_AUTO_MIN_IMAGES = 5000
_DEFAULT_BF16_CPU = "eager"
_DEFAULT_FP32_CPU = "folded"
# The figures behind the defaults: `invoke bench --parts embedding --images
# ../shared/data/ham10000/images --n-images 128 --rounds 3 --store-rows 0` (bf16) and the same
# with --no-amp (fp32), 2-core AMD EPYC (AVX512-BF16, AVX512-VNNI) shared with other jobs (load
# 3-5); model-only ceiling images/s, best of 3 interleaved rounds; setup = preparing + first
# call, s; centred cosine min to fp32 eager on 65 HAM10000 images. The fp32 ratios are from a
# quieter 5-round interleaved run (eager 6.87, folded 7.74, jit-frozen 8.32, compiled 8.25).
MEASURED: dict = {
    "bf16": {
        "eager": {"images_per_s": 14.07, "over_eager": 1.0, "setup_s": 2.7, "cosine_min": 0.99878},
        "folded": {
            "images_per_s": 14.75,
            "over_eager": 1.05,
            "setup_s": 5.2,
            "cosine_min": 0.99862,
        },
        "jit-frozen": {
            "images_per_s": 14.92,
            "over_eager": 1.06,
            "setup_s": 19.3,
            "cosine_min": 0.99862,
        },
        "compiled": {
            "images_per_s": 16.91,
            "over_eager": 1.20,
            "setup_s": 12.4,
            "cold_compile_s": 58.8,
            "cosine_min": 0.99876,
        },
        "int8": {"images_per_s": 34.48, "over_eager": 2.45, "setup_s": 38.5, "cosine_min": 0.90896},
    },
    "fp32": {
        "eager": {"images_per_s": 6.87, "over_eager": 1.0, "setup_s": 5.9, "cosine_min": 1.0},
        "folded": {"images_per_s": 7.74, "over_eager": 1.13, "setup_s": 7.2, "cosine_min": 1.0},
        "jit-frozen": {
            "images_per_s": 8.32,
            "over_eager": 1.21,
            "setup_s": 23.8,
            "cosine_min": 1.0,
        },
        "compiled": {
            "images_per_s": 8.25,
            "over_eager": 1.20,
            "setup_s": 14.1,
            "cold_compile_s": 25.3,
            "cosine_min": 1.0,
        },
        # int8 against fp32 eager in one run: 30.9 vs 6.7 images/s (4.6x).
        "int8": {"images_per_s": 30.9, "over_eager": 4.6, "setup_s": 39.0, "cosine_min": 0.90896},
    },
    # 2-core Intel Xeon with AMX (AVX512-BF16, AVX512-VNNI), issue 22: model-only images/s on
    # random input, batch 32, traced and frozen, best of 3 interleaved rounds with the machine
    # otherwise idle; centred cosine min to fp32 eager on 512 HAM10000 images not calibrated on
    # (256 calibration images; every-layer int8: 128 images, 64 calibration images); setup: the
    # HAM10000 embed's load + calibration + tracing with the machine loaded (load 5-6).
    "bf16-amx": {
        "eager": {"images_per_s": 71.6, "over_eager": 1.0, "setup_s": 2.7, "cosine_min": 0.99878},
        # `invoke bench --parts embedding --images ... --n-images 128 --rounds 3`: 119.7 vs 62.8.
        "int8-mixed": {
            "images_per_s": 119.7,
            "over_eager": 1.91,
            "setup_s": 45,
            "cosine_min": 0.987,
        },
        "int8": {"images_per_s": 288.1, "over_eager": 4.03, "setup_s": 22.1, "cosine_min": 0.95452},
    },
}


# Variants whose vectors fall short of MIN_CENTRED_COSINE in `MEASURED`: not the same function.
_UNFAITHFUL: tuple[str, ...] = UNFAITHFUL_VARIANTS


def cosine_bar(variant: str) -> float:
    """The worst-image centred cosine to fp32 that ``variant`` must reach to count as faithful."""
    return TOLERATED_CENTRED_COSINE.get(variant, MIN_CENTRED_COSINE)


def lowest_measured_cosine(variant: str) -> float:
    """The lowest centred cosine to fp32 eager measured for `variant` over `MEASURED`'s
    precisions."""
    return min(
        figures[variant]["cosine_min"] for figures in MEASURED.values() if variant in figures
    )


def warn_if_unfaithful(variant: str) -> None:
    """Log a warning when the resolved `variant` is one whose vectors are not the fp32 model's
    (`_UNFAITHFUL`), with the measured figure: a user choosing it for speed should know."""
    if variant in _UNFAITHFUL:
        log.warning(
            "--variant %s: not faithful to the model: its vectors' centred cosine to fp32 eager "
            "was as low as %.2f per image (measured on HAM10000 images; the bar is %.2f), so "
            "models trained on them differ from the fp32 backbone's. Its store is kept apart (its "
            "name ends in -%s); --variant int8-mixed is the faithful int8, and --variant auto "
            "the measured default",
            variant,
            lowest_measured_cosine(variant),
            MIN_CENTRED_COSINE,
            variant,
        )


def resolve_variant(name: str, device: torch.device | str, amp: bool = True) -> str:
    """The variant ``name`` names on ``device``: "auto" -> `default_variant`; checks the name
    and that the variant can run there (int8 on CPU only; compiled needs a C++ compiler on CPU).
    """
    check_variant(name)
    if name == AUTO:
        return default_variant(device, amp)
    kind = torch.device(device).type
    if name in _CPU_ONLY and kind != "cpu":
        raise EmbedError(f"variant {name!r} runs on CPU only, not on {device}")
    if name == "compiled" and kind == "cpu" and not has_compiler():
        raise EmbedError(
            "variant 'compiled' needs a C++ compiler (g++ or clang++) on PATH for inductor; "
            "install one or use --variant eager"
        )
    return name


class VariantModel:
    """A backbone prepared as one variant: call it on (N, 3, H, W) float32, get (N, D) float32.

    name: the variant; precision: "fp32", "bf16", "fp16" or "int8"; setup_s: seconds spent
    preparing it (folding, tracing, calibrating; compiling happens on the first call, and
    `first_call_s` holds that call's seconds once made).
    """

    def __init__(
        self,
        name: str,
        fn: Callable,
        device: torch.device,
        precision: str,
        setup_s: float,
        pad_to_first: bool = False,
    ):
        self.name = name
        self.device = device
        self.precision = precision
        self.setup_s = setup_s
        self.first_call_s: float | None = None
        self._fn = fn
        self._pad_to_first = pad_to_first
        self._batch: int | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        if self._pad_to_first:
            # A compiled graph is specialised to its batch size: pad a short last batch rather
            # than compile again (a recompile costs as much as embedding hundreds of images).
            if self._batch is None:
                self._batch = n
            elif n < self._batch:
                pad = x[-1:].expand(self._batch - n, *x.shape[1:])
                x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
        start = time.perf_counter() if self.first_call_s is None else None
        with torch.inference_mode() if self.name != "compiled" else torch.no_grad():
            y = self._fn(x)
        if start is not None:
            self.first_call_s = time.perf_counter() - start
        return y[:n].float()

    def __repr__(self) -> str:
        return f"VariantModel({self.name!r}, {self.precision}, setup {self.setup_s:.1f} s)"


def _precision(device: torch.device, amp: bool) -> str:
    if not amp:
        return "fp32"
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_bf16_supported() else "fp32"


def _with_autocast(module: Callable, device: torch.device, amp: bool) -> Callable:
    ctx = autocast_context(device) if amp else None
    if ctx is None or isinstance(ctx, contextlib.nullcontext):
        return module

    def run(x):
        with autocast_context(device):
            return module(x)

    return run


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with each BatchNorm folded into the convolution before it.

    torch.fx's inference fuser (``torch.fx.experimental.optimization.fuse``): the module is
    symbolically traced, so its forward must be traceable (no data-dependent Python control flow).
    Raises EmbedError when it is not.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval(), inplace=False)
    except Exception as exc:  # torch.fx raises many kinds for untraceable code
        raise EmbedError(
            f"cannot fold BatchNorm: the backbone is not fx-traceable ({exc})"
        ) from exc


def calibration_ids(ids: Iterable[str], n: int = CALIBRATION_IMAGES) -> list[str]:
    """The ids int8 calibrates on: ``n`` (default `CALIBRATION_IMAGES`) spread evenly over the
    sorted ``ids`` (all of them when there are fewer), sorted.

    Chosen from the data set's ids alone, so every run over the same data set (a resumed embed,
    each part of a sharded one) calibrates on the same images and computes the same function.
    Raises EmbedError for ``n`` < 1.
    """
    if n < 1:
        raise EmbedError(f"calibration images: expected at least 1, got {n}")
    ordered = sorted(set(ids))
    if len(ordered) <= n:
        return ordered
    step = len(ordered) / n
    return [ordered[int(k * step)] for k in range(n)]


def _calibration_batches(calibration, example: torch.Tensor) -> list[torch.Tensor]:
    if calibration is None:
        log.warning("int8: no calibration images given; calibrating on the example batch")
        return [example]
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches or sum(len(b) for b in batches) == 0:
        raise EmbedError(
            "int8: no calibration images (none of those asked for could be read); int8 needs "
            "real images of the data set to set its activation ranges, or use --variant auto"
        )
    return batches


# int8-mixed (issue 22): the layers kept in float, and the stages whose activations are ranged by
# their extremes. Measured on HAM10000 (quantizing one block at a time, centred cosine to fp32 of
# the pooled layer3 GeM vector): the stem (with the image's own quantization) moves the vectors
# most on average (min 0.990 alone), and layer3's blocks move a few images far (0.971-0.980 alone)
# because a HistogramObserver clips their rare large activations, which GeM's cube then misses.
# Keeping layer1.0 in float as well lifts the worst image further but costs nearly all the speed.
INT8_FLOAT_MODULES: tuple[str, ...] = ("conv1", "bn1", "relu", "maxpool")
INT8_MINMAX_STAGES: tuple[str, ...] = ("layer2", "layer3", "layer4")


def _int8_qconfig(observer):
    """Per-tensor uint8 activations ranged by ``observer``, per-channel symmetric int8 weights.

    The x86 default qconfig keeps activations to 7 bits (reduce_range, which avoids the
    saturation of AVX2's u8 x s8 multiply-add); with VNNI the full 8 bits are exact, and on the
    real weights they lift the worst centred cosine to fp32 from 0.954 to 0.981 (64 HAM10000
    images, every layer int8).
    """
    from torch.ao.quantization import PerChannelMinMaxObserver, QConfig

    return QConfig(
        activation=observer.with_args(dtype=torch.quint8, quant_min=0, quant_max=255),
        weight=PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-128, quant_max=127
        ),
    )


def _int8_mapping(model: torch.nn.Module, mixed: bool):
    """The QConfigMapping of variant "int8" (every layer int8, HistogramObserver) or, with
    ``mixed``, "int8-mixed": `INT8_FLOAT_MODULES` in float and `INT8_MINMAX_STAGES` ranged by
    their min and max (only the names ``model`` has: any other model is quantized whole)."""
    from torch.ao.quantization import HistogramObserver, MinMaxObserver, QConfigMapping

    mapping = QConfigMapping().set_global(_int8_qconfig(HistogramObserver))
    if not mixed:
        return mapping
    names = {name for name, _ in model.named_modules()}
    for name in INT8_MINMAX_STAGES:
        if name in names:
            mapping.set_module_name(name, _int8_qconfig(MinMaxObserver))
    for name in INT8_FLOAT_MODULES:
        if name in names:
            mapping.set_module_name(name, None)
    return mapping


def _quantize_int8(
    model: torch.nn.Module,
    example: torch.Tensor,
    calibration: Iterable[torch.Tensor] | torch.Tensor | None,
    mixed: bool = False,
) -> torch.nn.Module:
    """Post-training static int8 quantization of ``model`` (FX graph mode, x86 backend).

    Convolutions and linear layers get per-channel symmetric int8 weights; activations are
    quantized per tensor with ranges observed on ``calibration`` (batches of preprocessed real
    images, float32 NCHW); with ``mixed`` (variant "int8-mixed") the stem stays in float and the
    later stages' ranges are their observed extremes (`_int8_mapping`). The pooling is a leaf
    of the traced graph (`embed.backbone.pool`) and stays in float32. The result takes and
    returns float32. Raises EmbedError when the model is not fx-traceable or no calibration
    image could be read.
    """
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    model = _copy(model).eval()
    mapping = _int8_mapping(model, mixed)
    try:
        prepared = prepare_fx(model, mapping, example_inputs=(example,))
    except Exception as exc:
        raise EmbedError(f"cannot quantize: the backbone is not fx-traceable ({exc})") from exc
    with torch.inference_mode():
        for batch in _calibration_batches(calibration, example):
            prepared(batch.float().cpu())
    return convert_fx(prepared)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def make_variant(
    model: torch.nn.Module,
    name: str,
    device: torch.device | str = "cpu",
    *,
    amp: bool = True,
    example: torch.Tensor | None = None,
    calibration: Iterable[torch.Tensor] | torch.Tensor | None = None,
) -> VariantModel:
    """``model`` (eval mode; (N, 3, H, W) float32 -> (N, D)) prepared as variant ``name``.

    name: one of `VARIANTS` or "auto" (`default_variant`). device: where it runs. amp: mixed
    precision where the device has it natively (as `embed.backbone.autocast_context`).
    example: a batch of the shape the variant will see (needed by jit-frozen and int8; default a
    (1, 3, 224, 224) random batch). calibration: int8 only: batches of preprocessed real images.
    The model itself is left unchanged except that it is moved to ``device`` (channels_last).

    Raises EmbedError: unknown name, a variant that cannot run on ``device``, an untraceable model.
    """
    device = torch.device(device)
    name = resolve_variant(name, device, amp)
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript and torch.ao quantization deprecated (FutureWarning /
        # UserWarning on every call); they still work, and the figures decide their use.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return _make(model, name, device, amp, example, calibration)


def _make(model, name, device, amp, example, calibration) -> VariantModel:
    if example is None:
        example = torch.randn(1, 3, 224, 224)
    example = example.float()
    start = time.perf_counter()
    model = model.eval().to(device=device, memory_format=torch.channels_last)
    precision = _precision(device, amp)
    pad = False
    if name == "eager":
        fn = _with_autocast(model, device, amp)
    elif name == "folded":
        fn = _with_autocast(_folded(model, device), device, amp)
    elif name == "jit-frozen":
        fn = _jit_frozen(_folded(model, device), example.to(device), precision)
    elif name == "compiled":
        compiled = torch.compile(model, backend="inductor", options={"freezing": True})
        fn = _with_autocast(compiled, device, amp)
        pad = True
    else:  # int8, int8-mixed
        precision = "int8"
        mixed = name == "int8-mixed"
        quantized = _quantize_int8(model.cpu().float(), example.cpu(), calibration, mixed)
        fn = _jit_frozen(quantized, example.cpu(), "fp32")
    return VariantModel(name, fn, device, precision, time.perf_counter() - start, pad)


def _folded(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # fx's fuser works on contiguous weights; restore channels_last afterwards.
    folded = fold_batchnorm(model.to(memory_format=torch.contiguous_format))
    model.to(memory_format=torch.channels_last)
    # torch accepts device and memory_format together; its typing overloads list them apart.
    return folded.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]


def _jit_frozen(module: torch.nn.Module, example: torch.Tensor, precision: str) -> Callable:
    """trace + freeze + optimize_for_inference; bf16/fp16 by converting the (folded) module."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is not None:
        module = _copy(module).to(dtype)
    x = example.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype) if dtype is not None else x
    with torch.no_grad():
        traced = torch.jit.trace(module, x, check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        frozen(x)  # profiling run: the optimised graph is made on the first calls
        frozen(x)
    if dtype is None:
        return frozen

    def run(batch):
        return frozen(batch.to(dtype))

    return run


__all__ = [
    "AUTO",
    "CALIBRATION_IMAGES",
    "INT8_AUTO_MIN_IMAGES",
    "MEASURED",
    "MIN_CENTRED_COSINE",
    "VARIANTS",
    "VariantModel",
    "calibration_ids",
    "centred_cosine",
    "cosine_bar",
    "check_variant",
    "cpu_vnni_supported",
    "default_variant",
    "embed_batches",
    "fold_batchnorm",
    "has_compiler",
    "lowest_measured_cosine",
    "make_variant",
    "resolve_variant",
    "warn_if_unfaithful",
]
