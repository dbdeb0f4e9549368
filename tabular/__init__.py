"""Metadata side of lesionfuse: dataset spec, validation, features, folds, metrics, LightGBM.

Modules, each imported by its own name (the package itself exports nothing):
- `spec`, `validate`, `run`: the dataset spec, metadata checks, a run opened (spec copy, folds);
- `features` (the encoder: one-hot and numeric), `features_engineered` (ISIC 2024 lesion
  features), `features_patient` (per-patient features);
- `folds`, `metrics`, `uncertainty`, `subgroups`, `decision_curve`: folds and the report's figures;
- the LightGBM stage: `gbdt_config` (parameters, `GBDTConfig`), `gbdt_image` (image PCA and
  patient context), `gbdt_sampling` (negative down-sampling), `gbdt_folds` (folds built once),
  `gbdt_ensemble` (fold x seed fit, saving), `gbdt_model` (`GBDTModel.load(stage_dir).predict`),
  `train` (`fit_gbdt`, the stage), `tuning` and `tuning_storage` (its Optuna study).
"""

__all__: list[str] = []
