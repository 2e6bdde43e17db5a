"""Vilio's region-feature TSV, read in place: indexed once by byte offset, one picture decoded at a time.

The layout (bottom-up-attention / LXMERT / Vilio): one tab-separated line per picture, ``img_id, img_h, img_w,
objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features``, the last six base64 of int64 or
float32 arrays; ``boxes`` are pixel ``(x1, y1, x2, y2)``. Real files hold ~12,000 pictures x 36-100 regions x
2048 floats (several GB), so they are never loaded whole: the index (byte offset, length and header of each
line, every line checked from its base64 lengths alone) is built once and cached beside the synthetic data in
``$MEMEFX_CACHE/region_index/``, keyed by the file's path, size and modification time.

Regions are found by the meme's picture (its ``img`` field), as Vilio finds them: two memes on one picture
share them. Boxes are normalized as Vilio's TSV loader does (x / img_w, y / img_h in float32).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memefx.data.cache import default_cache_dir
from memefx.data.hmc import HMCFormatError, _listing

FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes",
          "features")
INDEX_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """Where one picture's line sits in the file, and its header."""

    line: int
    offset: int
    length: int
    height: int
    width: int
    num_boxes: int
    dim: int


def picture_key(value: object) -> str:
    """The key a picture is found by: the file stem of an ``img`` field or a TSV ``img_id``, digits read as a
    number (Vilio's ``int(img_id)``: ``img/00101.png``, ``101`` and ``00101`` are one picture)."""
    stem = Path(str(value).strip()).stem
    return str(int(stem)) if stem.isdigit() else stem


def _decoded_size(field: bytes, where: str, name: str) -> int:
    """Bytes a base64 field decodes to, from its length alone (no decoding of several MB per line)."""
    if len(field) % 4:
        raise HMCFormatError(f"{where}: field {name!r} is not base64 (length {len(field)} is not a multiple of 4)")
    return len(field) // 4 * 3 - len(field[-2:]) + len(field[-2:].rstrip(b"="))


def _parse_header(raw: bytes, where: str) -> tuple[str, Entry]:
    fields = raw.rstrip(b"\r\n").split(b"\t")
    if len(fields) != len(FIELDS):
        raise HMCFormatError(f"{where}: {len(fields)} tab-separated fields, expected {len(FIELDS)} "
                             f"({', '.join(FIELDS)})")
    key = picture_key(fields[0].decode("utf-8", "replace"))
    try:
        height, width, n = int(fields[1]), int(fields[2]), int(fields[7])
    except ValueError:
        raise HMCFormatError(f"{where}: picture {key}: img_h, img_w and num_boxes must be integers, got "
                             f"{fields[1][:20]!r}, {fields[2][:20]!r}, {fields[7][:20]!r}") from None
    if height <= 0 or width <= 0 or n <= 0:
        raise HMCFormatError(f"{where}: picture {key}: img_h={height}, img_w={width}, num_boxes={n} must be positive")
    box_bytes = _decoded_size(fields[8], where, "boxes")
    feat_bytes = _decoded_size(fields[9], where, "features")
    if box_bytes != n * 16 or feat_bytes % (n * 4):
        held = box_bytes / 16
        raise HMCFormatError(
            f"{where}: picture {key}: num_boxes={n} but the boxes field holds {held:g} boxes and the features field "
            f"{feat_bytes / 4:g} floats (not a multiple of {n}); the line is corrupt or num_boxes is wrong "
            "(Vilio's loader silently reads one box more in that case): fix or re-extract this picture")
    return key, Entry(0, 0, 0, height, width, n, feat_bytes // (n * 4))


def build_index(path: str | Path) -> dict[str, Entry]:
    """Scan the file once: picture key -> line entry. A malformed line or a picture listed twice is an error
    naming the line(s)."""
    path = Path(path)
    entries: dict[str, Entry] = {}
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                where = f"{path}:{line_no}"
                key, head = _parse_header(raw, where)
                if key in entries:
                    raise HMCFormatError(f"{where}: picture {key} is listed twice (lines {entries[key].line} and "
                                         f"{line_no}); keep one line per picture")
                entries[key] = Entry(line_no, offset, len(raw), *astuple(head)[3:])
            offset += len(raw)
    if not entries:
        raise HMCFormatError(f"{path}: no region lines (an empty file?)")
    return entries


def _cache_file(path: Path) -> Path:
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:20]
    return default_cache_dir() / "region_index" / f"{digest}.json"


def cached_index(path: str | Path) -> dict[str, Entry]:
    """``build_index`` once per file version: reused while the file's size and modification time match."""
    path = Path(path)
    stat = path.stat()
    stamp = {"version": INDEX_VERSION, "path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = _cache_file(path)
    try:
        saved = json.loads(cache.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return {k: Entry(*v) for k, v in saved["entries"].items()}
    except (OSError, ValueError, TypeError, KeyError):
        pass  # no cache yet, or a torn one: rebuild
    entries = build_index(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({**stamp, "entries": {k: astuple(e) for k, e in entries.items()}}))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only cache only costs the scan next time
    return entries


class RegionTSV:
    """Regions of the pictures of a Vilio TSV, looked up by the meme's ``img`` field.

    Args:
        path: the TSV file.
        count: use the first ``count`` regions of each picture (Vilio's ``--num_features``); a picture with
            fewer is an error. ``None``: all of them.
    """

    def __init__(self, path: str | Path, count: int | None = None):
        self.path = Path(path)
        self.count = count
        self.index = cached_index(self.path)
        self._fd: int | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:  # DataLoader workers open the file themselves
        return {**self.__dict__, "_fd": None, "_pid": None}

    def check(self, frame: pd.DataFrame) -> int:
        """Every meme's picture is in the file with enough regions; returns the feature size D."""
        keys = [picture_key(img) for img in frame.img]
        missing = sorted({f"{i} ({img})" for i, img, k in zip(frame.id, frame.img, keys) if k not in self.index})
        if missing:
            raise HMCFormatError(f"{self.path}: {len(missing)} memes' pictures have no line in the region file "
                                 f"(meme id (img): {_listing(missing)}); extract their features or leave them out")
        if self.count is not None:
            short = sorted({f"{k} (line {self.index[k].line}: {self.index[k].num_boxes})" for k in keys
                            if self.index[k].num_boxes < self.count})
            if short:
                raise HMCFormatError(f"{self.path}: {len(short)} pictures hold fewer than data.region_count="
                                     f"{self.count} regions: {_listing(short)}")
        dims = {self.index[k].dim for k in keys}
        if len(dims) > 1:
            raise HMCFormatError(f"{self.path}: feature sizes differ between pictures: {sorted(dims)}")
        return dims.pop()

    def _read(self, entry: Entry) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, entry.length, entry.offset)

    def load(self, meme_id: str, img: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features N x D, boxes N x 4 normalized to the picture) of the meme's picture ``img`` (the
        regions are the picture's: ``meme_id`` is not used to find them)."""
        key = picture_key(img)
        entry = self.index[key]
        where = f"{self.path}:{entry.line}"
        fields = self._read(entry).rstrip(b"\r\n").split(b"\t")
        n = entry.num_boxes
        try:
            boxes = np.frombuffer(base64.b64decode(fields[8]), dtype=np.float32).reshape(n, 4)
            feats = np.frombuffer(base64.b64decode(fields[9]), dtype=np.float32).reshape(n, entry.dim)
        except (binascii.Error, ValueError, IndexError) as err:
            raise HMCFormatError(f"{where}: picture {key}: unreadable regions ({err}); the file changed after it "
                                 "was indexed, or the line is corrupt") from None
        keep = n if self.count is None else self.count
        boxes = boxes[:keep].copy()
        boxes[:, (0, 2)] /= entry.width  # float32, as Vilio's loader divides
        boxes[:, (1, 3)] /= entry.height
        if (boxes > 1 + 1e-5).any() or (boxes < -1e-5).any():
            raise HMCFormatError(f"{where}: picture {key}: boxes outside the {entry.width}x{entry.height} picture "
                                 f"(normalized range {boxes.min():.4g}..{boxes.max():.4g}); img_w/img_h or the boxes "
                                 "are wrong")
        return torch.from_numpy(feats[:keep].copy()), torch.from_numpy(boxes)
