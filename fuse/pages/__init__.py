"""The HTML pages a run writes, rendered by Jinja2 from `templates/` with autoescaping.

- `fuse.pages.html`: the template environment and the shared helpers (thumbnails, code segments);
- `fuse.pages.report`: the run's evaluation report (`<run>/report/index.html`, `report.md`);
- `fuse.pages.report_applicability`: the report's applicability section;
- `fuse.pages.model_card`: the model card the report carries;
- `fuse.pages.triage`: the triage page of a scored folder.
"""

__all__: list[str] = []
