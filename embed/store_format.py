"""The feature store's format: its file names, its manifest schema and its folder names.

The one place that spells how a store is laid out on disk. `embed.store` reads stores and
`embed.store_writer` writes them through these names; callers outside `embed` find a store
(`store_name`, `store_candidates`, `store_folders`) and read the identity it records
(`recorded_identity`) here, and never build a store's name or read its manifests themselves.

Files of a store folder::

    manifest.json                       combined manifest (written by a single writer or by merge)
    manifest.part-<i>-of-<n>.json       partial manifest of writer i of n (sharded build)
    shard-00000.npy                     float16, shape (rows, views, dim)
    shard-00000.ids.json                the ids of those rows, same order
    shard-00000.fingerprints.json       the fingerprint of each row's image when it was embedded
                                        (same order; null = unknown); absent in older stores
    shard-<i>-of-<n>-00000.npy / .ids.json / .fingerprints.json    shards of writer i of n
    .lock-*  .tmp-*                     lock files and files being written (never read)

A store has at least one manifest; a sharded build still in progress may have only part
manifests. Every reader merges all of them (`read_manifests`): the first one found
(`manifest.json`, then the parts by count and index) gives the identity, shards are listed
once each, failures are united.

Folder name (`store_name`): ``<dataset>-<weights sha256[:12]>-<size>px-<views>v``, then
``-z<percent>`` for a centre zoom view (``-z75``: `embed.zoom`), then ``-l<digits>-<pooling>``
unless the pooled features are the classic layer4 average (e.g. ``-l3-gem`` for the default
layer3 GeM), then ``-<variant>`` for a variant that computes another function (``-int8``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from embed.errors import EmbedError
from embed.identity import IDENTITY_FIELDS, UNFAITHFUL_VARIANTS, check_identity, identity_of
from embed.zoom import zoom_name

__all__ = [
    "FINGERPRINTS_SUFFIX",
    "FORMAT",
    "IDS_SUFFIX",
    "MANIFEST",
    "MANIFEST_FIELDS",
    "PART_MANIFEST_RE",
    "VECTORS_SUFFIX",
    "is_store",
    "part_label",
    "part_manifest_name",
    "quote_first",
    "read_manifests",
    "read_store_json",
    "recorded_identity",
    "shard_fingerprints",
    "shard_ids",
    "shard_prefix",
    "store_candidates",
    "store_folders",
    "store_name",
]

FORMAT = "lesionfuse-feature-store/1"
MANIFEST = "manifest.json"
PART_MANIFEST_RE = re.compile(r"^manifest\.part-(\d+)-of-(\d+)\.json$")
VECTORS_SUFFIX = ".npy"
IDS_SUFFIX = ".ids.json"
FINGERPRINTS_SUFFIX = ".fingerprints.json"

# The keys of a manifest. The identity (`embed.identity.IDENTITY_FIELDS`) says what the vectors
# are; the rest says what the store holds and where it came from.
MANIFEST_FIELDS: dict[str, str] = {
    "format": f"always {FORMAT!r}",
    **{field: "identity field (`embed.identity`)" for field in IDENTITY_FIELDS},
    "store_uid": "given once when the store is created (absent in stores made before)",
    "shards": "[{name, rows, sha256, ids_sha256, fingerprints_sha256 (absent in older stores)}], "
    "oldest first",
    "count": "ids with a vector in the shards this manifest lists",
    "failures": "{id: reason} for ids that could not be embedded",
    "dataset": "the data set's name",
    "source": "the image source the vectors were made from",
    "part": "'<i>-of-<n>' in a part manifest of a sharded build",
    "created": "ISO time the store (or part) was created",
    "updated": "ISO time of the latest write",
    "lesionfuse_version": "the version that wrote it",
}


# ----------------------------------------------------------------------------- names


def store_name(
    dataset: str,
    weights_sha256: str,
    image_size: int,
    views: int,
    blocks=("layer4",),
    pooling: str = "avg",
    variant: str = "auto",
    zoom: float | None = None,
) -> str:
    """Directory name of a store: f"{dataset}-{sha[:12]}-{size}px-{views}v", followed by the
    centre zoom view when there is one ("-z75" for `zoom` 0.75; `views` counts the geometric
    views only), by the pooled features when they are not the classic layer4 average, e.g.
    "-l34-gem" for layer3 and layer4 pooled by GeM (so stores made before blocks were a setting
    keep their names), and by the variant when it is one that computes another function ("-int8",
    `UNFAITHFUL_VARIANTS`).

    The faithful variants (auto, eager, folded, jit-frozen, compiled) share one name: they compute
    the same function (centred cosine to fp32 eager >= 0.998 per image, as close as eager bf16
    is to eager fp32), "auto" resolves to eager or folded by the CPU, and their stores had that
    name before the variant was a setting. Such a store keeps the variant it was built with
    (`invoke embed` with auto appends with it; an explicit other one is refused, saying so).
    """
    name = f"{dataset}-{weights_sha256[:12]}-{int(image_size)}px-{int(views)}v{zoom_name(zoom)}"
    if not (list(blocks) == ["layer4"] and pooling == "avg"):
        digits = "".join(block.removeprefix("layer") for block in blocks)
        name = f"{name}-l{digits}-{pooling}"
    return f"{name}-{variant}" if variant in UNFAITHFUL_VARIANTS else name


def _name_pattern(dataset: str, weights_sha256: str | None) -> re.Pattern:
    """The folder names `store_name` gives a data set's stores (of those weights, when given)."""
    sha = re.escape(weights_sha256[:12]) if weights_sha256 else "[0-9a-f]{1,12}"
    variants = "|".join(re.escape(v) for v in UNFAITHFUL_VARIANTS)
    return re.compile(
        rf"^{re.escape(dataset)}-{sha}-\d+px-\d+v(?:-z\d+)?(?:-l\d+-[a-z0-9]+)?"
        rf"(?:-(?:{variants}))?$"
    )


def store_folders(root: Path | str, dataset: str, weights_sha256: str | None = None) -> list[Path]:
    """The folders under `root` named as `store_name` names the stores of data set `dataset`
    (with weights `weights_sha256`, when given; any weights otherwise), sorted by name, whether
    or not they hold a store yet. Any image size, views, pooled blocks and variant.

    A folder of another data set whose name merely starts with this one's (``ham-big-...`` for
    ``ham``) is not one of them. Returns [] when `root` does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    pattern = _name_pattern(dataset, weights_sha256)
    return sorted(p for p in root.iterdir() if pattern.match(p.name) and p.is_dir())


def store_candidates(
    root: Path | str, dataset: str, weights_sha256: str | None = None
) -> list[Path]:
    """The stores of data set `dataset` under `root`, sorted by name: the `store_folders` that
    hold at least one manifest (`manifest.json`, or only the part manifests of a sharded build
    still in progress). Returns [] when `root` does not exist."""
    return [p for p in store_folders(root, dataset, weights_sha256) if is_store(p)]


def part_label(index: int, count: int) -> str:
    """'<index>-of-<count>': how part `index` of a sharded build is named in its files."""
    return f"{index}-of-{count}"


def part_manifest_name(index: int, count: int) -> str:
    """The manifest file of part `index` of `count` writers."""
    return f"manifest.part-{part_label(index, count)}.json"


def shard_prefix(index: int, count: int) -> str:
    """What the shard files of part `index` of `count` writers start with ("shard-" alone)."""
    return "shard-" if count == 1 else f"shard-{part_label(index, count)}-"


def quote_first(items: Iterable, n: int = 5) -> str:
    """The first `n` items, repr'd and comma-separated, with ", ..." when there are more: how
    the store's messages name ids and files."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (", ..." if len(items) > n else "")


# ----------------------------------------------------------------------------- manifests


def is_store(path: Path | str) -> bool:
    """Whether `path` holds a store: at least one manifest (combined or part)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return True
    return path.is_dir() and any(PART_MANIFEST_RE.match(e) for e in os.listdir(path))


def read_store_json(path: Path):
    """A store's JSON file; raises EmbedError naming the file when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EmbedError(f"feature store file {str(path)!r} cannot be read: {exc}") from exc


def read_manifests(path: Path | str) -> tuple[dict, list[tuple[str, dict]]]:
    """All manifests of the store at `path`: (combined view, [(file name, manifest)]).

    The combined view holds the first manifest's fields with every manifest's shards (once
    each, in order), failures united, the earliest "created" and the first "store_uid".

    Raises:
        EmbedError: there is no manifest at `path`, one cannot be read, or one is not a
            lesionfuse store manifest.
        StoreMismatchError: two manifests disagree on identity (names the file and field).
    """
    path = Path(path)
    manifests: list[tuple[str, dict]] = []
    main = path / MANIFEST
    if main.is_file():
        manifests.append((MANIFEST, read_store_json(main)))
    parts = []
    if path.is_dir():
        for entry in os.listdir(path):
            match = PART_MANIFEST_RE.match(entry)
            if match:
                parts.append((int(match.group(2)), int(match.group(1)), entry))
    for _, _, entry in sorted(parts):
        manifests.append((entry, read_store_json(path / entry)))
    if not manifests:
        raise EmbedError(
            f"no feature store at {str(path)!r} (no {MANIFEST}); build it with "
            "`invoke embed --spec SPEC`"
        )
    first_name, first = manifests[0]
    for name, m in manifests:
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            found = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise EmbedError(
                f"{str(path / name)!r} is not a lesionfuse feature store manifest "
                f"(format {found!r}, expected {FORMAT!r})"
            )
        check_identity(
            m,
            {k: first[k] for k in IDENTITY_FIELDS if k in first},
            f"{str(path / name)!r}",
            f"{first_name} of the same store has",
        )
    combined = {k: v for k, v in first.items() if k not in ("shards", "failures", "count")}
    seen: set[str] = set()
    shards: list[dict] = []
    failures: dict[str, str] = {}
    for _, m in manifests:
        for shard in m.get("shards", []):
            if shard["name"] not in seen:
                seen.add(shard["name"])
                shards.append(shard)
        failures.update(m.get("failures", {}))
    combined["shards"] = shards
    combined["failures"] = failures
    combined["created"] = min(m.get("created", "") for _, m in manifests) or None
    combined["store_uid"] = next((m["store_uid"] for _, m in manifests if m.get("store_uid")), None)
    return combined, manifests


def recorded_identity(path: Path | str) -> dict:
    """The embedding identity the store at `path` records (`embed.identity.IDENTITY_FIELDS`,
    with the values older stores imply for fields they lack), read from all its manifests as
    every reader merges them: a sharded build with only part manifests so far has one too.

    No vectors or id lists are read. Raises as `read_manifests` does (EmbedError when there is
    no store at `path`).
    """
    combined, _ = read_manifests(path)
    return identity_of(combined)


# ----------------------------------------------------------------------------- shard sidecars


def _per_row(path: Path, shard: dict, suffix: str, what: str) -> list:
    """The JSON list `<shard name><suffix>` beside a listed shard, one `what` per row.

    Raises EmbedError naming the file, what it holds and the manifest's row count otherwise."""
    sidecar = Path(path) / f"{shard['name']}{suffix}"
    values = read_store_json(sidecar)
    if not isinstance(values, list) or len(values) != int(shard["rows"]):
        held = f"{len(values)} {what}s" if isinstance(values, list) else "no list"
        raise EmbedError(
            f"feature store {str(path)!r}: {sidecar.name} does not hold one {what} per row "
            f"of the {shard['rows']} the manifest lists ({held}); the store is damaged, "
            "build it again"
        )
    return values


def shard_ids(path: Path, shard: dict) -> list[str]:
    """The ids of a listed shard; raises EmbedError when they do not match its row count."""
    return _per_row(path, shard, IDS_SUFFIX, "id")


def shard_fingerprints(path: Path, shard: dict) -> list[str | None]:
    """The image fingerprints of a listed shard's rows; None where unknown (older stores).

    Raises EmbedError when the file does not hold one fingerprint per row."""
    if "fingerprints_sha256" not in shard:
        return [None] * int(shard["rows"])
    return _per_row(path, shard, FINGERPRINTS_SUFFIX, "fingerprint")
