"""Engineered lesion features of the built-in ISIC 2024 spec, from the `tbp_lv_*` columns.

Ratios of size, shape, colour and border measurements of the 3D total-body-photography lesion
segmentation, as the public solutions of the ISIC 2024 Challenge computed them, and one combined
categorical (the coarse site joined with the TBP software's finer location). `FeatureEncoder`
builds a feature only when all its inputs are features of the spec (`engineered_for`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["COMBINED_SITE", "engineered_feature_names", "engineered_for", "engineered_values"]

# Numeric inputs by column name, each of shape (n_rows,).
_Arrays = Mapping[str, np.ndarray]


def _div(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
    """a / b, NaN where b is zero or missing (a zero-size lesion is a measurement failure)."""
    out = np.full(np.broadcast(a, b).shape, np.nan)
    np.divide(a, b, out=out, where=np.isfinite(b) & (b != 0))
    return out


def _delta_norm(c: _Arrays) -> np.ndarray:
    return np.sqrt(c["tbp_lv_deltaA"] ** 2 + c["tbp_lv_deltaB"] ** 2 + c["tbp_lv_deltaL"] ** 2)


def _distance_3d(c: _Arrays) -> np.ndarray:
    return np.sqrt(c["tbp_lv_x"] ** 2 + c["tbp_lv_y"] ** 2 + c["tbp_lv_z"] ** 2)


def _border_complexity(c: _Arrays) -> np.ndarray:
    return c["tbp_lv_norm_border"] + c["tbp_lv_symm_2axis"]


def _shape_index(c: _Arrays) -> np.ndarray:
    return _div(c["tbp_lv_areaMM2"], c["tbp_lv_perimeterMM"] ** 2)


def _log1p(x: np.ndarray) -> np.ndarray:
    out = np.full(x.shape, np.nan)
    np.log1p(x, out=out, where=x > -1)
    return out


def _sqrt(x: np.ndarray) -> np.ndarray:
    out = np.full(x.shape, np.nan)
    np.sqrt(x, out=out, where=x >= 0)
    return out


# Engineered ISIC 2024 features: (name, input columns, function). Written from the descriptions in
# the public notebook "ISIC 2024 | Only Tabular Data" and the 1st/2nd place write-ups. A feature is
# built only when all its inputs are features of the spec (an excluded input drops it).
_ENGINEERED: tuple[tuple[str, tuple[str, ...], Callable[[_Arrays], np.ndarray]], ...] = (
    # Short axis over longest diameter: 1 for a round lesion, small for an elongated one.
    (
        "lesion_size_ratio",
        ("tbp_lv_minorAxisMM", "clin_size_long_diam_mm"),
        lambda c: _div(c["tbp_lv_minorAxisMM"], c["clin_size_long_diam_mm"]),
    ),
    # Area over squared perimeter: compactness, largest (1 / 4 pi) for a disc, small for a ragged
    # outline.
    ("lesion_shape_index", ("tbp_lv_areaMM2", "tbp_lv_perimeterMM"), _shape_index),
    # How much the lesion's hue differs from the skin around it.
    (
        "hue_contrast",
        ("tbp_lv_H", "tbp_lv_Hext"),
        lambda c: np.abs(c["tbp_lv_H"] - c["tbp_lv_Hext"]),
    ),
    # How much darker or lighter the lesion is than the skin around it.
    (
        "luminance_contrast",
        ("tbp_lv_L", "tbp_lv_Lext"),
        lambda c: np.abs(c["tbp_lv_L"] - c["tbp_lv_Lext"]),
    ),
    # Saturation (chroma) difference between lesion and surrounding skin.
    (
        "chroma_contrast",
        ("tbp_lv_C", "tbp_lv_Cext"),
        lambda c: np.abs(c["tbp_lv_C"] - c["tbp_lv_Cext"]),
    ),
    # Euclidean colour distance (CIELAB) between lesion and surrounding skin.
    ("lesion_color_difference", ("tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL"), _delta_norm),
    # Border irregularity plus asymmetry: the "B" and "A" of the ABCD rule together.
    ("border_complexity", ("tbp_lv_norm_border", "tbp_lv_symm_2axis"), _border_complexity),
    # Mean colour variation inside the lesion relative to its largest radial variation.
    (
        "color_uniformity",
        ("tbp_lv_color_std_mean", "tbp_lv_radial_color_std_max"),
        lambda c: _div(c["tbp_lv_color_std_mean"], c["tbp_lv_radial_color_std_max"]),
    ),
    # Distance of the lesion from the origin of the 3D body model (roughly: where on the body).
    ("3d_position_distance", ("tbp_lv_x", "tbp_lv_y", "tbp_lv_z"), _distance_3d),
    # Outline length per unit area: high for small or ragged lesions.
    (
        "perimeter_to_area_ratio",
        ("tbp_lv_perimeterMM", "tbp_lv_areaMM2"),
        lambda c: _div(c["tbp_lv_perimeterMM"], c["tbp_lv_areaMM2"]),
    ),
    # Area per unit outline length: grows with size for a given shape.
    (
        "area_to_perimeter_ratio",
        ("tbp_lv_areaMM2", "tbp_lv_perimeterMM"),
        lambda c: _div(c["tbp_lv_areaMM2"], c["tbp_lv_perimeterMM"]),
    ),
    # Contrast with the surrounding skin plus colour irregularity: how much the lesion stands out.
    (
        "lesion_visibility_score",
        ("tbp_lv_deltaLBnorm", "tbp_lv_norm_color"),
        lambda c: c["tbp_lv_deltaLBnorm"] + c["tbp_lv_norm_color"],
    ),
    # Asymmetry and border irregularity that occur together.
    (
        "symmetry_border_consistency",
        ("tbp_lv_symm_2axis", "tbp_lv_norm_border"),
        lambda c: c["tbp_lv_symm_2axis"] * c["tbp_lv_norm_border"],
    ),
    # Their product over their sum: large only when both are large (a harmonic-mean-like blend).
    (
        "consistency_symmetry_border",
        ("tbp_lv_symm_2axis", "tbp_lv_norm_border"),
        lambda c: _div(
            c["tbp_lv_symm_2axis"] * c["tbp_lv_norm_border"],
            c["tbp_lv_symm_2axis"] + c["tbp_lv_norm_border"],
        ),
    ),
    # Luminance spread inside the lesion relative to the surrounding skin's luminance.
    (
        "color_consistency",
        ("tbp_lv_stdL", "tbp_lv_Lext"),
        lambda c: _div(c["tbp_lv_stdL"], c["tbp_lv_Lext"]),
    ),
    # Product over sum of the same two.
    (
        "consistency_color",
        ("tbp_lv_stdL", "tbp_lv_Lext"),
        lambda c: _div(c["tbp_lv_stdL"] * c["tbp_lv_Lext"], c["tbp_lv_stdL"] + c["tbp_lv_Lext"]),
    ),
    # Luminance spread inside the lesion relative to that of the skin around it.
    (
        "stdl_ratio",
        ("tbp_lv_stdL", "tbp_lv_stdLExt"),
        lambda c: _div(c["tbp_lv_stdL"], c["tbp_lv_stdLExt"]),
    ),
    # Large lesions in older patients are the riskier ones.
    (
        "size_age_interaction",
        ("clin_size_long_diam_mm", "age_approx"),
        lambda c: c["clin_size_long_diam_mm"] * c["age_approx"],
    ),
    # Hue weighted by colour variation inside the lesion.
    (
        "hue_color_std_interaction",
        ("tbp_lv_H", "tbp_lv_color_std_mean"),
        lambda c: c["tbp_lv_H"] * c["tbp_lv_color_std_mean"],
    ),
    # Mean of border irregularity, colour irregularity and eccentricity.
    (
        "lesion_severity_index",
        ("tbp_lv_norm_border", "tbp_lv_norm_color", "tbp_lv_eccentricity"),
        lambda c: (c["tbp_lv_norm_border"] + c["tbp_lv_norm_color"] + c["tbp_lv_eccentricity"]) / 3,
    ),
    # Border complexity plus compactness.
    (
        "shape_complexity_index",
        ("tbp_lv_norm_border", "tbp_lv_symm_2axis", "tbp_lv_areaMM2", "tbp_lv_perimeterMM"),
        lambda c: _border_complexity(c) + _shape_index(c),
    ),
    # Diameter per year of age: a large lesion in a young patient stands out.
    (
        "normalized_lesion_size",
        ("clin_size_long_diam_mm", "age_approx"),
        lambda c: _div(c["clin_size_long_diam_mm"], c["age_approx"]),
    ),
    # Named "difference" in the public notebook, but it is the mean hue of lesion and surroundings.
    (
        "mean_hue_difference",
        ("tbp_lv_H", "tbp_lv_Hext"),
        lambda c: (c["tbp_lv_H"] + c["tbp_lv_Hext"]) / 2,
    ),
    # Root-mean-square of the three CIELAB differences to the surrounding skin.
    (
        "std_dev_contrast",
        ("tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL"),
        lambda c: _delta_norm(c) / math.sqrt(3),
    ),
    # Mean of colour variation, area/perimeter ratio and asymmetry.
    (
        "color_shape_composite_index",
        ("tbp_lv_color_std_mean", "tbp_lv_area_perim_ratio", "tbp_lv_symm_2axis"),
        lambda c: (
            (c["tbp_lv_color_std_mean"] + c["tbp_lv_area_perim_ratio"] + c["tbp_lv_symm_2axis"]) / 3
        ),
    ),
    # Area on a log scale (areas span orders of magnitude).
    ("log_lesion_area", ("tbp_lv_areaMM2",), lambda c: _log1p(c["tbp_lv_areaMM2"])),
    # Irregular border and irregular colour together.
    (
        "border_color_interaction",
        ("tbp_lv_norm_border", "tbp_lv_norm_color"),
        lambda c: c["tbp_lv_norm_border"] * c["tbp_lv_norm_color"],
    ),
    # Their product over their sum.
    (
        "border_color_interaction_2",
        ("tbp_lv_norm_border", "tbp_lv_norm_color"),
        lambda c: _div(
            c["tbp_lv_norm_border"] * c["tbp_lv_norm_color"],
            c["tbp_lv_norm_border"] + c["tbp_lv_norm_color"],
        ),
    ),
    # Diameter per unit of contrast with the surrounding skin.
    (
        "size_color_contrast_ratio",
        ("clin_size_long_diam_mm", "tbp_lv_deltaLBnorm"),
        lambda c: _div(c["clin_size_long_diam_mm"], c["tbp_lv_deltaLBnorm"]),
    ),
    # The TBP software's "looks like a nevus" confidence per year of age.
    (
        "age_normalized_nevi_confidence",
        ("tbp_lv_nevi_confidence", "age_approx"),
        lambda c: _div(c["tbp_lv_nevi_confidence"], c["age_approx"]),
    ),
    # Named after the previous one in the public notebook; it is the length of (diameter, age).
    (
        "age_normalized_nevi_confidence_2",
        ("clin_size_long_diam_mm", "age_approx"),
        lambda c: np.sqrt(c["clin_size_long_diam_mm"] ** 2 + c["age_approx"] ** 2),
    ),
    # Radial colour variation weighted by asymmetry.
    (
        "color_asymmetry_index",
        ("tbp_lv_radial_color_std_max", "tbp_lv_symm_2axis"),
        lambda c: c["tbp_lv_radial_color_std_max"] * c["tbp_lv_symm_2axis"],
    ),
    # Area times distance from the body model's origin.
    (
        "volume_approximation_3d",
        ("tbp_lv_areaMM2", "tbp_lv_x", "tbp_lv_y", "tbp_lv_z"),
        lambda c: c["tbp_lv_areaMM2"] * _distance_3d(c),
    ),
    # Summed absolute L, A, B differences between lesion and surrounding skin.
    (
        "color_range",
        ("tbp_lv_L", "tbp_lv_Lext", "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B", "tbp_lv_Bext"),
        lambda c: (
            np.abs(c["tbp_lv_L"] - c["tbp_lv_Lext"])
            + np.abs(c["tbp_lv_A"] - c["tbp_lv_Aext"])
            + np.abs(c["tbp_lv_B"] - c["tbp_lv_Bext"])
        ),
    ),
    # Elongation weighted by colour variation.
    (
        "shape_color_consistency",
        ("tbp_lv_eccentricity", "tbp_lv_color_std_mean"),
        lambda c: c["tbp_lv_eccentricity"] * c["tbp_lv_color_std_mean"],
    ),
    # Perimeter over the circumference of the disc of equal area: 1 for a circle, more if ragged.
    (
        "border_length_ratio",
        ("tbp_lv_perimeterMM", "tbp_lv_areaMM2"),
        lambda c: _div(
            c["tbp_lv_perimeterMM"], 2 * np.pi * _sqrt(_div(c["tbp_lv_areaMM2"], np.pi))
        ),
    ),
    # Age x diameter x asymmetry: large asymmetric lesions in older patients.
    (
        "age_size_symmetry_index",
        ("age_approx", "clin_size_long_diam_mm", "tbp_lv_symm_2axis"),
        lambda c: c["age_approx"] * c["clin_size_long_diam_mm"] * c["tbp_lv_symm_2axis"],
    ),
    # The same with area instead of diameter.
    (
        "index_age_size_symmetry",
        ("age_approx", "tbp_lv_areaMM2", "tbp_lv_symm_2axis"),
        lambda c: c["age_approx"] * c["tbp_lv_areaMM2"] * c["tbp_lv_symm_2axis"],
    ),
)

# Engineered categorical: the coarse site and the TBP software's finer location in one value.
COMBINED_SITE = ("combined_anatomical_site", ("anatom_site_general", "tbp_lv_location"))


def engineered_feature_names() -> tuple[str, ...]:
    """Names of all engineered numeric ISIC 2024 features (before any is dropped for inputs)."""
    return tuple(name for name, _, _ in _ENGINEERED)


def engineered_for(numeric: Sequence[str]) -> list[str]:
    """Names of the engineered features whose inputs are all among the `numeric` columns, in
    table order."""
    available = set(numeric)
    return [name for name, inputs, _ in _ENGINEERED if set(inputs) <= available]


_FUNCTIONS = {name: function for name, _, function in _ENGINEERED}


def engineered_values(name: str, numeric: _Arrays) -> np.ndarray:
    """Engineered feature `name` from the numeric columns (each (n_rows,) float64): (n_rows,)
    float64, NaN where an input is missing or the result is not finite (a division by zero)."""
    with np.errstate(all="ignore"):
        values = np.asarray(_FUNCTIONS[name](numeric), dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    return values
