"""The invoke commands as a user types them: help, required options, and tabular-only specs."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Collection

from fuse.commands import embed_spec, train_gbdt
from tabular.errors import DataError

REPO = Path(__file__).resolve().parents[1]
INVOKE = Path(sys.executable).parent / "invoke"


def _collection() -> Collection:
    loaded = importlib.util.spec_from_file_location("lesionfuse_tasks", REPO / "tasks.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return Collection.from_module(module)


TASKS = _collection()
# Task.get_arguments() pops the help texts as it reads them: read each task's options once.
OPTIONS = {
    name: [(a.names[0], a.help) for a in TASKS[name].get_arguments()] for name in TASKS.task_names
}


def invoke(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(INVOKE), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _flat(text: str) -> str:
    # invoke wraps help text to the terminal width, also after a hyphen ("Kaggle-" / "layout"):
    # compare without whitespace.
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def listed() -> list[str]:
    result = invoke("--list")
    assert result.returncode == 0, result.stderr
    return re.findall(r"^  (\S+)", result.stdout, flags=re.MULTILINE)


def test_invoke_list_shows_every_task(listed):
    assert sorted(listed) == sorted(TASKS.task_names)
    assert all(OPTIONS[name] for name in ("embed", "train-gbdt", "train-fusion", "stack", "score"))


@pytest.mark.parametrize("name", sorted(TASKS.task_names))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_every_option_and_exits_0(name, flag, listed):
    assert name in listed
    result = invoke(name, flag)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "error:" not in result.stderr
    out = _flat(result.stdout)
    assert _flat(f"Usage: inv[oke] [--core-opts] {name}") in out
    for option, help_text in OPTIONS[name]:
        flag = f"--{option}" if len(option) > 1 else f"-{option}"
        assert flag in out, (name, flag)
        # Every option says what it is for.
        assert help_text, (name, option)
        assert _flat(help_text) in out, (name, option)


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["embed"], "--spec"),
        (["embed", "--device", "cpu"], "--spec"),
        (["train-gbdt", "--run", "r"], "--spec"),
        (["train-gbdt", "--spec", "nowhere.toml"], "--run"),
        (["train-fusion", "--run", "r"], "--spec"),
        (["stack"], "--run"),
        (["score", "--run", "r", "--images", "imgs"], "--out"),
        (["score", "--out", "p.csv"], "--run"),
        (
            ["score", "--run", "r", "--out", "p.csv"],
            "--images",
        ),  # or --metadata, for a tabular-only run
    ],
)
def test_a_missing_required_option_is_named(args, missing, tmp_path):
    result = invoke(*args, env={"LESIONFUSE_ARTIFACTS": str(tmp_path)})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert re.search(rf"error: invoke {args[0]} needs {missing} \(", result.stderr), result.stderr
    assert f"see `invoke {args[0]} --help`" in result.stderr


@pytest.mark.parametrize("image_pca", [None, 0])
def test_train_gbdt_on_the_tabular_only_isic2020_spec(shared_data, tmp_path, image_pca):
    """`invoke train-gbdt --spec ../shared/data/isic2020/dataset.toml --run R [--image-pca 0]`."""
    metrics = train_gbdt(
        shared_data / "isic2020" / "dataset.toml", tmp_path / "run", image_pca=image_pca, seeds=(0,)
    )
    assert metrics["rows"] == 25_822 and metrics["extra"] is None
    # Sex, site and age alone, patient-grouped: about 0.79 out-of-fold ROC AUC.
    assert metrics["roc_auc"] > 0.75
    assert 0.05 < metrics["pauc80"] < 0.2
    assert (tmp_path / "run" / "gbdt" / "metrics.json").exists()


def _header_only(tmp_path: Path, images: bool) -> Path:
    (tmp_path / "metadata.csv").write_text("image_id,lesion_id,target\n")
    (tmp_path / "dataset.toml").write_text(
        '[dataset]\nname = "hdr"\nmetadata = "metadata.csv"\n'
        + ('images = "images"\n' if images else "")
        + 'id = "image_id"\ntarget = "target"\ngroup = "lesion_id"\n'
    )
    return tmp_path / "dataset.toml"


def test_embed_refuses_a_header_only_metadata_file(tmp_path):
    # Before any weights or images are touched: the header is all there is.
    with pytest.raises(DataError, match=r"metadata file .*metadata\.csv has a header but no rows"):
        embed_spec(_header_only(tmp_path, images=True), stores=tmp_path / "stores")


def test_invoke_train_gbdt_on_a_header_only_metadata_file(tmp_path):
    # Tabular-only, so that nothing but the metadata is read (no weights, no feature store).
    spec = _header_only(tmp_path, images=False)
    result = invoke(
        "train-gbdt",
        "--spec",
        str(spec),
        "--run",
        str(tmp_path / "run"),
        env={"LESIONFUSE_ARTIFACTS": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert re.search(
        r"error: spec 'hdr': metadata file .*metadata\.csv has a header but no rows "
        r"\(columns: image_id, lesion_id, target\)",
        result.stderr,
    ), result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["train-gbdt", "--spec", "s.toml", "--run", "r", "--neg-ratio", "abc"],
            "--neg-ratio expects a number, got 'abc'",
        ),
        (
            ["train-gbdt", "--spec", "s.toml", "--run", "r", "--trial-patience", "ten"],
            "--trial-patience expects an integer, got 'ten'",
        ),
        (
            ["train-fusion", "--spec", "s.toml", "--run", "r", "--members", "two"],
            "--members expects an integer, got 'two'",
        ),
        (
            ["embed", "--spec", "s.toml", "--image-size", "1.5"],
            "--image-size expects an integer, got '1.5'",
        ),
        (
            ["score", "--run", "r", "--images", "i", "--out", "p.csv", "--prevalence", "1%"],
            "--prevalence expects a number, got '1%'",
        ),
    ],
)
def test_a_non_numeric_option_is_named_without_a_traceback(args, expected, tmp_path):
    result = invoke(*args, env={"LESIONFUSE_ARTIFACTS": str(tmp_path)})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: {expected}" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "--blocks",
            "layer3,layer9",
            "error: blocks: expected one or more distinct of ['layer1', 'layer2', 'layer3', "
            "'layer4'] (e.g. 'layer3,layer4'), got ['layer3', 'layer9']",
        ),
        (
            "--zoom",
            "1.5",
            "error: --zoom (EmbedConfig.zoom): expected a fraction of each side between 0.01 "
            "and 0.99 (e.g. 0.75: the central three quarters), or none for no zoom view; got 1.5",
        ),
        ("--zoom", "most", "error: --zoom expects a number, got 'most'"),
    ],
)
def test_embed_refuses_an_unknown_block_or_a_zoom_that_is_not_a_fraction(
    tmp_path, option, value, message
):
    spec = tmp_path / "s.toml"
    spec.write_text(
        '[dataset]\nname = "s"\nmetadata = "m.csv"\nimages = "img"\nid = "id"\ntarget = "t"\n'
        'group = "id"\ncategorical = []\nnumeric = []\n'
    )
    (tmp_path / "m.csv").write_text("id,t\na,0\n")
    (tmp_path / "img").mkdir()
    result = invoke(
        "embed", "--spec", str(spec), option, value, env={"LESIONFUSE_ARTIFACTS": str(tmp_path)}
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "stores").exists()


def test_embed_refuses_an_image_size_the_backbone_cannot_use(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(
        '[dataset]\nname = "s"\nmetadata = "m.csv"\nimages = "img"\nid = "id"\ntarget = "t"\n'
        'group = "id"\ncategorical = []\nnumeric = []\n'
    )
    (tmp_path / "m.csv").write_text("id,t\na,0\n")
    (tmp_path / "img").mkdir()
    result = invoke(
        "embed",
        "--spec",
        str(spec),
        "--image-size",
        "8",
        env={"LESIONFUSE_ARTIFACTS": str(tmp_path)},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "error: --image-size (EmbedConfig.image_size) 8: the backbone needs at least 16 px for "
        "blocks layer3" in result.stderr
    ), result.stderr
    assert not (tmp_path / "stores").exists()
