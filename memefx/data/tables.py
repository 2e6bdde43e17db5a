"""The optional side tables keyed by meme id: confounder groups and BLIP-2 image descriptions."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from memefx.data.hmc import HMCFormatError, _listing, normalize_id

CONFOUNDER_COLUMNS = ("id", "split", "label", "img_org_id", "txt_org_id")
CAPTION_COLUMNS = ("image_id", "text", "text_detailed", "text_captioned", "text_detailed_captioned")
NO_GROUP = ("No Confounder", "Not hit")


def _read_table(path: str | Path, columns: tuple[str, ...]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise HMCFormatError(f"{path}: side table not found")
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str)
    except Exception as err:
        raise HMCFormatError(f"{path}: cannot be read as a table ({type(err).__name__}: {err})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise HMCFormatError(f"{path}: missing columns {missing} (has {list(frame.columns)})")
    return frame


def _dedupe(frame: pd.DataFrame, key: list[str], path: Path) -> pd.DataFrame:
    """Drop exact duplicate rows with a warning; duplicate keys with different values are an error."""
    exact = frame.duplicated()
    if exact.any():
        warnings.warn(
            f"{path}: removed {int(exact.sum())} exact duplicate rows "
            f"({frame[exact][key].drop_duplicates().shape[0]} keys listed twice); each is counted once",
            stacklevel=3,
        )
        frame = frame[~exact].reset_index(drop=True)
    clash = frame[frame.duplicated(key, keep=False)]
    if len(clash):
        keys = clash[key].astype(str).agg("/".join, axis=1).drop_duplicates().tolist()
        raise HMCFormatError(f"{path}: {len(keys)} keys {key} with conflicting rows: {_listing(keys)}")
    return frame


def read_confounders(path: str | Path) -> pd.DataFrame:
    """Read ``confounders.parquet``: ids normalized, exact duplicates removed (with a warning).

    Group columns keep the anchor id as a 5-digit string, or ``None`` for "No Confounder"/"Not hit".
    """
    path = Path(path)
    frame = _read_table(path, CONFOUNDER_COLUMNS)[list(CONFOUNDER_COLUMNS)].copy()
    frame["id"] = [normalize_id(v, f"{path} row {i}") for i, v in enumerate(frame["id"].tolist())]
    for col in ("img_org_id", "txt_org_id"):
        frame[col] = [
            None if v is None or (isinstance(v, float) and v != v) or str(v) in NO_GROUP
            else normalize_id(v, f"{path} row {i} column {col}")
            for i, v in enumerate(frame[col].tolist())
        ]
    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = frame[~labels.isin([0, 1, -1])]
    if len(bad):
        raise HMCFormatError(f"{path}: {len(bad)} rows with label outside {{0, 1, -1}}: ids {_listing(bad.id.tolist())}")
    frame["label"] = labels.astype(int)
    frame["split"] = frame["split"].astype(str)
    return _dedupe(frame, ["split", "id"], path)


def read_captions(path: str | Path, columns: tuple[str, ...] | list[str] | None = None) -> pd.DataFrame:
    """Read ``hm_captions.parquet`` with ``image_id`` normalized; exact duplicates removed.

    ``columns``: the description columns a caller uses (a user's own table may hold only those); by
    default all four BLIP-2 variants are required. A missing one is an error naming it.
    """
    path = Path(path)
    wanted = CAPTION_COLUMNS if columns is None else ("image_id", *dict.fromkeys(c for c in columns if c != "image_id"))
    frame = _read_table(path, wanted)[list(wanted)].copy()
    frame["image_id"] = [normalize_id(v, f"{path} row {i}") for i, v in enumerate(frame["image_id"].tolist())]
    return _dedupe(frame, ["image_id"], path)


DESCRIPTION_COLUMNS = CAPTION_COLUMNS[1:]  # every BLIP-2 variant describes the image, ``text`` included


def check_meme_text_column(column: str | None, captions: str | Path | None, flag: str = "data.text_column",
                           folder: str = "data.root=HMC_DIR") -> None:
    """Refuse to take the meme's overlaid text from a caption table unless a column that holds it is named.

    The ``text`` column of ``hm_captions.parquet`` is a BLIP-2 description of the image, not the meme text
    (the two are equal for about 1 meme in 5): reading it as the meme text silently pairs a description
    with a description. ``flag``/``folder`` name the options of the caller (the datamodule, ``icl prompts``)."""
    how = (f"give {folder} (the HMC jsonl files hold each meme's text) or {flag}=COLUMN naming a column of "
           f"{captions or 'the caption table'} that holds the meme's overlaid text")
    if column is None:
        raise ValueError(f"no meme text: without an HMC folder the meme text must come from a table column; {how}")
    if column in DESCRIPTION_COLUMNS:
        raise ValueError(f"{flag}={column!r} is a BLIP-2 description of the image in the caption-table layout "
                         f"({', '.join(DESCRIPTION_COLUMNS)}), not the meme's overlaid text; {how}")


def check_confounders_cover(confounders: pd.DataFrame, memes: pd.DataFrame, path: str | Path) -> None:
    """Fail when the table lists, for a split that was loaded, ids that the data does not have."""
    loaded = confounders[confounders.split.isin(memes.split.unique())]
    known = set(zip(memes.split, memes.id))
    unknown = [f"{s}/{i}" for s, i in zip(loaded.split, loaded.id) if (s, i) not in known]
    if unknown:
        raise HMCFormatError(
            f"{path}: {len(unknown)} ids not present in the loaded data (split/id: {_listing(unknown)}); "
            "the confounder table belongs to another dataset or a jsonl file is incomplete"
        )
    merged = memes.merge(loaded, on=["split", "id"], suffixes=("", "_table"))
    clash = merged[(merged.label != merged.label_table)]
    if len(clash):
        shown = [f"{s}/{i}: data {a}, table {b}" for s, i, a, b in
                 zip(clash.split, clash.id, clash.label, clash.label_table)]
        raise HMCFormatError(f"{path}: {len(clash)} labels disagree with the jsonl files ({_listing(shown)})")


def descriptions_for(captions: pd.DataFrame, ids: list[str], column: str, path: str | Path) -> list[str]:
    """The description of each id from one caption column; missing ids are an error listing them."""
    if column not in captions.columns:
        raise HMCFormatError(f"{path}: no caption column {column!r} (has {list(captions.columns)})")
    lookup = dict(zip(captions.image_id, captions[column]))
    missing = [i for i in ids if i not in lookup or not isinstance(lookup[i], str)]
    if missing:
        raise HMCFormatError(f"{path}: {len(missing)} memes have no {column!r} description: ids {_listing(missing)}")
    blank = [i for i in ids if not lookup[i].strip()]  # an empty image side would train on the text alone
    if blank:
        raise HMCFormatError(f"{path}: {len(blank)} memes have an empty or whitespace-only {column!r} description: "
                             f"ids {_listing(blank)}; describe them again (memefx icl describe) or drop them")
    return [lookup[i] for i in ids]
