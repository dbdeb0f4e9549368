"""The pages' template environment: escaping by the engine, no silent blanks, templates shipped."""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path

import jinja2
import pytest

from fuse.pages import html

TEMPLATES = Path(html.__file__).parent / "templates"


def test_values_are_escaped_by_the_engine():
    out = html.render(
        "report/plots.html",
        plots=[
            {"key": 'k"><script>', "title": "<b>ROC</b> & co", "src": "data:image/png;base64,AAAA"}
        ],
    )
    assert "<script>" not in out and "<b>" not in out
    assert "&lt;b&gt;ROC&lt;/b&gt; &amp; co" in out
    assert 'src="data:image/png;base64,AAAA"' in out  # a data URI needs no escaping and gets none


def test_a_value_the_template_needs_but_was_not_given_is_an_error():
    with pytest.raises(jinja2.UndefinedError, match="plots"):
        html.render("report/plots.html")


def test_every_page_has_the_shared_head_with_the_csp():
    out = html.render("report/plots.html", plots=[])  # a part renders alone, without the head
    assert "Content-Security-Policy" not in out
    page = html.environment().from_string(
        '{% extends "base.html" %}{% block title %}t{% endblock %}'
    )
    head = page.render(csp=html.CSP)
    assert f'content="{html.CSP}"'.replace("'", "&#39;") in head
    assert head.count("<script>") == 1 and "table.sortable" in head


def test_code_segments():
    assert html.code_segments("the `probability` scoring writes") == [
        {"text": "the ", "code": False},
        {"text": "probability", "code": True},
        {"text": " scoring writes", "code": False},
    ]
    assert html.code_segments("") == []
    assert html.code_segments("`a``b`") == [
        {"text": "a", "code": True},
        {"text": "b", "code": True},
    ]


def test_every_template_is_package_data():
    """pyproject's package-data globs cover every file under fuse/pages/templates, so an installed
    copy (not only a checkout or `pip install -e .`) finds them."""
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["fuse.pages"]
    files = [
        p.relative_to(TEMPLATES.parent).as_posix() for p in TEMPLATES.rglob("*") if p.is_file()
    ]
    assert len(files) >= 10
    # setuptools expands the patterns as glob.glob(..., recursive=True) does
    shipped = {
        f
        for pattern in patterns
        for f in glob.glob(pattern, root_dir=TEMPLATES.parent, recursive=True)
    }
    assert sorted(set(files) - shipped) == []
    # and the environment loads each page by name
    for name in ("triage.html", "report.html", "base.html"):
        assert html.environment().get_template(name).filename.startswith(str(TEMPLATES))
