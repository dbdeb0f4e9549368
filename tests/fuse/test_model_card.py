"""The model card written with the report: every section, figures from the run itself (rows,
positives, intervals, calibration, subgroups), the applicability placeholder, and the hashes of
the code, spec, folds, weights and store the run was made from."""

from __future__ import annotations

import json
import re

import pytest

from common.files import sha256_file
from common.version import lesionfuse_version
from fuse.pages.model_card import FILE, NOT_MEASURED
from fuse.pages.report import write_report
from fuse.stacking.stack import StackConfig, stack

SECTIONS = {
    "intended-use": "Intended use",
    "training-data": "Training data",
    "figures": "Figures with 95% CI",
    "calibration": "Calibration",
    "subgroups": "Subgroups",
    "applicability": "Applicability threshold",
    "limitations": "Limitations",
    "versions": "Versions and hashes",
}

STORE = {
    "backbone": "resnet50-keras-imagenet",
    "weights_sha256": "ab" * 32,
    "image_size": 224,
    "blocks": ["layer3"],
    "pooling": "gem",
    "views": 1,
    "dtype": "float16",
    "dim": 1024,
    "store": "/stores/tiny-abababababab-224px-1v-l3-gem",
    "store_uid": "feca6363",
    "count": 300,
}


@pytest.fixture
def stacked_run(tabular_run):
    stack(tabular_run.dir, config=StackConfig(num_boost_round=40))
    return tabular_run


def _card(run) -> tuple[str, dict, str]:
    path = write_report(run.dir)
    return (
        (path.parent / FILE).read_text(),
        json.loads((path.parent / "metrics.json").read_text()),
        (path.parent / "index.html").read_text(),
    )


def _section(card: str, heading: str) -> str:
    """The text of one `## heading` section of the card."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", card, flags=re.S | re.M)
    assert match, f"no section {heading!r}"
    return match.group(1)


def test_card_has_every_section_in_markdown_and_html(stacked_run):
    card, document, page = _card(stacked_run)
    assert document["model_card"] == FILE
    assert [line[3:] for line in card.splitlines() if line.startswith("## ")] == list(
        SECTIONS.values()
    )
    assert '<section id="model-card">' in page
    for section_id, heading in SECTIONS.items():
        assert f'id="card-{section_id}"' in page and f"<h3>{heading}</h3>" in page
    assert "not a diagnosis" in _section(card, "Intended use")
    assert "a second opinion" in _section(card, "Intended use").lower()


def test_card_figures_come_from_the_run(stacked_run):
    card, document, _ = _card(stacked_run)
    final = json.loads((stacked_run.dir / "stack" / "final.json").read_text())
    data = _section(card, "Training data")
    assert f"- rows: {document['rows']:,}" in data and document["rows"] == 300
    assert f"- positives (malignant): {document['positives']:,}" in data
    assert f"- prevalence: {document['positives'] / document['rows']:.2%}" in data
    assert "- groups (lesion_id): 150" in data
    assert "- data set: tiny" in data
    assert str(stacked_run.spec.metadata) in data

    use = _section(card, "Intended use")
    point = document["operating_point"]
    assert f"operating threshold: {final['threshold']:.6g}" in use
    assert f"lower 95% bound {point['sensitivity_low']:.3f} (Clopper-Pearson)" in use

    figures = _section(card, "Figures with 95% CI")
    shown = document["shown"]
    roc = document["intervals"]["models"][shown]["roc_auc"]
    assert (
        f"| {shown} (final) | {roc['estimate']:.4f} ({roc['low']:.4f} to {roc['high']:.4f}) |"
        in figures
    )

    calibration = _section(card, "Calibration")
    method = final["calibration"]["method"]
    assert f"- method: {method}" in calibration
    assert (
        f"ECE (10 equal-count bins): {document['models']['calibrated']['ece']:.4f}" in calibration
    )

    subgroups = _section(card, "Subgroups")
    rows = document["subgroups"]["rows"]
    assert f"{len(rows)} subgroups over 3 columns" in subgroups

    limits = _section(card, "Limitations")
    assert f"Prevalence: {document['positives'] / document['rows']:.2%}" in limits
    assert "not an external validation" in limits
    assert "No images: the run was trained on metadata only" in limits


def test_versions_and_hashes_of_code_spec_folds_weights_and_store(stacked_run):
    (stacked_run.dir / "fusion" / "store.json").write_text(json.dumps(STORE))
    card, _, page = _card(stacked_run)
    versions = _section(card, "Versions and hashes")
    assert f"- lesionfuse version: {lesionfuse_version()}" in versions
    assert re.search(r"- code \(git commit\): ([0-9a-f]{40}|not available)", versions)
    assert f"- backbone weights sha256: `{STORE['weights_sha256']}`" in versions
    assert f"- store (fusion): `{STORE['store']}`, uid `{STORE['store_uid']}`, 300 rows" in versions
    assert f"`{sha256_file(stacked_run.dir / 'spec.toml')}`" in versions
    assert f"- folds.csv sha256: `{sha256_file(stacked_run.dir / 'folds.csv')}`" in versions
    assert STORE["weights_sha256"] in page
    limits = _section(card, "Limitations")
    assert "trained only on the images of" not in limits  # the spec has no images: metadata only


def test_image_modality_from_the_spec_and_store(stacked_run):
    record_path = stacked_run.dir / "run.json"
    record = json.loads(record_path.read_text())
    record["spec"]["images"] = "/data/ham/images"
    record_path.write_text(json.dumps(record))
    (stacked_run.dir / "fusion" / "store.json").write_text(json.dumps(STORE))
    limits = _section(_card(stacked_run)[0], "Limitations")
    assert (
        "Image modality: trained only on the images of `/data/ham/images` (embedded by "
        "resnet50-keras-imagenet 224 px, layer3 gem)"
    ) in limits
    record["spec"]["builtin"] = "isic2024"
    record_path.write_text(json.dumps(record))
    limits = _section(_card(stacked_run)[0], "Limitations")
    assert "3D total-body photography (TBP) tile crops" in limits


def test_applicability_threshold_of_the_fitted_stage(stacked_run):
    from fuse.applicability.detector import load

    summary = load(stacked_run.dir / "applicability").summary()
    card, _, page = _card(stacked_run)
    section = _section(card, "Applicability threshold")
    assert f"{summary['threshold']:.4f}" in section
    assert f"{summary['marked_share_out_of_fold']:.2%}" in section
    assert NOT_MEASURED not in section


def test_applicability_not_measured_without_its_stage(stacked_run):
    import shutil

    shutil.rmtree(stacked_run.dir / "applicability")
    card, _, page = _card(stacked_run)
    section = _section(card, "Applicability threshold")
    assert f"> **{NOT_MEASURED}.**" in section
    assert "no `applicability/` stage folder" in section
    assert NOT_MEASURED in page


def test_applicability_stage_that_cannot_be_read_is_said_so(stacked_run, caplog):
    import shutil

    shutil.rmtree(stacked_run.dir / "applicability")
    (stacked_run.dir / "applicability").mkdir()  # a folder without a detector in it
    card, _, _ = _card(stacked_run)
    section = _section(card, "Applicability threshold")
    assert f"{NOT_MEASURED}: the applicability stage could not be read" in section
    assert "applicability stage" in caplog.text


def test_card_of_base_models_only_says_there_is_no_final_model(tabular_run):
    card, document, _ = _card(tabular_run)
    use = _section(card, "Intended use")
    assert (
        "- final model: none yet (`invoke stack --run R`); figures below are of "
        f"{document['shown']}" in use
    )
    assert "Not calibrated: the run has no calibrated final model yet" in _section(
        card, "Calibration"
    )


def test_card_text_from_the_data_is_escaped_in_html(stacked_run):
    record_path = stacked_run.dir / "run.json"
    record = json.loads(record_path.read_text())
    record["spec"]["name"] = "<img src=x onerror=alert(1)>"
    record_path.write_text(json.dumps(record))
    card, _, page = _card(stacked_run)
    assert "- data set: <img src=x onerror=alert(1)>" in card  # Markdown keeps the text as given
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
