"""The synthetic metadata table: the generative story of the ISIC 2024-like rows.

- Patients: heavy-tailed lesions per patient (log-normal weights, like the real set's ~1,042
  patients for 401,059 rows), age in 5-year steps, sex (a few missing), the imaging site
  (`attribution` with its `copyright_license`), the tile type (`3D: XP` crops are darker than
  `3D: white`), skin colour, and a "nevus phenotype": each patient's own typical lesion.
- Lesions: eight latent traits (size, darkness, colour variegation, border irregularity,
  asymmetry, redness, nevus-likeness, yellowness) = the patient's phenotype + correlated lesion
  noise. Malignant lesions (chosen with odds rising with age and on the head/neck) add a
  subtype-specific shift scaled by a random severity, so some look benign; about 4% of benign
  lesions are atypical mimics that shift the same way.
- Measurements: every `tbp_lv_*` column computed from the traits with the real set's identities.
- Train-only columns: the diagnosis (consistent with the target), histology and lesion ids.

`make_table(rng, ...)` draws every value from the one `rng`, in a fixed order: the same stream
gives the same table.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

__all__ = ["TEST_COLUMNS", "TRAIN_COLUMNS", "TRAIN_ONLY_COLUMNS", "ellipse_perimeter", "make_table"]

log = logging.getLogger(__name__)

# The real train-metadata.csv header, in its order.
TRAIN_COLUMNS: tuple[str, ...] = (
    "isic_id", "target", "patient_id", "age_approx", "sex", "anatom_site_general",
    "clin_size_long_diam_mm", "image_type", "tbp_tile_type", "tbp_lv_A", "tbp_lv_Aext",
    "tbp_lv_B", "tbp_lv_Bext", "tbp_lv_C", "tbp_lv_Cext", "tbp_lv_H", "tbp_lv_Hext", "tbp_lv_L",
    "tbp_lv_Lext", "tbp_lv_areaMM2", "tbp_lv_area_perim_ratio", "tbp_lv_color_std_mean",
    "tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLB", "tbp_lv_deltaLBnorm",
    "tbp_lv_eccentricity", "tbp_lv_location", "tbp_lv_location_simple", "tbp_lv_minorAxisMM",
    "tbp_lv_nevi_confidence", "tbp_lv_norm_border", "tbp_lv_norm_color", "tbp_lv_perimeterMM",
    "tbp_lv_radial_color_std_max", "tbp_lv_stdL", "tbp_lv_stdLExt", "tbp_lv_symm_2axis",
    "tbp_lv_symm_2axis_angle", "tbp_lv_x", "tbp_lv_y", "tbp_lv_z", "attribution",
    "copyright_license", "lesion_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4",
    "iddx_5", "mel_mitotic_index", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence",
)  # fmt: skip
# Absent from the real test-metadata.csv (the answer and what only a biopsy tells).
TRAIN_ONLY_COLUMNS: tuple[str, ...] = (
    "target", "lesion_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4", "iddx_5",
    "mel_mitotic_index", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence",
)  # fmt: skip
TEST_COLUMNS: tuple[str, ...] = tuple(c for c in TRAIN_COLUMNS if c not in TRAIN_ONLY_COLUMNS)

# Imaging sites: row shares of the real set (approximate) and the licence each site uses.
_ATTRIBUTIONS = (
    ("Memorial Sloan Kettering Cancer Center", "CC-BY", 129),
    ("Department of Dermatology, Hospital Clínic de Barcelona", "CC-BY-NC", 106),
    ("University Hospital of Basel", "CC-BY-NC", 65),
    ("Frazer Institute, The University of Queensland, Dermatology Research Centre", "CC-BY", 52),
    ("ACEMID MIA", "CC-0", 29),
    ("ViDIR Group, Department of Dermatology, Medical University of Vienna", "CC-BY-NC", 13),
    (
        "Department of Dermatology, University of Athens, Andreas Syggros Hospital of Skin and "
        "Venereal Diseases, Alexander Stratigos, Konstantinos Liopyris",
        "CC-BY",
        8,
    ),
)

# The torso's anatom_site_general values, named so that the table below keeps to one line a row.
_BACK, _FRONT = "posterior torso", "anterior torso"
# tbp_lv_location: share of rows, simple location, anatom_site_general, 3D box
# (x, y, z ranges in mm; x < 0 is the patient's left, y is height, z > 0 the back).
_LOCATIONS = (
    ("Torso Back Top Third", 71, "Torso Back", _BACK, (-180, 180), (1200, 1540), (90, 230)),
    ("Torso Back Middle Third", 46, "Torso Back", _BACK, (-170, 170), (980, 1200), (80, 210)),
    ("Torso Back Bottom Third", 8, "Torso Back", _BACK, (-160, 160), (820, 980), (70, 190)),
    ("Torso Back", 1, "Torso Back", _BACK, (-170, 170), (820, 1540), (70, 230)),
    ("Torso Front Top Half", 63, "Torso Front", _FRONT, (-180, 180), (1150, 1450), (-90, 60)),
    ("Torso Front Bottom Half", 17, "Torso Front", _FRONT, (-170, 170), (850, 1150), (-100, 80)),
    ("Torso Front", 1, "Torso Front", _FRONT, (-170, 170), (850, 1450), (-100, 80)),
    ("Head & Neck", 12, "Head & Neck", "head/neck", (-100, 100), (1450, 1750), (-110, 90)),
    ("Left Arm - Upper", 23, "Left Arm", "upper extremity", (-380, -190), (1150, 1450), (-20, 90)),
    ("Left Arm - Lower", 17, "Left Arm", "upper extremity", (-470, -260), (850, 1250), (-20, 90)),
    ("Left Arm", 1, "Left Arm", "upper extremity", (-470, -190), (850, 1450), (-20, 90)),
    ("Right Arm - Upper", 23, "Right Arm", "upper extremity", (190, 380), (1150, 1450), (-20, 90)),
    ("Right Arm - Lower", 14, "Right Arm", "upper extremity", (260, 470), (850, 1250), (-20, 90)),
    ("Right Arm", 1, "Right Arm", "upper extremity", (190, 470), (850, 1450), (-20, 90)),
    ("Left Leg - Upper", 24, "Left Leg", "lower extremity", (-250, -60), (550, 850), (-60, 60)),
    ("Left Leg - Lower", 27, "Left Leg", "lower extremity", (-240, -60), (100, 550), (-20, 110)),
    ("Left Leg", 2, "Left Leg", "lower extremity", (-250, -60), (100, 850), (-60, 110)),
    ("Right Leg - Upper", 23, "Right Leg", "lower extremity", (60, 250), (550, 850), (-60, 60)),
    ("Right Leg - Lower", 25, "Right Leg", "lower extremity", (60, 280), (100, 550), (-20, 110)),
    ("Right Leg", 2, "Right Leg", "lower extremity", (60, 280), (100, 850), (-60, 110)),
    ("Unknown", 6, "Unknown", None, (-450, 450), (-150, 1750), (-160, 230)),
)  # fmt: skip

# Latent lesion traits, in this order.
_TRAITS = ("size", "dark", "varieg", "border", "asym", "red", "nevus", "yellow")
_SIGMA_PATIENT = 0.7  # spread of patients' typical lesions, per trait
_SIGMA_LESION = 0.7  # spread of one patient's lesions around that typical lesion
# How a malignant subtype (or a benign mimic) moves a lesion away from the patient's others,
# in trait units at severity 1.
_SHIFTS = {
    "melanoma": (0.9, 0.8, 1.1, 0.9, 0.8, 0.0, -0.9, -0.3),
    "bcc": (0.5, -0.5, 0.6, 0.5, 0.4, 1.1, -1.3, -0.6),
    "scc": (0.8, -0.3, 0.7, 0.7, 0.5, 1.0, -1.1, 0.3),
    "mimic": (0.8, 0.7, 0.8, 0.6, 0.4, 0.2, -0.6, 0.2),
}
_SEVERITY = (0.3, 1.8)  # uniform range: weak shifts leave malignant lesions looking benign
_MIMIC_SHARE = 0.04

_MEL = "Malignant::Malignant melanocytic proliferations (Melanoma)"
_BCC = "Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma"
_SCC = "Malignant::Malignant epidermal proliferations"
# subtype, share of malignant rows, iddx_full; the melanoma rows with "Melanoma Invasive" get
# mel_thick_mm and (mostly) mel_mitotic_index.
_MALIGNANT_DX = (
    ("bcc", 0.20, _BCC),
    ("bcc", 0.18, _BCC + "::Basal cell carcinoma, Nodular"),
    ("bcc", 0.10, _BCC + "::Basal cell carcinoma, Superficial"),
    ("bcc", 0.03, _BCC + "::Basal cell carcinoma, Infiltrating"),
    ("melanoma", 0.08, _MEL + "::Melanoma in situ"),
    ("melanoma", 0.04, _MEL + "::Melanoma in situ::Melanoma in situ, Lentigo maligna type"),
    ("melanoma", 0.04, _MEL + "::Melanoma in situ::Melanoma in situ, Superficial spreading"),
    ("melanoma", 0.04, _MEL + "::Melanoma Invasive"),
    ("melanoma", 0.05, _MEL + "::Melanoma Invasive::Melanoma Invasive, Superficial spreading"),
    ("melanoma", 0.02, _MEL + "::Melanoma Invasive::Melanoma Invasive, Associated with a nevus"),
    ("melanoma", 0.01, _MEL + "::Melanoma Invasive::Melanoma Invasive, Nodular"),
    ("scc", 0.10, _SCC + "::Squamous cell carcinoma in situ"),
    ("scc", 0.08, _SCC + "::Squamous cell carcinoma, Invasive"),
    (
        "scc",
        0.03,
        _SCC
        + "::Squamous cell carcinoma, Invasive::Squamous cell carcinoma, Invasive, "
        + "Keratoacanthoma-type",
    ),
)
# Benign rows that carry a lesion_id sometimes have a detailed diagnosis.
_BENIGN_DX = (
    "Benign::Benign melanocytic proliferations::Nevus",
    "Benign::Benign melanocytic proliferations::Nevus::Nevus, Atypical, Dysplastic, or Clark",
    "Benign::Benign epidermal proliferations::Seborrheic keratosis",
    "Benign::Benign epidermal proliferations::Solar lentigo",
    "Benign::Benign soft tissue proliferations - Vascular::Hemangioma",
    "Indeterminate::Indeterminate epidermal proliferations::Solar or actinic keratosis",
)
# A missing cell of an object column, as an array: numpy's `where` takes arrays, not a bare None.
_NONE = np.array(None, dtype=object)
_MITOTIC = ("0/mm^2", "<1/mm^2", "1/mm^2", "2/mm^2", "3/mm^2", "4/mm^2", ">4/mm^2")


def _lesions_per_patient(rng: np.random.Generator, n_rows: int, n_patients: int) -> np.ndarray:
    """Counts summing to n_rows, each >= 1, heavy-tailed (a few patients have thousands)."""
    weights = rng.lognormal(0.0, 1.1, size=n_patients)
    extra = rng.multinomial(n_rows - n_patients, weights / weights.sum())
    return 1 + extra


def _trait_cholesky() -> np.ndarray:
    r = np.eye(len(_TRAITS))
    idx = {t: i for i, t in enumerate(_TRAITS)}
    for a, b, rho in (
        ("size", "varieg", 0.4),
        ("size", "border", 0.35),
        ("size", "asym", 0.2),
        ("varieg", "border", 0.4),
        ("dark", "varieg", 0.3),
        ("asym", "border", 0.35),
        ("nevus", "dark", 0.3),
        ("nevus", "red", -0.3),
        ("red", "yellow", -0.2),
    ):
        r[idx[a], idx[b]] = r[idx[b], idx[a]] = rho
    return np.linalg.cholesky(r)


def _choose_top(rng: np.random.Generator, log_weight: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of k rows drawn without replacement with probability ~ exp(log_weight)."""
    mask = np.zeros(len(log_weight), dtype=bool)
    if k <= 0:
        return mask
    keys = log_weight + rng.gumbel(size=len(log_weight))  # Gumbel top-k = weighted sampling
    mask[np.argpartition(-keys, k - 1)[:k]] = True
    return mask


def make_table(
    rng: np.random.Generator,
    isic_ids: np.ndarray,
    patient_ids: np.ndarray,
    lesion_ids: np.ndarray,
    prevalence: float,
) -> pd.DataFrame:
    """All 55 training columns for len(isic_ids) rows of len(patient_ids) patients, sorted by id.

    The steps draw from `rng` in this order (changing it changes every table): lesions per
    patient, the patients, where each lesion is, which are malignant, their traits, their
    measurements, the train-only columns, the 3D positions' noise.
    """
    n, n_pat = len(isic_ids), len(patient_ids)
    counts = _lesions_per_patient(rng, n, n_pat)
    pat = np.repeat(np.arange(n_pat), counts)
    patients = _patients(rng, n_pat)
    where = _locations(rng, n, patients["height"][pat])
    target, dx, mimic = _malignant(rng, patients["risk"][pat], where["general"], prevalence)
    t = _traits(rng, patients["phenotype"][pat], target, dx, mimic)
    m = _measurements(
        rng,
        t,
        patients["skin_l"][pat],
        patients["skin_a"][pat],
        patients["skin_b"][pat],
        patients["texture"][pat],
        target,
    )
    diagnosis = _diagnosis(rng, target, dx, mimic, lesion_ids)
    frame = pd.DataFrame(
        {
            "isic_id": isic_ids,
            "target": target.astype(np.int64),
            "patient_id": patient_ids[pat],
            "age_approx": patients["age"][pat],
            "sex": patients["sex"][pat],
            "anatom_site_general": where["general"],
            "clin_size_long_diam_mm": m["diam"],
            "image_type": np.full(n, "TBP tile: close-up", dtype=object),
            "tbp_tile_type": patients["tile"][pat],
            **{name: m[name] for name in _MEASURED},
            "tbp_lv_location": where["location"],
            "tbp_lv_location_simple": where["simple"],
            "tbp_lv_x": np.round(where["x"] + rng.normal(0, 8, n), 4),
            "tbp_lv_y": np.round(where["y"] + rng.normal(0, 8, n), 4),
            "tbp_lv_z": np.round(where["z"] + rng.normal(0, 8, n), 4),
            "attribution": patients["attribution"][pat],
            "copyright_license": patients["licence"][pat],
            **diagnosis,
        }
    )
    # The real file is sorted by isic_id; this also interleaves the patients.
    # Six decimals is more than any of these is measured to, and keeps the file small and fast.
    frame[list(_ROUNDED)] = frame[list(_ROUNDED)].round(6)
    frame = frame.sort_values("isic_id", kind="stable", ignore_index=True)
    return frame.loc[:, list(TRAIN_COLUMNS)]


def _patients(rng: np.random.Generator, n_pat: int) -> dict[str, np.ndarray]:
    """Per patient: age, sex, imaging site and licence, tile type, skin colour and texture, body
    height (a scale of the 3D positions), the nevus phenotype (n_pat, traits) and a malignancy
    risk that rises with age and for men."""
    age = np.clip(np.round(rng.normal(58.0, 13.5, n_pat) / 5.0) * 5.0, 15.0, 85.0)
    age[rng.random(n_pat) < 0.01] = np.nan
    sex = rng.choice(np.array(["male", "female", None], dtype=object), n_pat, p=[0.64, 0.33, 0.03])
    shares = np.array([a[2] for a in _ATTRIBUTIONS], dtype=float)
    site = rng.choice(len(_ATTRIBUTIONS), n_pat, p=shares / shares.sum())
    xp = rng.random(n_pat) < 0.7
    patients = {
        "age": age,
        "sex": sex,
        "attribution": np.array([a[0] for a in _ATTRIBUTIONS], dtype=object)[site],
        "licence": np.array([a[1] for a in _ATTRIBUTIONS], dtype=object)[site],
        "tile": np.where(xp, "3D: XP", "3D: white").astype(object),
    }
    # One draw per line, in this order: the stream decides every later value.
    patients["skin_l"] = np.where(xp, 46.0, 61.0) + rng.normal(0, 6.5, n_pat)
    patients["skin_a"] = rng.normal(15.5, 3.2, n_pat)
    patients["skin_b"] = rng.normal(25.5, 3.2, n_pat)
    patients["texture"] = rng.normal(0.0, 0.2, n_pat)
    patients["height"] = rng.normal(1.0, 0.05, n_pat)
    chol = _trait_cholesky()
    patients["phenotype"] = _SIGMA_PATIENT * rng.standard_normal((n_pat, len(_TRAITS))) @ chol.T
    age_filled = np.where(np.isnan(age), 58.0, age)
    patients["risk"] = (
        0.045 * (age_filled - 58.0) + 0.3 * (sex == "male") + rng.normal(0, 0.5, n_pat)
    )
    return patients


def _locations(rng: np.random.Generator, n: int, height: np.ndarray) -> dict[str, np.ndarray]:
    """Where each lesion is: `tbp_lv_location`, its simple form, `anatom_site_general`, and a 3D
    position (x, y, z in mm) inside the location's box, y scaled by the patient's `height`."""
    loc_share = np.array([loc[1] for loc in _LOCATIONS], dtype=float)
    loc = rng.choice(len(_LOCATIONS), n, p=loc_share / loc_share.sum())
    boxes = np.array([[*x[4], *x[5], *x[6]] for x in _LOCATIONS], dtype=float)[loc]
    u = rng.random((n, 3))
    return {
        "location": np.array([x[0] for x in _LOCATIONS], dtype=object)[loc],
        "simple": np.array([x[2] for x in _LOCATIONS], dtype=object)[loc],
        "general": np.array([x[3] for x in _LOCATIONS], dtype=object)[loc],
        "x": boxes[:, 0] + u[:, 0] * (boxes[:, 1] - boxes[:, 0]),
        "y": (boxes[:, 2] + u[:, 1] * (boxes[:, 3] - boxes[:, 2])) * height,
        "z": boxes[:, 4] + u[:, 2] * (boxes[:, 5] - boxes[:, 4]),
    }


def _malignant(
    rng: np.random.Generator, risk: np.ndarray, general: np.ndarray, prevalence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target, dx, mimic): exactly round(prevalence * n) malignant rows (at least one, and one
    benign where n > 1), likelier for riskier patients and on the head/neck; each row's index
    into `_MALIGNANT_DX` (its subtype, used where malignant); the benign atypical mimics."""
    n = len(risk)
    k = round(prevalence * n)
    k = min(max(k, 1), n - 1) if n > 1 else k
    target = _choose_top(rng, risk + 1.0 * (general == "head/neck"), k)
    dx_share = np.array([d[1] for d in _MALIGNANT_DX])
    dx = rng.choice(len(_MALIGNANT_DX), n, p=dx_share / dx_share.sum())
    benign = np.flatnonzero(~target)
    mimic = np.zeros(n, dtype=bool)
    mimic[benign[rng.random(len(benign)) < _MIMIC_SHARE]] = True
    return target, dx, mimic


def _traits(
    rng: np.random.Generator,
    phenotype: np.ndarray,
    target: np.ndarray,
    dx: np.ndarray,
    mimic: np.ndarray,
) -> dict[str, np.ndarray]:
    """Trait name -> (rows,): the patient's phenotype + lesion noise + the malignant subtype's
    (or mimic's) shift at a random severity."""
    n = len(phenotype)
    subtype = np.array([d[0] for d in _MALIGNANT_DX], dtype=object)[dx]
    chol = _trait_cholesky()
    traits = phenotype + _SIGMA_LESION * rng.standard_normal((n, len(_TRAITS))) @ chol.T
    severity = rng.uniform(*_SEVERITY, n)
    shift = np.zeros((n, len(_TRAITS)))
    for name, vector in _SHIFTS.items():
        rows = mimic if name == "mimic" else target & (subtype == name)
        shift[rows] = np.asarray(vector) * severity[rows, None]
    traits = traits + shift
    return dict(zip(_TRAITS, traits.T, strict=True))


def _diagnosis(
    rng: np.random.Generator,
    target: np.ndarray,
    dx: np.ndarray,
    mimic: np.ndarray,
    lesion_ids: np.ndarray,
) -> dict[str, np.ndarray]:
    """The train-only columns, consistent with `target`: lesion_id, iddx_full, iddx_1..iddx_5,
    mel_mitotic_index, mel_thick_mm and tbp_lv_dnn_lesion_confidence."""
    n = len(target)
    has_lesion_id = target | (rng.random(n) < np.where(mimic, 0.5, 0.04))
    lesion_id = np.where(has_lesion_id, lesion_ids, _NONE).astype(object)
    iddx_full = np.full(n, "Benign", dtype=object)
    iddx_full[target] = np.array([d[2] for d in _MALIGNANT_DX], dtype=object)[dx[target]]
    detailed = has_lesion_id & ~target & (rng.random(n) < np.where(mimic, 0.8, 0.2))
    benign_dx = np.array(_BENIGN_DX, dtype=object)
    mimic_dx = rng.choice(np.array([1, 2, 3]), n)  # dysplastic nevus, keratosis, lentigo
    iddx_full[detailed] = benign_dx[
        np.where(mimic, mimic_dx, rng.choice(len(_BENIGN_DX), n))[detailed]
    ]
    levels = pd.Series(iddx_full).str.split("::", n=4, expand=True)
    levels = levels.reindex(columns=range(5))
    invasive_mel = target & pd.Series(iddx_full).str.contains("Melanoma Invasive").to_numpy()
    thick = np.round(np.clip(rng.lognormal(np.log(0.55), 0.6, n), 0.1, 6.0), 2)
    mel_thick = np.where(invasive_mel, thick, np.nan)
    mitotic_idx = np.minimum(rng.geometric(0.55, n) - 1, len(_MITOTIC) - 1)
    mitotic = np.array(_MITOTIC, dtype=object)[mitotic_idx]
    mel_mitotic = np.where(invasive_mel & (rng.random(n) < 0.85), mitotic, _NONE).astype(object)
    dnn_logit = rng.normal(8.5, 3.5, n) - 2.0 * target
    dnn = 100.0 / (1.0 + np.exp(-dnn_logit))
    return {
        "lesion_id": lesion_id,
        "iddx_full": iddx_full,
        **{f"iddx_{i + 1}": _nullable(levels[i].to_numpy(dtype=object)) for i in range(5)},
        "mel_mitotic_index": mel_mitotic,
        "mel_thick_mm": mel_thick,
        "tbp_lv_dnn_lesion_confidence": dnn,
    }


def _nullable(values: np.ndarray) -> np.ndarray:
    """An object array with None where `values` is missing (as the real CSV's empty cells)."""
    return np.where(pd.isna(values), _NONE, values).astype(object)


_MEASURED = (
    "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B", "tbp_lv_Bext", "tbp_lv_C", "tbp_lv_Cext", "tbp_lv_H",
    "tbp_lv_Hext", "tbp_lv_L", "tbp_lv_Lext", "tbp_lv_areaMM2", "tbp_lv_area_perim_ratio",
    "tbp_lv_color_std_mean", "tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLB",
    "tbp_lv_deltaLBnorm", "tbp_lv_eccentricity", "tbp_lv_minorAxisMM", "tbp_lv_nevi_confidence",
    "tbp_lv_norm_border", "tbp_lv_norm_color", "tbp_lv_perimeterMM", "tbp_lv_radial_color_std_max",
    "tbp_lv_stdL", "tbp_lv_stdLExt", "tbp_lv_symm_2axis", "tbp_lv_symm_2axis_angle",
)  # fmt: skip


# Written with 6 decimals; nevi_confidence keeps full precision (it has values like 1e-12).
_ROUNDED = tuple(
    c for c in _MEASURED if c not in ("tbp_lv_nevi_confidence", "tbp_lv_symm_2axis_angle")
) + ("tbp_lv_dnn_lesion_confidence",)


def ellipse_perimeter(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ramanujan's approximation for semi-axes a, b."""
    return np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))


def _measurements(rng, t, skin_l, skin_a, skin_b, texture, target) -> dict[str, np.ndarray]:
    """The tbp_lv_* columns (and the diameter) from per-row traits and skin, keeping the real
    set's identities between columns."""
    n = len(skin_l)

    def noise(scale):
        return rng.normal(0.0, scale, n)

    diam = np.round(np.clip(np.exp(np.log(3.3) + 0.36 * t["size"] + noise(0.05)), 1.0, 40.0), 2)
    ecc = np.clip(0.72 + 0.1 * (0.6 * t["asym"] + 0.8 * rng.standard_normal(n)), 0.25, 0.985)
    minor = diam * np.sqrt(1.0 - ecc**2) * np.exp(noise(0.04))
    roughness = 0.16 * np.exp(0.4 * t["border"] + noise(0.1))  # perimeter beyond the ellipse's
    area = np.pi / 4.0 * diam * minor * np.exp(noise(0.04)) / (1.0 + 0.3 * roughness)
    perimeter = ellipse_perimeter(diam / 2.0, minor / 2.0) * (1.0 + roughness)
    norm_border = np.clip(3.1 + 1.5 * (0.75 * t["border"] + 0.35 * t["asym"]) + noise(0.5), 0, 10)
    color_std = np.clip(np.exp(0.55 * t["varieg"] + noise(0.2)) - 0.15, 0.0, None)
    norm_color = np.clip(3.0 + 2.1 * t["varieg"] + noise(0.8), 0.0, 10.0)
    radial = np.clip(0.95 * np.exp(0.5 * t["varieg"] + noise(0.25)) - 0.1, 0.0, None)
    std_l = np.exp(np.log(2.5) + 0.4 * t["varieg"] + 0.15 * t["size"] + noise(0.2))
    std_l_ext = np.exp(np.log(2.2) + texture + noise(0.15))
    symm = np.clip(0.28 + 0.085 * t["asym"] + noise(0.03), 0.03, 0.9)
    angle = rng.integers(0, 36, n) * 5

    l_ext = np.clip(skin_l + noise(4.0), 15.0, 90.0)
    a_ext = skin_a + noise(2.2)
    b_ext = skin_b + noise(2.0)
    lum = np.clip(l_ext - np.exp(np.log(8.7) + 0.38 * t["dark"] + noise(0.1)), 3.0, 95.0)
    a = a_ext + 5.2 + 2.9 * t["red"] + noise(0.8)
    b = b_ext + 0.9 + 2.7 * t["yellow"] + noise(0.8)
    delta_l, delta_a, delta_b = lum - l_ext, a - a_ext, b - b_ext
    delta_lb = np.hypot(delta_l, delta_b) * (1.0 + np.abs(noise(0.02)))
    delta_lb_norm = delta_lb * np.clip(0.81 + noise(0.12), 0.5, 1.3)
    nevi = 100.0 / (1.0 + np.exp(-(-3.5 + 5.5 * t["nevus"] + noise(0.5))))
    return {
        "diam": diam,
        "tbp_lv_A": a,
        "tbp_lv_Aext": a_ext,
        "tbp_lv_B": b,
        "tbp_lv_Bext": b_ext,
        "tbp_lv_C": np.hypot(a, b),
        "tbp_lv_Cext": np.hypot(a_ext, b_ext),
        "tbp_lv_H": np.degrees(np.arctan2(b, a)),
        "tbp_lv_Hext": np.degrees(np.arctan2(b_ext, a_ext)),
        "tbp_lv_L": lum,
        "tbp_lv_Lext": l_ext,
        "tbp_lv_areaMM2": area,
        "tbp_lv_area_perim_ratio": perimeter**2 / area,
        "tbp_lv_color_std_mean": color_std,
        "tbp_lv_deltaA": delta_a,
        "tbp_lv_deltaB": delta_b,
        "tbp_lv_deltaL": delta_l,
        "tbp_lv_deltaLB": delta_lb,
        "tbp_lv_deltaLBnorm": delta_lb_norm,
        "tbp_lv_eccentricity": ecc,
        "tbp_lv_minorAxisMM": minor,
        "tbp_lv_nevi_confidence": nevi,
        "tbp_lv_norm_border": norm_border,
        "tbp_lv_norm_color": norm_color,
        "tbp_lv_perimeterMM": perimeter,
        "tbp_lv_radial_color_std_max": radial,
        "tbp_lv_stdL": std_l,
        "tbp_lv_stdLExt": std_l_ext,
        "tbp_lv_symm_2axis": symm,
        "tbp_lv_symm_2axis_angle": angle.astype(np.int64),
    }
