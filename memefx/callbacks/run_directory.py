"""RunDirectory: the one owner of a run directory (``trainer.default_root_dir``).

It writes ``config.yaml``, ``provenance.json``, ``predictions/<split>.parquet``, ``miate/<split>.json`` and
``metrics.json``, records a checksum of every checkpoint it sees saved (``checkpoints/manifest.json``)
and verifies it before a checkpoint is loaded, and tells MIDAS where and under which epoch to write.
The same folder comes out of ``memefx fit``, a user's own ``LightningCLI`` and a plain
``Trainer(callbacks=[RunDirectory()])``.

A fit refuses a folder that already holds a run unless it resumes that run (a checkpoint path) or
``overwrite=True`` clears the earlier run's files first: results of two runs never mix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from memefx.errors import UserError, read_json
from memefx.provenance import file_digest as sha256

# what a run leaves (loggers version their own subfolders of logs/ and wandb/, so those never mix)
ARTIFACTS = ("config.yaml", "provenance.json", "metrics.json", "predictions", "miate", "midas", "checkpoints",
             "report")
REPORTED = ("auroc", "acc", "loss", "miate_shared_image", "miate_shared_text")
MANIFEST = "manifest.json"


def find(trainer: L.Trainer) -> RunDirectory | None:
    """The trainer's RunDirectory callback, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, RunDirectory)), None)


def run_path(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def evaluated_epoch(trainer: L.Trainer) -> int | None:
    """The training epoch whose weights an evaluation sees.

    In a fit, the current epoch. Outside a fit (validate/test/predict), the epoch stored in the loaded
    checkpoint, else the last epoch trained in this process, else ``None`` (untrained weights): a
    re-validation after a fit never invents an epoch that did not train.
    """
    if trainer.state.fn == TrainerFn.FITTING:
        return trainer.current_epoch
    owner = find(trainer)
    if owner is not None and owner.loaded is not None:
        return owner.loaded["epoch"]
    if owner is not None and owner.last_trained_epoch is not None:
        return owner.last_trained_epoch
    return None


def midas_table_path(trainer: L.Trainer, stage: str, epoch: int) -> tuple[Path, int | None]:
    """Where MIDAS writes a stage's table and the epoch it carries.

    Fit: ``midas/<stage>_epoch<k>.parquet``. Evaluation outside a fit (a checkpoint re-validated or
    tested): ``midas/<stage>_ckpt_epoch<k>.parquet`` with ``k`` the checkpoint's epoch, so a report draws it
    as one point at the epoch that trained those weights, not as a further epoch.
    """
    folder = run_path(trainer) / "midas"
    if trainer.state.fn == TrainerFn.FITTING:
        return folder / f"{stage}_epoch{epoch}.parquet", epoch
    k = evaluated_epoch(trainer)
    return folder / f"{stage}_ckpt_epoch{'init' if k is None else k}.parquet", k


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The recorded checkpoint with the highest global step (file times lie after a ``cp -r``)."""
    folder = Path(run_dir) / "checkpoints"
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    entries = read_json(manifest)
    present = {name: e for name, e in entries.items() if (folder / name).is_file()}
    if not present:
        return None
    name = max(present, key=lambda n: (present[n]["global_step"], present[n]["epoch"], n.startswith("last")))
    return folder / name


def verify_checkpoint(path: str | Path) -> None:
    """Compare a checkpoint with the checksum recorded when it was saved; a mismatch is an error."""
    path = Path(path)
    manifest = path.parent / MANIFEST
    if not manifest.is_file() or not path.is_file():
        return
    entry = read_json(manifest).get(path.name)
    if entry is None:
        return
    if sha256(path) != entry["sha256"]:
        raise UserError(f"{path}: checksum differs from the one recorded when it was saved ({manifest}); the file "
                        "is corrupt or was replaced: resume from another checkpoint of that folder or start a new run")


class ManifestCheckpointIO(CheckpointIO):
    """Checkpoint I/O that records (sha256, epoch, global step) of each saved file and checks it on load."""

    def __init__(self, inner: CheckpointIO):
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        path = Path(path)
        self._update(path.parent, path.name, {"sha256": sha256(path), "epoch": int(checkpoint.get("epoch", -1)),
                                              "global_step": int(checkpoint.get("global_step", -1))})

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        verify_checkpoint(path)
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)
        self._update(Path(path).parent, Path(path).name, None)

    def teardown(self) -> None:
        self.inner.teardown()

    @staticmethod
    def _update(folder: Path, name: str, entry: dict | None) -> None:
        manifest = folder / MANIFEST
        entries = read_json(manifest) if manifest.is_file() else {}
        if entry is None:
            entries.pop(name, None)
        else:
            entries[name] = entry
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=2, sort_keys=True))
        tmp.replace(manifest)  # a kill never leaves a torn manifest


class RunDirectory(Callback):
    """Owns everything written to the run directory.

    Args:
        overwrite: let a fit clear an earlier run's files in the folder (otherwise it refuses).
        config: the fully resolved config as plain data (``memefx fit`` passes it); without it the
            model's and data module's hyperparameters are saved.
        argv: command line recorded in provenance.
    """

    def __init__(self, overwrite: bool = False, config: dict | None = None, argv: list[str] | None = None):
        super().__init__()
        self.overwrite, self.config, self.argv = overwrite, config, argv
        self.loaded: dict | None = None  # epoch/step of the checkpoint an evaluation loaded
        self.last_trained_epoch: int | None = None
        self._outputs: dict[str, list[dict]] = {}
        self._metrics: dict[str, float] = {}
        self._refusal_checked = False

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.loaded = None
        if not isinstance(trainer.strategy.checkpoint_io, ManifestCheckpointIO):
            trainer.strategy.checkpoint_io = ManifestCheckpointIO(trainer.strategy.checkpoint_io)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.loaded = {"epoch": int(checkpoint.get("epoch", -1)), "global_step": int(checkpoint.get("global_step", -1)),
                       "path": str(trainer.ckpt_path) if trainer.ckpt_path else None}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The run really starts (optimizers built, checkpoint restored): claim the folder, then record it."""
        if trainer.fast_dev_run:  # a smoke test: like Lightning, record no config
            return
        if trainer.is_global_zero:
            self._claim(run_path(trainer), resuming=trainer.ckpt_path is not None)
        self._write_start(trainer, pl_module, "fit")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._write_start(trainer, pl_module, "validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._write_start(trainer, pl_module, "test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._write_start(trainer, pl_module, "predict")

    def _claim(self, run_dir: Path, resuming: bool) -> None:
        present = sorted(name for name in ARTIFACTS if (run_dir / name).exists())
        if not present or resuming:
            return
        if not self.overwrite:
            raise UserError(
                f"run directory {run_dir} already holds a run ({', '.join(present)}): resume it with "
                "--ckpt_path last, choose another --trainer.default_root_dir, or pass --overwrite true to delete "
                "those files first")
        for name in present:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()

    def _write_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """``config[_<stage>].yaml`` and ``provenance[_<stage>].json`` (and the W&B run config)."""
        if trainer.fast_dev_run:
            return
        import yaml

        from memefx.provenance import collect

        config = self.config
        if config is None:
            dm = trainer.datamodule
            config = {"model": dict(pl_module.hparams), "data": dict(dm.hparams) if dm is not None else None}
        record = collect(config, trainer, trainer.datamodule, self.argv)
        if self.loaded is not None:
            record["checkpoint"] = self.loaded
        if trainer.is_global_zero:
            run_dir = run_path(trainer)
            run_dir.mkdir(parents=True, exist_ok=True)
            suffix = "" if stage == "fit" else f"_{stage}"
            (run_dir / f"config{suffix}.yaml").write_text(yaml.safe_dump(_plain(config), sort_keys=False))
            (run_dir / f"provenance{suffix}.json").write_text(json.dumps(record, indent=2, default=str))
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.config.update({"provenance": record}, allow_val_change=True)

    # ------------------------------------------------------------------------------------ collection
    def _collect(self, trainer: L.Trainer, stage: str, outputs: Any) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict) or "ids" not in outputs:
            return
        self._outputs.setdefault(stage, []).append(outputs)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, "val", outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, "test", outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, "predict", outputs)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.last_trained_epoch = trainer.current_epoch

    # ---------------------------------------------------------------------------------------- writing
    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write_eval(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write_eval(trainer, pl_module, "test")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._write_predictions(trainer, "predict")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write_metrics(trainer)

    def _write_eval(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        splits = self._write_predictions(trainer, stage)
        results = getattr(pl_module, "eval_results", {})
        epoch = evaluated_epoch(trainer)
        if trainer.is_global_zero:
            for split in splits:
                result = results.pop(split, None)
                if result is None:
                    continue
                payload = {**result, "epoch": epoch, "run": trainer.state.fn.value,
                           "checkpoint": self.loaded["path"] if self.loaded else None}
                path = run_path(trainer) / "miate" / f"{split}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(payload, indent=2))
        self._write_metrics(trainer)

    def _write_predictions(self, trainer: L.Trainer, stage: str) -> list[str]:
        """Gather (id, label, p_hateful) of every rank; rank 0 writes one file per split."""
        chunks = self._outputs.pop(stage, [])
        rows = [(str(i), int(lab), float(p), c["split"])
                for c in chunks for i, lab, p in zip(c["ids"], _list(c["labels"]), _list(c["p_hateful"]))]
        if trainer.world_size > 1:
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        frame = pd.DataFrame(rows, columns=["id", "label", "p_hateful", "split"])
        splits = list(dict.fromkeys(frame.split))
        if not trainer.is_global_zero:
            return splits
        for split, part in frame.groupby("split", sort=False):
            part = unique_ids(part.drop(columns="split"), f"{stage} predictions of {split}")
            path = run_path(trainer) / "predictions" / f"{split}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            part.sort_values("id").reset_index(drop=True).to_parquet(path, index=False)
        return splits

    def _write_metrics(self, trainer: L.Trainer) -> None:
        """``metrics.json``: the last value of each reported metric of this run (all its stages)."""
        for key, value in trainer.callback_metrics.items():
            if key.split("/")[-1] in REPORTED:
                self._metrics[key] = float(value)
        if trainer.is_global_zero and self._metrics:
            path = run_path(trainer) / "metrics.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self._metrics, indent=2, sort_keys=True))

    def state_dict(self) -> dict:
        return {"metrics": dict(self._metrics)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._metrics = dict(state_dict.get("metrics", {}))


def unique_ids(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """One row per id. Identical repeats (a padding sampler) are dropped; conflicting ones are an error."""
    repeated = frame[frame.id.duplicated(keep=False)]
    if repeated.empty:
        return frame
    conflicting = repeated.groupby("id").p_hateful.nunique()
    if (conflicting > 1).any():
        raise RuntimeError(f"{what}: ids scored twice with different values: {conflicting[conflicting > 1].index[:10].tolist()}")
    return frame.drop_duplicates("id")


def _list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _plain(obj):
    """Config values as YAML-safe plain data (paths, tuples and namespaces included)."""
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
