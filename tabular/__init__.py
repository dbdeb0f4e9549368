"""Metadata side of lesionfuse: dataset spec, validation, features, folds, metrics, LightGBM."""
