"""The fusion MLP stage: train it on a run's folds, and predict with it.

- `fuse.fusion.embeddings`: a run's rows -> their embeddings, one mini-batch at a time;
- `fuse.fusion.training`: one model on a training part, early-stopped on a validation part;
- `fuse.fusion.baselines`: the logistic-regression baseline on the same folds;
- `fuse.fusion.cross_validation`: `train_fusion`, resumable fold by fold, writing `<run>/fusion/`;
- `fuse.fusion.predict`: `FusionModel.load(stage_dir).predict(frame, embeddings)`.
"""

from fuse.fusion.cross_validation import train_fusion
from fuse.fusion.embeddings import Embeddings
from fuse.fusion.predict import FusionModel
from fuse.fusion.training import epoch_rows, minibatches, predict_rows, train_one

__all__ = [
    "Embeddings",
    "FusionModel",
    "epoch_rows",
    "minibatches",
    "predict_rows",
    "train_fusion",
    "train_one",
]
