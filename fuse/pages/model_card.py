"""The model card of a run: what the final model is for, what it was trained on, how well it does
(with 95% CIs), how it is calibrated, where it is weaker, when it does not apply, and exactly which
code, weights, store and spec made it.

Written by `fuse.pages.report.write_report` beside the report, as `report/model-card.md` and as the
model card section of `report/index.html` (the template `report/model_card.html`). Everything in
it comes from the run folder and the report's own figures, stated in the report's own words
(`fuse.pages.report_text`): nothing about a particular run is typed by hand.

A card is a plain dict: {"title", "sections": [{"id", "heading", "marked" (a warning line or
None), "paragraphs": [text], "facts": [{"label", "value"}], "table": {"headings", "rows"} or
None}]}; text may hold `code` spans between backticks (Markdown; the page shows them as <code>).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path

from common.files import sha256_file
from common.version import lesionfuse_version
from fuse.applicability.detector import load
from fuse.pages import html
from fuse.pages.report_text import ci_text, interval_values, operating_sentence, subgroup_values
from runfolder.layout import RunLayout
from runfolder.records import store_records

__all__ = ["APPLICABILITY_STAGE", "FILE", "NOT_MEASURED", "build", "markdown", "page_values"]

log = logging.getLogger(__name__)

FILE = "model-card.md"
# The stage folder of the applicability detector (fitted with the run; optional).
APPLICABILITY_STAGE = "applicability"
NOT_MEASURED = "Not measured for this run"
# What the built-in specs' images are (a fact about the built-in spec, not about a run).
_BUILTIN_MODALITY = {
    "isic2024": (
        "3D total-body photography (TBP) tile crops in the ISIC 2024 layout, not dermoscopy"
    ),
}


def build(run_dir: Path, record: dict, document: dict, final: dict | None) -> dict:
    """The model card of the run at `run_dir`.

    Args:
        run_dir: the run folder.
        record: its `run.json`.
        document: the report's figures (what `write_report` writes to `report/metrics.json`,
            without the card itself).
        final: `stack/final.json`, or None before `invoke stack`.

    Returns:
        The card (see the module's docstring). Never raises for a missing optional part (store
        records, applicability stage, git): that part says it is absent.
    """
    layout = RunLayout(Path(run_dir))
    spec = record.get("spec", {})
    stores = _store_records(layout)
    sections = [
        _intended_use(document, final),
        _training_data(document, spec, stores),
        _figures(document),
        _calibration(document, final),
        _subgroups(document),
        _applicability(layout),
        _limitations(document, spec, stores),
        _versions(layout, spec, stores, final),
    ]
    return {"title": f"Model card: {document.get('dataset')}", "sections": sections}


def markdown(card: dict) -> str:
    """`model-card.md`'s text."""
    lines = [
        f"# {card['title']}",
        "",
        "Generated from the run by `invoke stack` (with the report); nothing in it is typed "
        "by hand.",
        "",
    ]
    for section in card["sections"]:
        lines += [f"## {section['heading']}", ""]
        if section.get("marked"):
            lines += [f"> **{section['marked']}**", ""]
        for paragraph in section["paragraphs"]:
            lines += [paragraph, ""]
        if section["facts"]:
            lines += [f"- {fact['label']}: {fact['value']}" for fact in section["facts"]] + [""]
        table = section.get("table")
        if table:
            lines.append("| " + " | ".join(table["headings"]) + " |")
            lines.append(
                "|"
                + "|".join("---" if i == 0 else "---:" for i in range(len(table["headings"])))
                + "|"
            )
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]]
            lines.append("")
    return "\n".join(lines)


def page_values(card: dict) -> dict:
    """The card with its text split into `code` segments, for the template
    `report/model_card.html`."""
    return {
        "title": card["title"],
        "sections": [
            {
                **section,
                "paragraphs": [html.code_segments(p) for p in section["paragraphs"]],
                "facts": [
                    {"label": f["label"], "value": html.code_segments(str(f["value"]))}
                    for f in section["facts"]
                ],
            }
            for section in card["sections"]
        ],
    }


def _section(id_: str, heading: str, paragraphs=(), facts=(), table=None, marked=None) -> dict:
    return {
        "id": id_,
        "heading": heading,
        "marked": marked,
        "paragraphs": list(paragraphs),
        "facts": [{"label": label, "value": value} for label, value in facts],
        "table": table,
    }


def _number(value, fmt: str) -> str:
    return html.number(value, fmt)


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "n/a"


# ----------------------------------------------------------------------------------- sections


def _intended_use(document: dict, final: dict | None) -> dict:
    point = document.get("operating_point")
    paragraphs = [
        "A second opinion on whether a skin lesion is malignant, for a clinician who decides "
        "whether to look again, refer or excise: at the stated operating point, not a "
        "diagnosis. A lesion it does not flag may still be malignant, and the decision stays "
        "with the clinician who examines the patient.",
    ]
    facts = []
    if final:
        facts.append(
            (
                "final model",
                f"{final['final']}"
                + (
                    f", calibrated by {document['final_method']}"
                    if document.get("final_method")
                    else ""
                ),
            )
        )
    else:
        facts.append(
            (
                "final model",
                f"none yet (`invoke stack --run R`); figures below are of "
                f"{document.get('shown')}, the best base model by pAUC80",
            )
        )
    if point:
        facts += [
            (
                "operating threshold",
                f"{point['threshold']:.6g} on "
                f"`{'probability' if point['model'] == 'calibrated' else point['model']}`",
            ),
            ("target sensitivity", f"{point['target_sensitivity']:.0%}"),
            (
                "sensitivity reached (out of fold)",
                f"{_number(point['sensitivity'], '.3f')}, lower 95% bound "
                f"{_number(point['sensitivity_low'], '.3f')} (Clopper-Pearson)",
            ),
            (
                "specificity",
                f"{_number(point['specificity'], '.3f')} (95% CI "
                f"{_number(point['specificity_low'], '.3f')} "
                f"to {_number(point['specificity_high'], '.3f')})",
            ),
        ]
        sentence = operating_sentence(document)
        if sentence is not None:  # None: a point without a sensitivity (one class out of fold)
            paragraphs.append(sentence)
    else:
        paragraphs.append("No operating point: the run has no operating threshold in (0, 1).")
    return _section("intended-use", "Intended use", paragraphs, facts)


def _training_data(document: dict, spec: dict, stores: dict) -> dict:
    rows, positives = document["rows"], document["positives"]
    facts = [
        (
            "data set",
            f"{spec.get('name')}"
            + (f" (built-in {spec['builtin']} spec)" if spec.get("builtin") else ""),
        ),
        ("metadata", f"`{spec.get('metadata')}`"),
        ("images", f"`{spec['images']}`" if spec.get("images") else "none: metadata only"),
        ("rows", f"{rows:,}"),
        ("positives (malignant)", f"{positives:,}"),
        ("prevalence", f"{positives / rows:.2%}" if rows else "n/a"),
        (f"groups ({document.get('group_column')})", f"{document['groups']:,}"),
        (f"patients ({document.get('patient_column')})", f"{document['patients']:,}")
        if document.get("patients") is not None
        else ("patient column", "none in the spec (not counted)"),
        ("folds", f"{document['n_folds']} grouped folds (a group never straddles folds)"),
    ]
    for stage, store in stores.items():
        facts.append(
            (
                f"feature store ({stage})",
                f"`{store.get('store')}` ({_count(store.get('count'))} vectors)",
            )
        )
    return _section("training-data", "Training data", facts=facts)


def _figures(document: dict) -> dict:
    values = interval_values(document)
    if values is None:
        return _section(
            "figures",
            "Figures with 95% CI",
            ["No intervals: no model has an operating threshold in (0, 1)."],
        )
    table = {
        "headings": ["model", *values["headings"]],
        "rows": [
            [row["name"] + (" (final)" if row["final"] else ""), *row["cells"]]
            for row in values["models"]
        ],
    }
    return _section("figures", "Figures with 95% CI", [values["note"]], table=table)


def _calibration(document: dict, final: dict | None) -> dict:
    calibration = (final or {}).get("calibration")
    figures = document["models"].get("calibrated")
    if not calibration or not figures:
        shown = document.get("shown")
        model = document["models"].get(shown, {})
        return _section(
            "calibration",
            "Calibration",
            [
                "Not calibrated: the run has no calibrated final model yet (`invoke stack`). "
                f"The score of {shown} is shown as it is."
            ],
            facts=[
                ("Brier", _number(model.get("brier"), ".4f")),
                ("ECE", _number(model.get("ece"), ".4f")),
            ],
        )
    interval = (
        ((document.get("intervals") or {}).get("models") or {}).get("calibrated", {}).get("brier")
    )
    facts = [
        (
            "method",
            f"{calibration['method']} (the lower out-of-fold Brier score of the methods tried, "
            "fitted on the out-of-fold scores)",
        ),
        ("Brier", ci_text(interval, ".4f") if interval else _number(figures.get("brier"), ".4f")),
        ("ECE (10 equal-count bins)", _number(figures.get("ece"), ".4f")),
    ]
    for method, values in (calibration.get("out_of_fold") or {}).items():
        if isinstance(values, dict):
            facts.append(
                (
                    f"{method}, out of fold",
                    f"Brier {_number(values.get('brier'), '.4f')}, "
                    f"ECE {_number(values.get('ece'), '.4f')}",
                )
            )
    prevalence = calibration.get("prevalence")
    text = "`probability` is calibrated at the training data's prevalence"
    text += f" ({prevalence:.2%})" if isinstance(prevalence, (int, float)) else ""
    text += (
        "; `invoke score --prevalence P` moves it to another population. The reliability curve "
        "is in the report's calibration plot."
    )
    return _section("calibration", "Calibration", [text], facts)


def _subgroups(document: dict) -> dict:
    values = subgroup_values(document)
    if values["unavailable"]:
        return _section(
            "subgroups", "Subgroups", [f"Subgroup table not made: {values['unavailable']}."]
        )
    highlighted = values["highlighted"]
    paragraphs = [
        f"{values['count']} subgroups over {len(values['tables'])} columns "
        f"({', '.join(t['title'] for t in values['tables'])}); {values['too_few']} have too few "
        "positives to tell. "
        + (
            f"Below the target sensitivity (upper 95% bound under it): {'; '.join(highlighted)}."
            if highlighted
            else "None is below the target sensitivity beyond chance."
        ),
        "The full tables are in the report (`report.md`, section Subgroup figures).",
    ]
    return _section("subgroups", "Subgroups", paragraphs)


def _applicability(layout: RunLayout) -> dict:
    stage = layout.stage(APPLICABILITY_STAGE)
    heading = "Applicability threshold"
    if not stage.is_dir():
        return _section(
            "applicability",
            heading,
            [
                "This run has no applicability detector (no `applicability/` stage folder), so "
                "nothing says when a scored image or row is unlike the training data: "
                "probabilities for images of another kind (another camera, another modality) "
                "may not hold.",
            ],
            marked=f"{NOT_MEASURED}.",
        )
    facts = _applicability_facts(stage)
    if facts is None:
        return _section(
            "applicability",
            heading,
            [
                "The run has an `applicability/` stage folder, but it could not be read by this "
                "version (see the log); its threshold is not stated here.",
            ],
            marked=f"{NOT_MEASURED}: the applicability stage could not be read.",
        )
    return _section(
        "applicability",
        heading,
        [
            "Scored rows whose novelty is above the threshold are marked `unlike_training`: their "
            "probabilities may not hold.",
        ],
        facts,
    )


def _applicability_facts(stage: Path) -> list[tuple[str, str]] | None:
    """The detector's threshold and the share of training rows it marks out of fold, from its
    own loader (`fuse.applicability.load`); None (logged) when it refuses the folder."""
    try:
        summary = load(stage).summary()
    except (ValueError, OSError) as error:
        log.warning("model card: applicability stage %s not read (%s)", stage, error)
        return None
    facts = [("novelty threshold", f"{summary['threshold']:.4f}")] if "threshold" in summary else []
    if "marked_share_out_of_fold" in summary:
        facts.append(
            ("training rows marked, out of fold", f"{summary['marked_share_out_of_fold']:.2%}")
        )
    if summary.get("parts"):
        facts.append(("parts", ", ".join(summary["parts"])))
    return facts or None


def _limitations(document: dict, spec: dict, stores: dict) -> dict:
    rows, positives = document["rows"], document["positives"]
    prevalence = positives / rows if rows else float("nan")
    if spec.get("images"):
        modality = _BUILTIN_MODALITY.get(
            spec.get("builtin") or "", f"the images of `{spec['images']}`"
        )
        identities = {
            (s.get("backbone"), s.get("image_size"), tuple(s.get("blocks") or ()), s.get("pooling"))
            for s in stores.values()
        }
        embed = "; ".join(
            f"{b} {size} px, {'+'.join(blocks) or 'default blocks'} {pool or ''}".strip()
            for b, size, blocks, pool in sorted(identities, key=str)
        )
        image_text = (
            f"Image modality: trained only on {modality}"
            + (f" (embedded by {embed})" if embed else "")
            + ". Images of another kind (another camera, lighting or modality: clinical "
            "photographs, dermoscopy, 3D TBP crops, whichever these are not) were never "
            "seen: its figures do not carry over to them."
        )
    else:
        image_text = (
            "No images: the run was trained on metadata only; it says nothing about what a "
            "lesion looks like."
        )
    paragraphs = [
        f"Prevalence: {prevalence:.2%} of the training rows are malignant. Where malignancy is "
        "rarer (screening) the same threshold flags more benign lesions per malignant one and "
        "the precision falls; `probability` holds at the training prevalence unless moved with "
        "`--prevalence`.",
        image_text,
        f"Validation: every figure is out of fold ({document['n_folds']} folds of the same data "
        "set, grouped by the spec's group), not an external validation: another clinic, "
        "population or time may do worse. The intervals cover resampling of these groups, not "
        "that shift.",
        "The operating threshold (and the calibration, where there is one) was chosen on the same "
        "out-of-fold predictions they are reported on, so the sensitivity reached may be "
        "optimistic; its lower 95% bound is the safer figure.",
    ]
    return _section("limitations", "Limitations", paragraphs)


def _versions(layout: RunLayout, spec: dict, stores: dict, final: dict | None) -> dict:
    facts = [
        ("lesionfuse version", lesionfuse_version()),
        ("code (git commit)", _git_commit() or "not available"),
    ]
    weights = sorted({s.get("weights_sha256") for s in stores.values() if s.get("weights_sha256")})
    facts.append(
        (
            "backbone weights sha256",
            ", ".join(f"`{w}`" for w in weights)
            if weights
            else "none: no stage read image embeddings",
        )
    )
    for stage, store in stores.items():
        facts.append(
            (
                f"store ({stage})",
                f"`{store.get('store')}`, uid `{store.get('store_uid')}`, "
                f"{_count(store.get('count'))} rows, {store.get('dim', 'n/a')}-d "
                f"{store.get('dtype', '')}".rstrip(),
            )
        )
    if layout.spec_copy.is_file():
        facts.append(("spec sha256 (spec.toml)", f"`{sha256_file(layout.spec_copy)}`"))
    else:
        canonical = json.dumps(spec, sort_keys=True).encode()
        facts.append(
            (
                "spec sha256 (run.json's spec, canonical JSON)",
                f"`{hashlib.sha256(canonical).hexdigest()}`",
            )
        )
    if layout.folds.is_file():
        facts.append(("folds.csv sha256", f"`{sha256_file(layout.folds)}`"))
    for path, digest in ((final or {}).get("made_from") or {}).items():
        if path != "folds.csv":
            facts.append((f"{path} sha256 (stacked from)", f"`{digest}`"))
    return _section("versions", "Versions and hashes", facts=facts)


# ---------------------------------------------------------------------------------- readers


def _store_records(layout: RunLayout) -> dict[str, dict]:
    """{stage: store record} of the stages that read embeddings; {} when unreadable (logged)."""
    try:
        return store_records(layout)
    except (OSError, ValueError) as error:
        log.warning("model card: store records not read (%s)", error)
        return {}


def _git_commit() -> str | None:
    """The checkout's commit (with "+ changes" when the tree differs), or None outside git."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{' + uncommitted changes' if dirty else ''}" if commit else None
