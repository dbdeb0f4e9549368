"""`invoke demo` remakes demo data of another size together with its store and run."""

from __future__ import annotations

import pandas as pd
import pytest

from fuse.demo import run as demo


class Stop(Exception):
    """Ends the demo after its data step."""


def test_demo_data_of_another_size_is_made_again_with_its_store_and_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LESIONFUSE_ARTIFACTS", str(tmp_path / "artifacts"))
    stores = tmp_path / "artifacts" / "stores"
    data = tmp_path / "demo" / "isic2024-synthetic"
    run = tmp_path / "artifacts" / "runs" / "demo"
    other = stores / "isic2024-mini-train-5c8fb4883a44-224px-1v"  # another data set's store
    own = stores / "isic2024-synthetic-train-5c8fb4883a44-224px-1v"
    for folder in (data, run, other, own):
        folder.mkdir(parents=True)
    pd.DataFrame({"isic_id": ["ISIC_1", "ISIC_2", "ISIC_3"]}).to_csv(
        data / "train-metadata.csv", index=False
    )
    (data / "test-image.hdf5").touch()
    made = []

    def make(out, n_rows, **kwargs):
        made.append(n_rows)
        raise Stop

    def embed(data):
        raise Stop

    monkeypatch.setattr(demo, "make_isic2024_like", make)
    monkeypatch.setattr(demo.commands, "embed_spec", embed)

    assert demo._rows_of(data) == 3
    with pytest.raises(Stop):
        demo.run_demo(rows=3, root=tmp_path / "demo")  # the same size: kept as it is
    assert made == [] and own.exists() and run.exists() and data.exists()

    with pytest.raises(Stop):
        demo.run_demo(rows=5, root=tmp_path / "demo")
    assert made == [5]
    assert not own.exists() and not run.exists() and not data.exists()
    assert other.exists()  # other data sets' stores are left alone
