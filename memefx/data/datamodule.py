"""MemeDataModule: HMC folders, table-only data (descriptions, no images) or the synthetic default."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from memefx.data.cache import default_cache_dir
from memefx.data.carve import carve_validation
from memefx.data.collate import MemeCollator, check_max_length, load_tokenizer, train_wordpiece
from memefx.data.hmc import UNLABELED, HMCFormatError, leakage, leakage_message, load_image, read_hmc
from memefx.data.regions import open_regions
from memefx.data.strata import KINDS, stratum_lookup
from memefx.data.synthetic import SPLITS as SYNTHETIC_SPLITS
from memefx.data.synthetic import SyntheticConfig, write_synthetic
from memefx.data.tables import (
    check_confounders_cover,
    check_meme_text_column,
    descriptions_for,
    read_captions,
    read_confounders,
)
from memefx.schema import STRATUM_COLUMN

ROLES = ("train", "val", "test", "predict")


class MemeDataset(Dataset):
    """Items of one split; images are decoded lazily (they were validated at setup).

    Every item carries its ``split`` name, so the collated batch says which split it comes from.
    """

    def __init__(self, frame: pd.DataFrame, root: Path | None, transform, descriptions: list[str] | None,
                 regions=None):
        self.frame = frame.reset_index(drop=True)
        self.root = root
        self.transform = transform
        self.descriptions = descriptions
        self.regions = regions

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict:
        row = self.frame.iloc[index]
        item = {
            "id": row.id, "text": row.text, "label": int(row.label), "split": row.split,
            **{column: int(getattr(row, column)) for column in STRATUM_COLUMN.values()},
        }
        if "tags" in self.frame.columns:
            item["tags"] = row.tags
        if self.descriptions is not None:
            item["description"] = self.descriptions[index]
        elif self.regions is not None:
            item["regions"] = self.regions.load(row.id, row.img)
        else:
            item["pixel_values"] = self.transform(load_image(self.root / row.img, row.id))
        return item


class EpochSeededSampler(torch.utils.data.Sampler):
    """Shuffles with a permutation fixed by (seed, epoch), not by the global RNG.

    Lightning calls ``set_epoch`` every epoch, so a run resumed from a checkpoint at an epoch boundary
    sees the same order as an uninterrupted one (DDP uses DistributedSampler, seeded the same way).
    """

    def __init__(self, data_source, seed: int = 0):
        self.n, self.seed, self.epoch, self.start = len(data_source), seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        start, self.start = self.start, 0  # a resume offset applies to one pass only
        return iter(torch.randperm(self.n, generator=g).tolist()[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside the epoch is saved in checkpoints (Lightning's ``_Stateful``).

    A run killed mid-epoch and resumed from its last checkpoint continues with the next batch of the
    same order instead of starting the epoch again.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._served = skip
        sampler = self.sampler
        start = skip * (self.batch_size or 1)
        if isinstance(sampler, EpochSeededSampler):
            sampler.start = start
            skip = 0  # the sampler leaves the consumed samples out; nothing is loaded twice
        return self._count(super().__iter__(), skip)

    def _count(self, iterator, discard: int):
        for _ in range(discard):  # another sampler (DDP): consume what was already served
            next(iterator, None)
        for batch in iterator:
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches_served": self._served, "epoch": getattr(self.sampler, "epoch", None)}

    def load_state_dict(self, state: dict) -> None:
        self._skip = int(state.get("batches_served", 0))
        if state.get("epoch") is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(state["epoch"])


class MemeDataModule(L.LightningDataModule):
    """Splits, tokenizer, image transform and collate for every backbone family.

    Args:
        root: HMC-layout folder. ``None`` with no ``confounders`` table: the synthetic default, written
            once to the cache from ``synthetic`` settings. ``None`` with ``confounders`` and ``captions``:
            table-only data (meme text from ``text_column``, which must then be given, image side from
            ``caption_column``).
        confounders: confounder table (default ``<root>/confounders.parquet`` when present).
        captions: caption table (default ``<root>/hm_captions.parquet`` when present); only ``image_id``
            and the columns in use are required. No image file is opened in caption mode.
        train_split: split trained on; it must be labeled (an unlabeled file here is an error).
        val_split: split validated on every epoch (``None``: dev_seen, or the carved split with
            ``val_from_train``).
        val_from_train: carve this fraction of the training split off as the validation split (named
            ``<train_split>_heldout``), whole confounder groups at a time and seeded by
            ``val_from_train_seed``, so that checkpoint and option selection never read an evaluation split.
        test_split, predict_split: one split or a list (one DataLoader per split, in this order; every
            batch carries ``batch["split"]``). Unlabeled splits (test files without labels) are read with
            label -1.
        image_side: ``pixels`` (images through the image transform), ``caption`` (the description as
            the second segment of a text pair) or ``regions`` (precomputed features, see ``region_features``).
        caption_column: description variant used in caption mode.
        text_column: table-only mode: the caption-table column that holds each meme's overlaid text. No
            default: the BLIP-2 columns of ``hm_captions.parquet`` (``text`` included) describe the image and
            are refused (``text`` equals the meme text for about 1 meme in 5).
        tokenizer: local path of a fast tokenizer; ``None`` trains a WordPiece on the train texts.
        vocab_size: vocabulary of the trained tokenizer (must fit the backbone's embedding table).
        max_length: token budget of the text side (text plus description in caption mode).
        image_size: side of the square image given to the image encoder.
        pairs_only: stratum ids only for two-member strata (the reference code's restriction).
        tags_file: parquet with ``id, tags`` (space-separated object tags) for OSCAR-style backbones; the
            tags become the second text segment. A relative path is looked up under ``root`` first (the
            synthetic data ships ``truth.parquet`` with tags).
        region_features: precomputed regions (``image_side: regions``): Vilio's TSV file (regions found
            by the meme's picture, its ``img`` field) or a folder of ``<id>.npz``; relative paths are looked
            up under ``root`` first.
        region_count: use the first N regions of each picture (Vilio's ``--num_features``: 36 to 100);
            a picture with fewer is an error. ``None``: all of them.
        synthetic: ``SyntheticConfig`` fields for the default dataset.
        shuffle_seed: seed of the training order (a function of this seed and the epoch only).
    """

    def __init__(
        self,
        root: str | None = None,
        confounders: str | None = None,
        captions: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | list[str] = "test_seen",
        predict_split: str | list[str] = "test_seen",
        image_side: Literal["pixels", "caption", "regions"] = "pixels",
        caption_column: str = "text_captioned",
        text_column: str | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        max_length: int = 48,
        image_size: int = 64,
        batch_size: int = 64,
        num_workers: int = 0,
        check_images: bool = True,
        pairs_only: bool = False,
        tags_file: str | None = None,
        region_features: str | None = None,
        region_count: int | None = None,
        synthetic: dict | None = None,
        shuffle_seed: int = 0,
        val_from_train: float | None = None,
        val_from_train_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tables_only = root is None and confounders is not None
        if self.tables_only and (captions is None or image_side != "caption"):
            raise ValueError("table-only data (no root) needs captions=... and image_side='caption'")
        if self.tables_only:
            check_meme_text_column(text_column, captions)
        if tags_file and image_side == "caption":
            raise ValueError("tags_file and image_side='caption' both fill the second text segment: choose one")
        if val_from_train is not None and val_split is not None:
            raise ValueError(f"data.val_split={val_split!r} and data.val_from_train={val_from_train!r} both name the "
                             "validation split: choose one")
        self.carved: dict | None = None  # the record of the carved validation split (provenance)
        if (image_side == "regions") != bool(region_features):
            raise ValueError("image_side='regions' and region_features=FOLDER go together")
        self.synthetic_config = SyntheticConfig(**(synthetic or {})) if root is None and not self.tables_only else None
        self.frames: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, MemeDataset] = {}  # role -> dataset of its first split
        self.split_datasets: dict[str, dict[str, MemeDataset]] = {}  # role -> split -> dataset
        self.tokenizer = None
        self.transform = v2.Compose([
            v2.ToImage(), v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3),
        ])

    # ----------------------------------------------------------------------------------------- paths
    @property
    def root(self) -> Path | None:
        if self.synthetic_config is not None:
            return default_cache_dir() / "synthetic" / self.synthetic_config.fingerprint()
        return Path(self.hparams.root) if self.hparams.root else None

    def side_table(self, given: str | None, name: str) -> Path | None:
        """The side table in use: the path given, else ``<root>/<name>`` when present, else None (provenance
        records it, so readers of a run need no data module)."""
        if given:
            return Path(given)
        if self.root is not None and (self.root / name).is_file():
            return self.root / name
        return None

    def eval_splits(self, role: str) -> list[str]:
        """The split names of a role (``train``, ``val``, ``test`` or ``predict``), in loader order."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: expected one of {ROLES}")
        given = self.hparams[f"{role}_split"]
        if role == "val" and self.hparams.get("val_from_train") is not None:
            given = self.heldout_split
        elif role == "val" and given is None:
            given = "dev_seen"
        names = [given] if isinstance(given, str) else list(given)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"data.{role}_split must be a split name or a non-empty list of names, got {given!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"data.{role}_split lists a split twice: {names}")
        return names

    def check_splits(self, roles: tuple[str, ...] = ROLES) -> None:
        """Every split name of these roles is valid and has its data, before anything trains.

        ``memefx fit`` calls it for the splits it will read (the test splits too with ``test_after_fit``), so an
        unknown, empty or repeated ``--data.test_split`` entry stops the command at once instead of after the
        whole fit. The carved ``<train_split>_heldout`` split needs no file.
        """
        for role in roles:
            for split in self.eval_splits(role):  # an empty or repeated entry is an error here
                if role == "val" and self.hparams.get("val_from_train") is not None:
                    continue
                self._check_split_exists(role, split)

    def _check_split_exists(self, role: str, split: str) -> None:
        if self.tables_only:
            splits = set(read_confounders(self.hparams.confounders).split.unique())
            if split not in splits:
                raise HMCFormatError(f"data.{role}_split {split!r}: {self.hparams.confounders} has no rows for it "
                                     f"(splits: {sorted(splits)})")
            return
        if self.synthetic_config is not None and not (self.root / "synthetic.json").is_file():
            if split not in SYNTHETIC_SPLITS:  # not written yet: its splits are known
                raise HMCFormatError(f"data.{role}_split {split!r}: the synthetic dataset has the splits {list(SYNTHETIC_SPLITS)}")
            return
        if self.root is None or not self.root.is_dir():
            raise HMCFormatError(f"data root {self.root} is not a folder (set --data.root to an HMC folder)")
        path = self.root / f"{split}.jsonl"
        if not path.is_file():
            present = sorted(p.stem for p in self.root.glob("*.jsonl"))
            raise HMCFormatError(f"data.{role}_split {split!r}: {path} not found (splits in {self.root}: "
                                 f"{present or 'none'})")

    def label_counts(self, split: str) -> tuple[int, int, int] | None:
        """(hateful, benign, all) memes of a loaded split (``memefx.contract.SplitData``); None if not loaded."""
        frame = self.frames.get(split)
        if frame is None:
            return None
        return int((frame.label == 1).sum()), int((frame.label == 0).sum()), int(len(frame))

    @property
    def heldout_split(self) -> str:
        """Name of the validation split carved from the training split (``val_from_train``)."""
        return f"{self.hparams.train_split}_heldout"

    @property
    def split_names(self) -> dict[str, str]:
        """The first split of each role (the only one unless ``test_split``/``predict_split`` is a list)."""
        return {role: self.eval_splits(role)[0] for role in ROLES}

    # ----------------------------------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Write the synthetic default once (rank 0); later runs reuse the cached folder."""
        if self.synthetic_config is not None and not (self.root / "synthetic.json").is_file():
            tmp = self.root.with_name(self.root.name + f".tmp{os.getpid()}")
            write_synthetic(tmp, self.synthetic_config)
            try:
                tmp.rename(self.root)
            except OSError:  # another process (a DDP rank) finished first: keep its copy
                shutil.rmtree(tmp)

    def _load(self, splits: list[str]) -> dict[str, pd.DataFrame]:
        if self.tables_only:
            conf = read_confounders(self.hparams.confounders)
            caps = read_captions(self.hparams.captions, (self.hparams.text_column, self.hparams.caption_column))
            out = {}
            for split in splits:
                rows = conf[conf.split == split]
                if rows.empty:
                    raise HMCFormatError(f"{self.hparams.confounders}: no rows for split {split!r} "
                                         f"(splits: {sorted(conf.split.unique())})")
                text = descriptions_for(caps, rows.id.tolist(), self.hparams.text_column, self.hparams.captions)
                out[split] = rows[["id", "split", "label"]].assign(text=text, img="")
            return out
        if self.root is None or not self.root.is_dir():
            raise HMCFormatError(f"data root {self.root} is not a folder (set --data.root to an HMC folder)")
        return read_hmc(self.root, splits, images=self.hparams.check_images and self.hparams.image_side == "pixels")

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        roles = wanted.get(stage, ["train", "val", "test"])
        names = {n for r in roles for n in self.eval_splits(r)}
        train = self.hparams.train_split
        carving = self.heldout_split in names and self.heldout_split not in self.frames
        names.discard(self.heldout_split)  # carved from the training split, never read from a file
        if carving:
            self.frames.pop(train, None)  # carve from the whole file
        # the training split: trained on, trains the tokenizer, or (when present) checked for leakage only;
        # a folder holding only the split to evaluate is enough with a given tokenizer
        if ("train" in roles or carving or not self.hparams.tokenizer or self.tables_only
                or (self.root / f"{train}.jsonl").is_file()):
            names.add(train)
        names = sorted(names)
        frames = self._load([n for n in names if n not in self.frames])
        conf_path = self.side_table(self.hparams.confounders, "confounders.parquet")
        conf = read_confounders(conf_path) if conf_path and frames else None  # only for newly loaded splits
        for split, frame in frames.items():
            if conf is not None and not self.tables_only:
                check_confounders_cover(conf, frame, conf_path)
            lookup = stratum_lookup(conf, split, self.hparams.pairs_only) if conf is not None else {}
            for kind in KINDS:
                frame[STRATUM_COLUMN[kind]] = frame.id.map(lookup.get(kind, {})).fillna(-1).astype(int)
            if self.hparams.tags_file:
                tags = pd.read_parquet(self._under_root(self.hparams.tags_file))
                frame["tags"] = frame.id.map(dict(zip(tags.id.astype(str).str.zfill(5), tags.tags))).fillna("")
            self.frames[split] = frame
        if carving:
            self._carve(conf)
        if "train" in roles:
            self._check_trainable()
        self._warn_leakage(list(frames))
        if self.tokenizer is None:
            self.tokenizer = self._build_tokenizer()
        check_max_length(self.tokenizer, self.hparams.max_length, self._pair_mode)
        regions = None
        if self.hparams.region_features:
            regions = open_regions(self._under_root(self.hparams.region_features), self.hparams.region_count)
        for role in roles:
            per_split = {}
            for split in self.eval_splits(role):
                if regions is not None:
                    self.region_dim = regions.check(self.frames[split])
                per_split[split] = MemeDataset(self.frames[split], self.root, self.transform,
                                               self._descriptions(split), regions)
            self.split_datasets[role] = per_split
            self.datasets[role] = next(iter(per_split.values()))

    def _carve(self, conf: pd.DataFrame | None) -> None:
        """Split the loaded training frame into training memes and the carved validation split."""
        train = self.hparams.train_split
        frame = self.frames[train]
        held, self.carved = carve_validation(frame.id, conf, train, self.hparams.val_from_train,
                                             self.hparams.val_from_train_seed)
        self.frames[self.heldout_split] = frame[held].assign(split=self.heldout_split).reset_index(drop=True)
        self.frames[train] = frame[~held].reset_index(drop=True)

    @property
    def _pair_mode(self) -> bool:
        """Whether a second text segment (description or object tags) follows the meme text."""
        return self.hparams.image_side == "caption" or bool(self.hparams.tags_file)

    def _split_file(self, split: str) -> str:
        if self.tables_only:
            return f"{self.hparams.confounders} (split {split!r})"
        return str(self.root / f"{split}.jsonl")

    def _check_trainable(self) -> None:
        """Training needs labels: an unlabeled file given as the training split is an error naming it."""
        split = self.hparams.train_split
        frame = self.frames[split]
        unlabeled = frame[frame.label == UNLABELED]
        if len(unlabeled):
            raise HMCFormatError(
                f"{self._split_file(split)}: {len(unlabeled)} of {len(frame)} memes of the training split "
                f"{split!r} have no label (first ids {unlabeled.id.tolist()[:10]}); train on a labeled split "
                "(data.train_split) and evaluate this one with test_split or predict_split"
            )

    def _warn_leakage(self, loaded: list[str]) -> None:
        """Warn (listing ids) when memes of the training split reappear in an evaluation split."""
        train_split = self.hparams.train_split
        train = self.frames.get(train_split)
        if train is None:
            return
        for split in loaded:
            if split == train_split:
                continue
            message = leakage_message(split, train_split, leakage(train, self.frames[split]))
            if message:
                warnings.warn(message, stacklevel=2)

    def _under_root(self, path: str) -> Path:
        """A relative path that exists under the data root means that one (e.g. the synthetic truth table)."""
        if not Path(path).is_absolute() and self.root is not None and (self.root / path).exists():
            return self.root / path
        return Path(path)

    def _descriptions(self, split: str) -> list[str] | None:
        if self.hparams.image_side != "caption":
            return None
        path = self.side_table(self.hparams.captions, "hm_captions.parquet")
        if path is None:
            raise HMCFormatError(f"caption mode needs a caption table: none given and none in {self.root}")
        if getattr(self, "_captions", None) is None:  # read once: every split and the tokenizer use it
            self._captions = read_captions(path, (self.hparams.caption_column,))
        return descriptions_for(self._captions, self.frames[split].id.tolist(), self.hparams.caption_column, path)

    def _build_tokenizer(self):
        if self.hparams.tokenizer:
            return load_tokenizer(self.hparams.tokenizer)
        train = self.frames[self.hparams.train_split]
        texts = train.text.tolist()
        if self.hparams.image_side == "caption":
            texts += self._descriptions(self.hparams.train_split)
        if "tags" in train.columns:
            texts += train.tags.tolist()
        return train_wordpiece(texts, self.hparams.vocab_size)

    # ----------------------------------------------------------------------------------------- loaders
    def _loader(self, role: str, shuffle: bool) -> DataLoader | list[DataLoader]:
        """One loader, or one per split (in ``eval_splits`` order) when the role lists several."""
        if role not in self.split_datasets:
            raise RuntimeError(f"no {role!r} data: call setup() for the stage that uses it first")
        loaders = [self._split_loader(d, shuffle) for d in self.split_datasets[role].values()]
        return loaders[0] if len(loaders) == 1 else loaders

    def _split_loader(self, dataset: MemeDataset, shuffle: bool) -> DataLoader:
        collate = MemeCollator(self.tokenizer, self.hparams.max_length, self.hparams.image_side == "caption",
                               tags_as_pair=bool(self.hparams.tags_file))
        workers = self.hparams.num_workers
        sampler = EpochSeededSampler(dataset, self.hparams.shuffle_seed) if shuffle else self._eval_sampler(dataset)
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=collate,
            num_workers=workers, persistent_workers=workers > 0,
        )

    def _eval_sampler(self, dataset: MemeDataset):
        """Under DDP, each evaluation sample on exactly one rank (Lightning's default sampler pads the last
        batch with repeats, which AUROC and accuracy would count twice); ``None`` on one process."""
        trainer = self.trainer  # a LightningDataModule's trainer, None outside one
        if trainer is None or trainer.world_size <= 1:
            return None
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper

        return UnrepeatedDistributedSamplerWrapper(torch.utils.data.SequentialSampler(dataset),
                                                   num_replicas=trainer.world_size, rank=trainer.global_rank,
                                                   shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loader("predict", shuffle=False)
