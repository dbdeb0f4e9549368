"""`invoke bench --quick`, the README's command, run as a user types it: every part, in a
subprocess.

Sized to run in about a minute or two on a loaded 2-core machine while going through the same code
as the plain command: a random-initialised ResNet-50 saved as a state dict (`--weights`), 4 images
at 32 px and a 1,000-row store for the embedding part (every quick variant still measured),
1,000 rows for the gbdt and fusion parts (instead of 10,000), 4 Optuna trials a side for the
tuning part (ISIC 2020 where it lies, else a synthetic table), and 8 images scored on a tiny
trained run (`--run`; the plain command makes and scores the 1,500-lesion demo run instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tinyrun import train_tiny_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INVOKE = Path(sys.executable).parent / "invoke"


def test_bench_quick_runs_every_part_end_to_end(tmp_path):
    tiny = train_tiny_run(tmp_path / "tiny")
    out = tmp_path / "figures" / "bench-quick.json"
    env = {**os.environ, "LESIONFUSE_ARTIFACTS": str(tmp_path / "artifacts")}
    args = [
        "bench",
        "--quick",
        "--device",
        "cpu",
        "--weights",
        str(tiny["weights"]),
        "--run",
        str(tiny["run"]),
        "--n-images",
        "4",
        "--image-size",
        "32",
        "--rounds",
        "1",
        "--store-rows",
        "1000",
        "--rows",
        "1000",
        "--score-images",
        "8",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--out",
        str(out),
    ]
    done = subprocess.run(
        [str(INVOKE), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    figures = json.loads(out.read_text())
    assert figures["quick"] is True and list(figures["parts"]) == [
        "embedding",
        "gbdt",
        "tuning",
        "fusion",
        "scoring",
    ]
    tuning = figures["parts"]["tuning"]
    assert tuning["trials"] == 4 and tuning["rounds"] == 1 and tuning["ratio"] > 0
    assert figures["parts"]["embedding"]["n_images"] == 4
    assert [g["rows"] for g in figures["parts"]["gbdt"]] == [1000]
    assert [f["store"]["rows"] for f in figures["parts"]["fusion"]] == [1000]
    assert (
        figures["parts"]["scoring"]["n_images"] == 8
        and figures["parts"]["scoring"]["rows_with_error"] == 0
    )
    assert (
        "score images/s (8 images) vs embedding alone" in done.stdout
        and f"bench: {out}" in done.stdout
    )
    assert [p.name for p in out.parent.iterdir()] == ["bench-quick.json"]  # no temporary file left
