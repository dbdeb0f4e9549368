"""How unlike a run's training lesions a row is, so that a score that does not apply is said so.

- `fuse.applicability.detector`: the detector (`Applicability`) joining the parts, its
  out-of-fold fit (`fit_applicability`), saving and `load`;
- `fuse.applicability.config`: its settings (`ApplicabilityConfig`);
- `fuse.applicability.inputs`: embeddings, cues and metadata checked and shaped;
- `fuse.applicability.image_part`: the image part (residual outside the training images'
  principal directions, or k-nearest-neighbour cosine distance);
- `fuse.applicability.acquisition_part`: the acquisition-cue part (robust Mahalanobis distance);
- `fuse.applicability.metadata_part`: the metadata part (values out of range, unseen categories);
- `fuse.applicability.percentiles`: raw scores as percentiles of the out-of-fold scores, the
  combined score and the marking threshold;
- `fuse.applicability.stage`: its folder `<run>/applicability/` written by `invoke stack` and loaded
  by scoring;
- `fuse.applicability.ranges`: numeric values far outside what training saw.
"""

__all__: list[str] = []
