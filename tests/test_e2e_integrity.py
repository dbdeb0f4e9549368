"""Nothing silently wrong, end to end: a re-embedded image, a read-only or full artifacts folder,
a restack killed with SIGKILL, a bad Optuna storage. Commands run as a user types them (`invoke ...`
in a subprocess) on one tiny trained run (`tests/tinyrun.py`: random weights, synthetic data).

The read-only cases mount the folder read-only in a private mount namespace (`unshare -m`, as
root) or, for a non-root user, take its write permission away; they skip where neither can work.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from tinyrun import tiny_fusion_config, tiny_gbdt_config, train_tiny_run

REPO = Path(__file__).resolve().parents[1]
INVOKE = Path(sys.executable).parent / "invoke"

pytestmark = pytest.mark.slow


def invoke(
    *args: str, env: dict | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`invoke <args>` from the repository root (after `prefix`, e.g. a read-only mount)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [*prefix, str(INVOKE), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    return train_tiny_run(tmp_path_factory.mktemp("integrity"))


@pytest.fixture
def tiny(trained, tmp_path) -> dict:
    """A copy of the trained run (data, store, run) that a test may change."""
    root = tmp_path / "tiny"
    shutil.copytree(trained["root"], root, symlinks=True)
    rebased = {
        key: root / Path(value).relative_to(trained["root"]) if isinstance(value, Path) else value
        for key, value in trained.items()
    }
    for name in ("run.json", "spec.toml"):  # the run records its spec's absolute paths
        path = rebased["run"] / name
        path.write_text(path.read_text().replace(str(trained["root"]), str(root)))
    from tabular.spec import load_spec

    rebased["spec"] = load_spec(rebased["data"])
    return rebased


def stage_bytes(run: Path, *stages: str) -> dict:
    return {
        f"{stage}/{p.name}": p.read_bytes()
        for stage in stages
        for p in sorted((run / stage).iterdir())
    }


def retrain_tiny_fusion(tiny: dict, run: Path | None = None) -> dict:
    from fuse.fusion import train_fusion

    return train_fusion(
        tiny["spec"],
        run or tiny["run"],
        tiny["store"],
        tiny_fusion_config(),
        baselines=False,
    )


# --------------------------------------------------------------- case 1: a re-embedded image


def test_a_reembedded_image_retrains_fusion_and_stack_refuses_the_older_gbdt(tiny):
    from fuse.commands import embed_spec, train_gbdt
    from fuse.fusion import cross_validation

    run = tiny["run"]
    before = pd.read_csv(run / "fusion" / "oof.csv")
    ids = pd.read_csv(tiny["data"] / "train-metadata.csv")["isic_id"].astype(str).tolist()
    with h5py.File(tiny["data"] / "train-image.hdf5", "a") as h5:  # cp other.jpg images/<id>.jpg
        other = bytes(h5[ids[1]][()])
        del h5[ids[0]]
        h5.create_dataset(ids[0], data=np.bytes_(other))  # scalar |S<n>, as the real file
    summary = embed_spec(
        tiny["data"],
        image_size=32,
        weights_path=tiny["weights"],
        stores=tiny["root"] / "stores",
        device="cpu",
        num_workers=0,
    )
    assert summary.embedded == 1

    trained = []
    real = cross_validation._train_fold
    cross_validation._train_fold = lambda *a, **k: trained.append(a[5]) or real(*a, **k)
    try:
        retrain_tiny_fusion(tiny)
    finally:
        cross_validation._train_fold = real
    assert trained == [0, 1, 2, 3, 4]  # no fold kept: each read the changed row
    assert not pd.read_csv(run / "fusion" / "oof.csv")["p"].equals(before["p"])

    done = invoke("stack", "--run", str(run))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "stages 'fusion' and 'gbdt' were trained on different data from the same feature store"
        in done.stderr
    )
    assert (
        "retrain the older one, 'gbdt', on the store as it is now: `invoke train-gbdt --spec S "
        "--run R`" in done.stderr
    )

    train_gbdt(
        tiny["data"],
        run,
        image_pca=4,
        store=tiny["store"],
        config=tiny_gbdt_config(),
    )
    done = invoke("stack", "--run", str(run))
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------- case 3: a bad Optuna storage


def test_train_gbdt_with_a_bogus_storage_fails_at_once_without_a_traceback(tiny):
    done = invoke(
        "train-gbdt",
        "--spec",
        str(tiny["data"]),
        "--run",
        str(tiny["root"] / "new-run"),
        "--trials",
        "2",
        "--storage",
        "bogus://x",
        "--store",
        str(tiny["store"]),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: storage 'bogus://x': unknown scheme 'bogus://'" in done.stderr
    assert "sqlite:///path/study.db, postgresql://" in done.stderr and "journal:///" in done.stderr
    assert not (tiny["root"] / "new-run").exists()


# --------------------------------------------------------------- case 4: kill -9 during a rewrite


def test_a_restack_killed_with_sigkill_leaves_the_previous_stages_usable(tiny, tmp_path):
    run = tiny["run"]
    before = stage_bytes(run, "stack", "blend")
    marker = tmp_path / "fitted"
    script = (
        "import pathlib, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import fuse.stacking.stack as s\n"
        "def stall(*a, **k):\n"  # the new folders hold fitted fold models by now
        f"    pathlib.Path({str(marker)!r}).write_text('x'); time.sleep(600)\n"
        "s.evaluate = stall\n"
        f"s.stack({str(run)!r})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the restack did not reach its fitted state"
        assert (run / f"stack.new-{child.pid}" / "fold0.txt").exists()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert stage_bytes(run, "stack", "blend") == before

    out = tmp_path / "preds.csv"
    done = invoke(
        "score",
        "--run",
        str(run),
        "--images",
        str(tiny["data"] / "test-image.hdf5"),
        "--out",
        str(out),
        "--weights",
        str(tiny["weights"]),
        "--device",
        "cpu",
        "--no-html",
        "--overlays",
        "0",
    )
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(out)) == len(pd.read_csv(tiny["data"] / "test-metadata.csv"))

    done = invoke("stack", "--run", str(run))
    assert done.returncode == 0, done.stderr
    assert (
        sorted(p.name for p in run.iterdir() if ".new" in p.name) == []
    )  # the killed one's folder is gone


# --------------------------------------------------------------- case 4: write failures


def test_a_full_disk_while_embedding_names_the_store_path(tiny, monkeypatch):
    from common.files import WriteError
    from embed import store_writer
    from fuse.commands import embed_spec

    def full(path, write, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(store_writer, "atomic_write", full)
    with pytest.raises(
        WriteError,
        match=r"feature store '.*/stores2/[^']*': cannot write .*/stores2/.*: No space "
        r"left on device \(ENOSPC\); free some space there",
    ):
        embed_spec(
            tiny["data"],
            image_size=32,
            weights_path=tiny["weights"],
            stores=tiny["root"] / "stores2",
            device="cpu",
            num_workers=0,
        )


def test_a_full_disk_while_training_fusion_keeps_the_previous_stage(tiny, monkeypatch):
    import runfolder.layout
    from common.files import WriteError

    before = stage_bytes(tiny["run"], "fusion")
    real = runfolder.layout.atomic_write_json  # metrics.json is written through the run's layout

    def full(path, obj, **kwargs):
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, obj, **kwargs)

    monkeypatch.setattr(runfolder.layout, "atomic_write_json", full)
    with pytest.raises(
        WriteError, match=r"train-fusion: cannot write .*/fusion\.new/metrics\.json: No space"
    ):
        retrain_tiny_fusion(tiny)
    assert stage_bytes(tiny["run"], "fusion") == before


def read_only_prefix(folder: Path) -> tuple[str, ...]:
    """A command prefix under which `folder` is read-only (skips where that cannot be arranged)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        for path in folder.rglob("*"):
            if path.is_dir():
                path.chmod(0o555)
        return ()
    if shutil.which("unshare") is None:
        pytest.skip("cannot mount a folder read-only here: no unshare")
    shell = f'mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && exec "$@"'
    prefix = ("unshare", "-m", "sh", "-c", shell, "sh")
    probe = subprocess.run(
        [*prefix, "touch", str(folder / ".probe")], capture_output=True, text=True
    )
    if "Read-only file system" not in probe.stderr:
        pytest.skip(
            f"cannot mount {folder} read-only here (unshare -m as root): {probe.stderr.strip()}"
        )
    return prefix


def assert_write_error(done: subprocess.CompletedProcess, command: str, path: Path) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {command}") and f"cannot write {path}" in lines[0], (
        done.stderr
    )
    assert "(EROFS)" in lines[0] or "(EACCES)" in lines[0], done.stderr


def test_every_writing_command_on_a_read_only_run_names_the_path(tiny, tmp_path):
    run = tiny["run"]
    before = stage_bytes(run, "gbdt", "fusion", "stack", "blend")
    prefix = read_only_prefix(run)
    spec, store = str(tiny["data"]), str(tiny["store"])

    assert_write_error(invoke("stack", "--run", str(run), prefix=prefix), "stack", run)
    assert_write_error(
        invoke(
            "train-gbdt",
            "--spec",
            spec,
            "--run",
            str(run),
            "--image-pca",
            "4",
            "--store",
            store,
            prefix=prefix,
        ),
        "train-gbdt",
        run,
    )
    assert_write_error(
        invoke(
            "train-fusion",
            "--spec",
            spec,
            "--run",
            str(run),
            "--store",
            store,
            "--epochs",
            "1",
            prefix=prefix,
        ),
        "train-fusion",
        run,
    )
    assert stage_bytes(run, "gbdt", "fusion", "stack", "blend") == before


def test_embed_score_store_and_new_runs_on_a_read_only_folder_name_the_path(tiny, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    prefix = read_only_prefix(locked)
    weights = str(tiny["weights"])

    done = invoke(
        "embed",
        "--spec",
        str(tiny["data"]),
        "--image-size",
        "32",
        "--weights",
        weights,
        "--device",
        "cpu",
        "--workers",
        "0",
        env={"LESIONFUSE_ARTIFACTS": str(locked)},
        prefix=prefix,
    )
    assert_write_error(done, "feature store", locked / "stores")

    done = invoke(
        "score",
        "--run",
        str(tiny["run"]),
        "--images",
        str(tiny["data"] / "test-image.hdf5"),
        "--out",
        str(tmp_path / "preds.csv"),
        "--store",
        str(locked / "store"),
        "--weights",
        weights,
        "--device",
        "cpu",
        "--no-html",
        "--overlays",
        "0",
        prefix=prefix,
    )
    assert_write_error(done, "feature store", locked / "store")

    for command in ("train-gbdt", "train-fusion"):  # a new run: its folds are the first write
        done = invoke(
            command,
            "--spec",
            str(tiny["data"]),
            "--run",
            str(locked / "new-run"),
            "--store",
            str(tiny["store"]),
            prefix=prefix,
        )
        assert_write_error(done, command, locked / "new-run")
