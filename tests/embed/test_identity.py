"""The embedding identity: one definition of its fields, how it is built, how two are compared."""

from __future__ import annotations

import pytest
from storetools import random_weights, tiny_config

from embed.backbone import BACKBONE_NAME, preprocessing_for
from embed.config import embedding_identity
from embed.errors import EmbedError, StoreMismatchError
from embed.identity import IDENTITY_FIELDS, check_identity, identity_of
from embed.pooled import DEFAULT_BLOCKS, DEFAULT_POOLING, feature_dim
from embed.variants import default_variant

HAVE = {
    "backbone": "resnet50-keras-imagenet",
    "weights_sha256": "ab" * 32,
    "preprocessing": {"resize": "whole image", "mean": (0.485, 0.456, 0.406)},
    "image_size": 224,
    "views": 1,
    "dtype": "float16",
    "dim": 2048,
}


def test_embedding_identity_is_built_from_weights_and_config(tmp_path):
    weights = random_weights(tmp_path / "w.pth")
    identity = embedding_identity(weights, tiny_config(image_size=48, views=2))
    assert tuple(identity) == IDENTITY_FIELDS
    assert identity == {
        "backbone": BACKBONE_NAME,
        "weights_sha256": weights.sha256,
        "preprocessing": preprocessing_for(weights),
        "image_size": 48,
        "zoom": None,
        "views": 2,
        "blocks": list(DEFAULT_BLOCKS),
        "pooling": DEFAULT_POOLING,
        "variant": default_variant("cpu", amp=False),  # "auto" in fp32, as resolved here
        "dtype": "float16",
        "dim": feature_dim(DEFAULT_BLOCKS),
    }
    several = embedding_identity(weights, tiny_config(blocks="layer4,layer2", pooling="gem"))
    assert (several["blocks"], several["pooling"], several["dim"]) == (
        ["layer2", "layer4"],
        "gem",
        2560,
    )


def test_records_made_before_blocks_were_a_setting_read_as_the_layer4_average():
    # HAVE is such a record: no blocks, no pooling.
    assert identity_of(HAVE)["blocks"] == ["layer4"] and identity_of(HAVE)["pooling"] == "avg"
    check_identity(HAVE, {**HAVE, "blocks": ("layer4",), "pooling": "avg"}, "old store", "the run")
    check_identity(
        {**HAVE, "blocks": ["layer4"], "pooling": "avg"}, HAVE, "new store", "an old run"
    )
    with pytest.raises(
        StoreMismatchError,
        match=r"^old store was built with blocks=\['layer4'\] but "
        r"a layer3 run blocks=\['layer3', 'layer4'\]; use a store",
    ):
        check_identity(
            HAVE, {**HAVE, "blocks": ["layer3", "layer4"], "dim": 3072}, "old store", "a layer3 run"
        )
    with pytest.raises(StoreMismatchError, match=r"pooling='gem' but b pooling='avg'"):
        check_identity({**HAVE, "pooling": "gem"}, HAVE, "a", "b")
    # A partial identity checks its own fields only: no blocks filled in.
    check_identity({**HAVE, "blocks": ["layer3"], "dim": 1024}, {"image_size": 224}, "a", "b")


def test_check_identity_names_the_first_differing_field_dotted_with_both_values():
    check_identity(
        HAVE,
        {**HAVE, "preprocessing": {"resize": "whole image", "mean": [0.485, 0.456, 0.406]}},
        "a",
        "b",
    )
    want = {**HAVE, "preprocessing": {"resize": "whole image", "mean": [0.5, 0.5, 0.5]}}
    with pytest.raises(
        StoreMismatchError,
        match=r"^run 'r1' was built with preprocessing.mean=\[0.485, 0.456, 0.406\] but "
        r"store '/s' has preprocessing.mean=\[0.5, 0.5, 0.5\]; use a store built",
    ):
        check_identity(HAVE, want, "run 'r1'", "store '/s' has")


def test_check_identity_compares_only_the_fields_wanted_and_marks_absent_ones():
    check_identity(HAVE, {"image_size": 224}, "a", "b")
    with pytest.raises(StoreMismatchError, match=r"^a was built with views=1 but b views=8; hint$"):
        check_identity(HAVE, {"image_size": 224, "views": 8}, "a", "b", hint="hint")
    with pytest.raises(StoreMismatchError, match=r"a was built with dim='<absent>' but b dim=2048"):
        check_identity({k: v for k, v in HAVE.items() if k != "dim"}, HAVE, "a", "b")
    with pytest.raises(
        StoreMismatchError,
        match=r"preprocessing.crop='<absent>' but b preprocessing.crop='centre'",
    ):
        check_identity(
            HAVE, {"preprocessing": {**HAVE["preprocessing"], "crop": "centre"}}, "a", "b"
        )


def test_check_identity_refuses_fields_it_does_not_know():
    with pytest.raises(
        EmbedError, match=r"unknown feature store field\(s\) \['colour'\]; known: \['backbone'"
    ):
        check_identity(HAVE, {"colour": "red"}, "a", "b")
