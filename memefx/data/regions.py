"""Precomputed region features (the format HMC winners used): Vilio's TSV file (``region_tsv``, regions found
by the meme's picture) or a folder of one ``<id>.npz`` per meme with ``features`` (N x D float) and ``boxes``
(N x 4: x1, y1, x2, y2, normalized to [0, 1], or in pixels with ``image_w``/``image_h`` beside them). Checked at
setup (npy headers, TSV line headers), so a wrong shape or a missing picture stops the run with the file
named, before any worker starts.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from memefx.data.hmc import HMCFormatError, _listing


def _header(archive: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def check_regions(folder: str | Path, ids: list[str]) -> int:
    """Validate every id's file; return the feature size D (the same for all files)."""
    folder = Path(folder)
    missing = [i for i in ids if not (folder / f"{i}.npz").is_file()]
    if missing:
        raise HMCFormatError(f"{folder}: {len(missing)} memes have no region file <id>.npz (ids {_listing(missing)})")
    dims = {}
    for i in ids:
        path = folder / f"{i}.npz"
        try:
            with zipfile.ZipFile(path) as archive:
                names = {n.removesuffix(".npy") for n in archive.namelist()}
                if not {"features", "boxes"} <= names:
                    raise HMCFormatError(f"{path}: needs arrays 'features' and 'boxes' (has {sorted(names)})")
                (fshape, _), (bshape, _) = _header(archive, "features"), _header(archive, "boxes")
        except (zipfile.BadZipFile, ValueError, OSError) as err:
            raise HMCFormatError(f"{path}: not a readable .npz ({err})") from None
        if len(fshape) != 2 or fshape[0] == 0 or bshape != (fshape[0], 4):
            raise HMCFormatError(f"{path}: features {fshape} and boxes {bshape}: expected (N, D) and (N, 4), N > 0")
        dims.setdefault(fshape[1], i)
    if len(dims) > 1:
        raise HMCFormatError(f"{folder}: feature sizes differ between files: {dims} (size: first id)")
    return next(iter(dims))


def load_regions(folder: str | Path, meme_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features N x D, boxes N x 4 normalized) of one image."""
    with np.load(Path(folder) / f"{meme_id}.npz") as data:
        feats = torch.from_numpy(data["features"].astype(np.float32))
        boxes = data["boxes"].astype(np.float32)
        if "image_w" in data and "image_h" in data:
            boxes = boxes / np.array([data["image_w"], data["image_h"]] * 2, dtype=np.float32)
    return feats, torch.from_numpy(boxes).clamp(0, 1)


class RegionFolder:
    """Regions of a folder of ``<id>.npz`` files, looked up by meme id (see ``RegionTSV`` for Vilio's TSV).

    ``count``: use the first ``count`` regions of each meme; a meme with fewer is an error. ``None``: all."""

    def __init__(self, folder: str | Path, count: int | None = None):
        self.path, self.count = Path(folder), count

    def check(self, frame) -> int:
        """Every meme has a readable file with enough regions; returns the feature size D."""
        dim = check_regions(self.path, frame.id.tolist())
        if self.count is not None:
            short = []
            for meme_id in frame.id:
                with zipfile.ZipFile(self.path / f"{meme_id}.npz") as archive:
                    if _header(archive, "features")[0][0] < self.count:
                        short.append(meme_id)
            if short:
                raise HMCFormatError(f"{self.path}: {len(short)} memes hold fewer than data.region_count={self.count} "
                                     f"regions (ids {_listing(short)})")
        return dim

    def load(self, meme_id: str, img: str) -> tuple[torch.Tensor, torch.Tensor]:
        feats, boxes = load_regions(self.path, meme_id)
        return (feats, boxes) if self.count is None else (feats[: self.count], boxes[: self.count])


def open_regions(path: str | Path, count: int | None = None):
    """``RegionTSV`` for a file (Vilio's TSV layout), ``RegionFolder`` for a folder of ``<id>.npz``."""
    path = Path(path)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"data.region_count={count!r}: expected a positive number of regions per picture, or null")
    if path.is_dir():
        return RegionFolder(path, count)
    if path.is_file():
        from memefx.data.region_tsv import RegionTSV

        return RegionTSV(path, count)
    raise HMCFormatError(f"data.region_features={str(path)!r}: no such file or folder (Vilio's region TSV, or a "
                         "folder of <id>.npz)")


def pad_regions(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack variable-length regions with zero padding and a 0/1 mask."""
    n = max(f.shape[0] for f, _ in items)
    d = items[0][0].shape[1]
    feats = torch.zeros(len(items), n, d)
    boxes = torch.zeros(len(items), n, 4)
    mask = torch.zeros(len(items), n, dtype=torch.long)
    for k, (f, b) in enumerate(items):
        feats[k, : len(f)], boxes[k, : len(b)], mask[k, : len(f)] = f, b, 1
    return {"region_features": feats, "region_boxes": boxes, "region_mask": mask}


TSV_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
              "boxes", "features")


def convert_tsv(tsv: str | Path, out: str | Path) -> int:
    """Convert the bottom-up-attention TSV used by HMC solutions (LXMERT/UNITER layout: base64 float32
    ``boxes`` N x 4 in pixels and ``features`` N x D, with ``img_h``/``img_w``) into ``<id>.npz`` files.

    Returns the number of images written; a malformed line stops with its line number and field.
    """
    import base64
    import csv
    import sys

    from memefx.data.hmc import normalize_id

    tsv, out = Path(tsv), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv.field_size_limit(sys.maxsize)
    count = 0
    with open(tsv, newline="") as f:
        for line_no, row in enumerate(csv.DictReader(f, fieldnames=TSV_FIELDS, delimiter="\t"), start=1):
            where = f"{tsv}:{line_no}"
            try:
                n = int(row["num_boxes"])
                boxes = np.frombuffer(base64.b64decode(row["boxes"]), dtype=np.float32).reshape(n, 4)
                feats = np.frombuffer(base64.b64decode(row["features"]), dtype=np.float32).reshape(n, -1)
                objects = np.frombuffer(base64.b64decode(row["objects_id"]), dtype=np.int64).reshape(n)
                height, width = float(row["img_h"]), float(row["img_w"])
            except (TypeError, ValueError, KeyError) as err:
                raise HMCFormatError(f"{where}: malformed region row ({type(err).__name__}: {err})") from None
            meme_id = normalize_id(row["img_id"].split("/")[-1].split(".")[0], where)
            np.savez(out / f"{meme_id}.npz", features=feats, boxes=boxes, image_w=width, image_h=height,
                     objects_id=objects)
            count += 1
    return count
