"""The run folder: its layout, its opening paths, what each stage read, and one shape for a stage.

Below the stages: it imports `common` only, and `embed`, `tabular` and `fuse` all use it.
- `paths`: the artifacts root, a run's folder, the feature stores' root.
- `layout`: where a run keeps what (`RunLayout`), atomic writes of its shared files, the
  out-of-fold files, and the one "stage missing" message.
- `records`: each stage's `store.json` (the feature store and vectors it read) and their comparison.
- `stage`: the `Stage` protocol every trained stage implements, and `load_stage`.
- `errors`: `RunError`.
"""

__all__: list[
    str
] = []  # the modules are the interface: `runfolder.layout`, `runfolder.records`, ...
