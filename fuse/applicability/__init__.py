"""How unlike a run's training lesions a row is, so that a score that does not apply is said so.

- `fuse.applicability.detector`: the detector (image, acquisition and metadata parts), fitted out
  of fold on the training rows and applied to scored rows;
- `fuse.applicability.stage`: its folder `<run>/applicability/` written by `invoke stack` and loaded
  by scoring;
- `fuse.applicability.ranges`: numeric values far outside what training saw.
"""
