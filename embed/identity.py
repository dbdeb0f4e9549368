"""What makes two embeddings comparable: the embedding identity, defined and compared in one place.

An embedding identity is the dict of `IDENTITY_FIELDS` (backbone, weights_sha256, preprocessing,
image_size, views (vectors per image, the zoom view included), zoom, blocks, pooling, variant,
dtype, dim). A feature store records it in its
manifest; a model trained on a store records it too; anything that combines vectors with a store or
a model compares the two with `check_identity`, which names the first field that differs (dotted for
nested fields, e.g. `preprocessing.normalize_mean`) and both values.

This module depends on nothing but the errors (no torch, no settings), so reading a store's
identity stays cheap; the identity a run's settings give is `embed.config.embedding_identity`.
"""

from __future__ import annotations

import json

from embed.errors import EmbedError, StoreMismatchError

__all__ = [
    "DTYPE",
    "IDENTITY_FIELDS",
    "LEGACY_VALUES",
    "UNFAITHFUL_VARIANTS",
    "as_json",
    "check_identity",
    "identity_of",
    "with_legacy_values",
]

IDENTITY_FIELDS: tuple[str, ...] = (
    "backbone",
    "weights_sha256",
    "preprocessing",
    "image_size",
    # Before views: a store with a zoom view also has one view more, and the zoom says why.
    "zoom",
    "views",
    "blocks",
    "pooling",
    "variant",
    "dtype",
    "dim",
)
# Fields added after stores and runs already existed, with the value every earlier store and
# model had: an identity that lacks one is read with this value, so older stores stay usable.
LEGACY_VALUES: dict = {"blocks": ["layer4"], "pooling": "avg", "variant": "eager", "zoom": None}
# Inference variants that compute another function than the fp32 model (measured in
# `embed.variants.MEASURED`): their vectors never share a store or a run with the others.
UNFAITHFUL_VARIANTS: tuple[str, ...] = ("int8",)
# Vectors are stored as float16: half the bytes of float32, and the frozen backbone's pooled
# features lose nothing a downstream model can use at that precision.
DTYPE = "float16"

_MISMATCH_HINT = (
    "use a store built with the same settings (a store's name carries the data set, weights sha, "
    "image size and views) or build a new one with `invoke embed`"
)


def with_legacy_values(identity: dict) -> dict:
    """A whole recorded identity (one holding every field that older stores and models
    recorded) with `LEGACY_VALUES` filled in where a newer field is absent; a partial identity
    (some fields asked for) is returned as it is, so that it still checks only its fields."""
    recorded = all(key in identity for key in IDENTITY_FIELDS if key not in LEGACY_VALUES)
    return {**LEGACY_VALUES, **identity} if recorded else dict(identity)


def identity_of(record: dict) -> dict:
    """The identity fields of a record (a store's manifest, a stage's `store.json`), with the
    values older records imply for fields they lack (`with_legacy_values`)."""
    return with_legacy_values({key: record[key] for key in IDENTITY_FIELDS if key in record})


def as_json(value):
    """The value as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def _first_difference(field: str, have, want) -> str | None:
    """None when equal, else the dotted name of the first differing (sub)field."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in sorted(set(have) | set(want)):
            if key not in have or key not in want:
                return f"{field}.{key}"
            sub = _first_difference(f"{field}.{key}", have[key], want[key])
            if sub:
                return sub
        return None
    return None if have == want else field


def _lookup(value, dotted: str):
    """The sub-value named by `dotted` below its top-level field, or "<absent>"."""
    for part in dotted.split(".")[1:]:
        value = value.get(part, "<absent>") if isinstance(value, dict) else "<absent>"
    return value


def check_identity(
    have: dict, want: dict, have_label: str, want_label: str, *, hint: str = _MISMATCH_HINT
) -> None:
    """Raise StoreMismatchError naming the first identity field where `have` differs from `want`.

    Only the fields `want` holds are compared (a partial identity checks those fields); fields
    are compared as JSON reads them back, so tuples and lists are alike. The message reads
    "<have_label> was built with <field>=<have value> but <want_label> <field>=<want value>;
    <hint>", e.g. have_label "feature store '/s'", want_label "this run asks for".

    Raises EmbedError when `want` holds a field that is not an identity field.
    """
    unknown = set(want) - set(IDENTITY_FIELDS)
    if unknown:
        raise EmbedError(
            f"unknown feature store field(s) {sorted(unknown)}; known: {list(IDENTITY_FIELDS)}"
        )
    want = as_json(with_legacy_values(want))
    # `have` is always a record (a store, a model, what this code would embed): fields it lacks
    # take their legacy values even if it also lacks others.
    have = {**LEGACY_VALUES, **have}
    for key in IDENTITY_FIELDS:
        if key not in want:
            continue
        have_value = as_json(have.get(key, "<absent>"))
        diff = _first_difference(key, have_value, want[key])
        if diff:
            raise StoreMismatchError(
                f"{have_label} was built with {diff}={_lookup(have_value, diff)!r} but "
                f"{want_label} {diff}={_lookup(want[key], diff)!r}; {hint}"
            )
