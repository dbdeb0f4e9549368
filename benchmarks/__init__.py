"""`invoke bench` and its parts: throughput and memory figures, each beside an in-run baseline.

- `benchmarks.common`: what the figures were measured on, peak memory, the child-process runner;
- `benchmarks.embedding`: naive loop / pipeline / model-only ceiling / reader;
- `benchmarks.images`: the embedding part's images (synthetic or real) and random weights;
- `benchmarks.store`: the feature store's write and read rates (reported with the embedding part);
- `benchmarks.gbdt`: features and one 5-fold LightGBM fit beside plain LightGBM on raw columns;
- `benchmarks.fusion`: one fusion-MLP epoch beside a linear model's pass over the same store;
- `benchmarks.scoring`: scoring a folder end to end beside the embedding pipeline alone;
- `benchmarks.run`: `run_bench`, every part in one run, written to `artifacts/bench/` as JSON
  and printed as a table.

They call only the public functions of `embed`, `tabular` and `fuse`, so they also show that the
public API is enough to drive every stage. Nothing in the product imports them.
"""

__all__: list[str] = []  # the parts are imported by name: benchmarks.run, benchmarks.gbdt...
