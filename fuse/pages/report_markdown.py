"""`report/report.md`: the report's figures, tables and plots as Markdown, from the values of
`fuse.pages.report_text`."""

from __future__ import annotations

import logging

from fuse.pages import model_card
from fuse.pages.report_plots import PLOT_TITLES
from fuse.pages.report_text import (
    COLUMNS,
    DESCRIPTIONS,
    cell,
    data_figures,
    decision_values,
    interval_values,
    on_probability,
    operating_sentence,
    subgroup_values,
)

__all__ = ["markdown"]

log = logging.getLogger(__name__)


def markdown(document: dict, final: dict | None) -> str:
    """The text of `report.md` for `document` (the report's metrics.json) and `final.json`."""
    sensitivity = document["sensitivity"]
    lines = [
        f"# Evaluation report: {document['dataset']}",
        "",
        f"Run `{document['run']}`: {data_figures(document)}. Every figure is out of fold: each "
        "row was scored by a model that never saw it.",
        "",
    ]
    if final:
        lines.append(
            f"**Final model: {final['final']}** (the higher out-of-fold pAUC80 of stack and blend; "
            f"`stack/final.json`), operating threshold {cell(document['final_threshold'], '.6g')} "
            f"for {sensitivity:.0%} target sensitivity{on_probability(document)}."
        )
        if abs(final["sensitivity"] - sensitivity) > 1e-12:
            lines.append(
                f"Note: `stack/final.json` holds the threshold for {final['sensitivity']:.0%} "
                "sensitivity, which scoring uses; this report's thresholds are for "
                f"{sensitivity:.0%}. Rerun `invoke stack --run R --sensitivity {sensitivity}` to "
                "align them."
            )
    else:
        lines.append(
            "No final model yet: run `invoke stack --run R` to stack and blend the base models."
        )
    lines += [
        "",
        f"Thresholds: each model's own, chosen on its out-of-fold predictions as the highest "
        f"score that keeps recall at or above {sensitivity:.0%}. pAUC80 is the ISIC 2024 metric "
        "(ROC area above 80% TPR, 0..0.2, random about 0.02).",
        "",
        "| model | " + " | ".join(heading for _, heading, _ in COLUMNS) + " |",
        "|---|" + "|".join("---:" for _ in COLUMNS) + "|",
    ]
    for name, figures in document["models"].items():
        label = f"**{name}** (final)" if final and name == final["final"] else name
        if name == "calibrated":
            label = f"**calibrated** ({document['final']}, {document['final_method']})"
        cells = [cell(figures[key], fmt) for key, _, fmt in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Models:"]
    lines += [f"- {name}: {DESCRIPTIONS[name]}" for name in document["models"]]
    operating = operating_sentence(document)
    if operating:
        lines += ["", "## Operating point", "", operating]
    lines += ["", *_markdown_intervals(document)]
    lines += ["", *_markdown_subgroups(document)]
    lines += ["", *_markdown_decision(document)]
    lines += ["", "## Plots", ""]
    for key, name in document["plots"].items():
        lines += [f"### {PLOT_TITLES[key]}", "", f"![{key}]({name})", ""]
    lines += [
        "## Model card",
        "",
        f"The model card of this run: [{model_card.FILE}]({model_card.FILE}).",
        "",
    ]
    return "\n".join(lines)


def _md_table(headings: list[str], rows: list[list[str]], numeric_from: int = 1) -> list[str]:
    return [
        "| " + " | ".join(headings) + " |",
        "|" + "|".join("---" if i < numeric_from else "---:" for i in range(len(headings))) + "|",
        *["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows],
    ]


def _markdown_intervals(document: dict) -> list[str]:
    values = interval_values(document)
    if values is None:
        return [
            "## Figures with 95% CI",
            "",
            "No intervals: no model has an operating threshold in (0, 1).",
        ]
    lines = ["## Figures with 95% CI", "", values["note"], ""]
    lines += _md_table(
        ["model", *values["headings"]], [[r["name"], *r["cells"]] for r in values["models"]]
    )
    lines += [
        "",
        f"### Difference from the final model ({values['final']}), paired 95% CI",
        "",
        values["difference_note"],
    ]
    if values["differences"]:
        lines += [
            "",
            *_md_table(
                ["model", *values["headings"]],
                [[r["name"], *r["cells"]] for r in values["differences"]],
            ),
        ]
    return lines


def _markdown_subgroups(document: dict) -> list[str]:
    values = subgroup_values(document)
    lines = ["## Subgroup figures", "", values["note"]]
    if values["unavailable"]:
        return [*lines, "", f"Subgroup table not made: {values['unavailable']}."]
    for table in values["tables"]:
        rows = [
            [
                ("**" + r["subgroup"] + "** (below target)") if r["highlight"] else r["subgroup"],
                *r["cells"],
                r["status"],
            ]
            for r in table["rows"]
        ]
        lines += ["", f"### Subgroup: {table['title']}", ""]
        lines += _md_table(["subgroup", *values["headings"], "status"], rows)
    return lines


def _markdown_decision(document: dict) -> list[str]:
    values = decision_values(document)
    lines = ["## Decision curve (net benefit)", ""]
    if values is None:
        return [*lines, "No decision curve: the final model's score is not a probability."]
    lines += [values["note"], ""]
    lines += _md_table(
        ["threshold probability", *values["headings"]],
        [[r["threshold"], *r["cells"]] for r in values["rows"]],
    )
    return lines
