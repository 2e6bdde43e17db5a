"""RunDirectory: the one owner of a run directory (``trainer.default_root_dir``).

It writes ``config.yaml``, ``provenance.json``, ``predictions/<split>.parquet``, ``miate/<split>.json`` and
``metrics.json``, records a checksum of every checkpoint it sees saved (``checkpoints/manifest.json``)
and verifies it before a checkpoint is loaded, and tells MIDAS where and under which epoch to write.
The same folder comes out of ``memefx fit``, a user's own ``LightningCLI`` and a plain
``Trainer(callbacks=[RunDirectory()])``.

A fit refuses a folder that already holds a run unless it resumes that run (a checkpoint recorded in one of
the folder's own manifests) or ``overwrite=True`` clears the earlier run's files first, and one process at a
time writes a folder (an exclusive lock on ``RUN/.memefx.lock``): results of two runs never mix. A resume that
changes the settings deciding the sample order or the model is refused. ``validate``/``test`` outside a fit
write ``metrics_<stage>.json`` beside the fit's ``metrics.json``, never over it, and every evaluation records
which weights it evaluated.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from memefx.contract import EvalStepOutput, EvaluationResults
from memefx.errors import UserError, read_json
from memefx.jsonio import dumps
from memefx.lightning_internals import wrap_checkpoint_io
from memefx.provenance import file_digest as sha256
from memefx.run_files import (
    ARTIFACTS,
    CONFIG,
    LOCK,
    MANIFEST,
    METRICS,
    MIDAS,
    PROVENANCE,
    miate_file,
    predictions_file,
    staged,
)

# what a run leaves (loggers version their own subfolders of logs/ and wandb/, so those never mix)
# ARTIFACTS: what a run leaves, from memefx.run_files
STAGE_ARTIFACTS = ("config_*.yaml", "provenance_*.json", "metrics_*.json")  # of validate/test/predict
REPORTED = ("auroc", "acc", "loss", "miate_shared_image", "miate_shared_text")
STAGE_PREFIXES = ("train", "val", "test")  # metrics.json keys start with one of these
# settings a resume may change: where files are, how many workers read them, what is evaluated and how
# attention is computed (the same maths); any other model or data setting changes the sample order or the model
RESUME_FREE = {
    "data": {"root", "confounders", "captions", "tokenizer", "tags_file", "region_features", "num_workers",
             "check_images", "val_split", "test_split", "predict_split"},
    "model": {"miate_bootstrap", "miate_seed"},
    "model.backbone_args": {"pretrained", "checkpoint", "image_checkpoint", "bert", "attn_implementation"},
}


def find(trainer: L.Trainer) -> RunDirectory | None:
    """The trainer's RunDirectory callback, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, RunDirectory)), None)


def run_path(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def midas_table_path(trainer: L.Trainer, stage: str, epoch: int, weights_epoch: int | None = None
                     ) -> tuple[Path, int | None]:
    """Where MIDAS writes a stage's table and the epoch it carries.

    Fit: ``midas/<stage>_epoch<k>.parquet``. Evaluation outside a fit (a checkpoint re-validated or
    tested): ``midas/<stage>_ckpt_epoch<k>.parquet`` with ``k = weights_epoch``, the epoch that trained the
    weights evaluated (``None``: the weights the model was built with), so a report draws it as one point
    at that epoch, not as a further epoch.
    """
    folder = run_path(trainer) / MIDAS
    if trainer.state.fn == TrainerFn.FITTING:
        return folder / f"{stage}_epoch{epoch}.parquet", epoch
    k = weights_epoch
    return folder / f"{stage}_ckpt_epoch{'init' if k is None else k}.parquet", k


def recorded_checkpoints(run_dir: str | Path) -> dict[Path, dict]:
    """Every checkpoint file under ``run_dir`` recorded in the manifest beside it, with its entry.

    Checkpoints sit in ``RUN/checkpoints/`` when ``memefx fit`` configures the ModelCheckpoint, in
    ``RUN/<logger>/version_N/checkpoints/`` for Lightning's default one, in ``RUN/`` for SLURM requeue files.
    """
    run_dir = Path(run_dir)
    found: dict[Path, dict] = {}
    for manifest in sorted(run_dir.rglob(MANIFEST)) if run_dir.is_dir() else []:
        entries = read_json(manifest)
        for name, entry in entries.items() if isinstance(entries, dict) else ():
            if isinstance(entry, dict) and "sha256" in entry and (manifest.parent / name).is_file():
                found[manifest.parent / name] = entry
    return found


def _recency(path: Path, entry: dict) -> tuple:
    return entry.get("global_step", -1), entry.get("epoch", -1), path.name.startswith("last")


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The recorded checkpoint with the highest global step (file times lie after a ``cp -r``)."""
    found = recorded_checkpoints(run_dir)
    return max(found, key=lambda p: _recency(p, found[p])) if found else None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The best checkpoint of the run's ModelCheckpoint as recorded at its latest save (``None``: none recorded).

    Each manifest entry names the file the (first) ModelCheckpoint held best when that file was saved, so a new
    process resolves ``best`` as the fit would have; the file may be missing (the caller says so).
    """
    found = {p: e for p, e in recorded_checkpoints(run_dir).items() if e.get("best")}
    if not found:
        return None
    latest = max(found, key=lambda p: _recency(p, found[p]))
    best = Path(found[latest]["best"])
    return best if best.is_absolute() else latest.parent / best


def is_recorded(run_dir: str | Path, checkpoint: str | Path) -> bool:
    """Whether ``checkpoint`` is one of ``run_dir``'s own checkpoints (in a manifest inside the folder)."""
    target = Path(checkpoint).resolve()
    return any(path.resolve() == target for path in recorded_checkpoints(run_dir))


def holds_fit(run_dir: str | Path) -> bool:
    """Whether a fit has run in the folder (its ``provenance.json`` is written when a fit starts)."""
    return (Path(run_dir) / PROVENANCE).is_file()


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
                                              "global_step": int(checkpoint.get("global_step", -1)),
                                              "best": _best_in(checkpoint, path.parent)})

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


def _best_in(checkpoint: dict, folder: Path) -> str | None:
    """The best file of the first ModelCheckpoint (Lightning's ``best``) in a checkpoint's callback states:
    its name when it sits in ``folder`` (so a copied run still finds it), else its path."""
    states = [s for s in (checkpoint.get("callbacks") or {}).values() if isinstance(s, dict) and "best_model_path" in s]
    best = states[0]["best_model_path"] if states else None
    if not best:
        return None
    best = Path(best)
    return best.name if best.parent.resolve() == folder.resolve() else str(best)


class FolderLock:
    """An exclusive ``flock`` on ``RUN/.memefx.lock``: one process at a time writes a run directory.

    The kernel drops the lock when its process ends (a kill or a crash included), so a lock never outlives
    its run; the file stays and names the last holder. Without ``fcntl`` (Windows) nothing is locked.
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        """Take the lock or raise ``UserError`` naming the holder; the file is not changed when refused."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"run directory {self.path.parent} is in use ({holder}; lock {self.path}): wait until "
                            "that run ends, or choose another --trainer.default_root_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{what}: pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __del__(self) -> None:  # a dropped lock never stays held for the rest of the process
        try:
            self.release()
        except (OSError, ImportError):  # interpreter shutdown: the kernel releases it with the process
            pass


def resume_differences(checkpoint: dict, model_hparams: dict | None, data_hparams: dict | None,
                       training: dict) -> list[str]:
    """Settings of this fit that differ from those a checkpoint was trained with, as ``name: then -> now``.

    Model and data hyperparameters come from the checkpoint itself; the trainer settings that decide the
    order and grouping of batches (world size, gradient accumulation, batches per epoch) from the state
    ``RunDirectory`` saved in it. Settings in ``RESUME_FREE`` are not compared.
    """
    lines = []
    then_training = ((checkpoint.get("callbacks") or {}).get(RunDirectory.__qualname__) or {}).get("training") or {}
    pairs = (("model", checkpoint.get("hyper_parameters"), model_hparams),
             ("data", checkpoint.get("datamodule_hyper_parameters"), data_hparams),
             ("trainer", then_training, training if then_training else None))
    for prefix, then, now in pairs:
        if then is None or now is None:
            continue
        a, b = _flat(dict(then), prefix), _flat(dict(now), prefix)
        for key in sorted(set(a) | set(b)):
            group, _, name = key.rpartition(".")
            if name in RESUME_FREE.get(group, ()) or _same(a.get(key), b.get(key)):
                continue
            lines.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return lines


def _flat(obj: dict, prefix: str) -> dict:
    out = {}
    for key, value in obj.items():
        if isinstance(value, dict) or (hasattr(value, "items") and not isinstance(value, (str, bytes))):
            out.update(_flat(dict(value), f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _same(a, b) -> bool:
    """Equal, also when one side came from the command line as a string (``"64"`` and ``64``)."""
    if a == b:
        return True
    if a is None or b is None or isinstance(a, (list, dict)) or isinstance(b, (list, dict)):
        return False
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).lower() == str(b).lower()


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
        self.metrics_path: Path | None = None  # the metrics file the last stage wrote
        self._outputs: dict[str, list[dict]] = {}
        self._metrics: dict[str, float] = {}
        self._stage: str | None = None
        self._fitted = False  # a fit ran with this callback: its later evaluations belong to it
        self._training: dict | None = None
        self._lock: FolderLock | None = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.loaded = None
        self._stage = stage
        wrap_checkpoint_io(trainer, ManifestCheckpointIO)  # every checkpoint saved gets its manifest entry
        if stage != "fit" and not trainer.fast_dev_run:  # an evaluation writes the folder too: one process at a
            # time, claimed before the loggers write (a fit claims at its start, once it knows what it resumes)
            self._on_rank_zero(trainer, lambda: self._acquire(run_path(trainer), f"memefx {stage}"))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.loaded = {"epoch": int(checkpoint.get("epoch", -1)), "global_step": int(checkpoint.get("global_step", -1)),
                       "path": str(trainer.ckpt_path) if trainer.ckpt_path else None}
        if trainer.state.fn == TrainerFn.FITTING:  # before anything is written: every rank compares the same
            dm = trainer.datamodule
            changed = resume_differences(checkpoint, dict(pl_module.hparams),
                                         dict(dm.hparams) if dm is not None else None, _training(trainer))
            if changed:
                raise UserError(
                    f"--ckpt_path {trainer.ckpt_path}: this fit changes settings that decide the sample order or the "
                    f"model ({'; '.join(changed)}), so resuming would train samples twice or a different model: "
                    "resume with the checkpoint's settings (its run's config.yaml), or drop --ckpt_path and start a "
                    "new run in another --trainer.default_root_dir")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The run really starts (optimizers built, checkpoint restored): claim the folder, then record it."""
        self._fitted = True
        self._training = _training(trainer)
        if trainer.fast_dev_run:  # a smoke test: like Lightning, record no config
            return
        self._on_rank_zero(trainer, lambda: self._claim(run_path(trainer), trainer.ckpt_path))
        self._write_start(trainer, pl_module, "fit")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._write_start(trainer, pl_module, "validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._write_start(trainer, pl_module, "test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._write_start(trainer, pl_module, "predict")

    @staticmethod
    def _on_rank_zero(trainer: L.Trainer, claim) -> None:
        """Run ``claim`` on rank 0 only and broadcast its refusal, so every rank stops together (as Lightning's
        SaveConfigCallback broadcasts its check)."""
        refusal = None
        if trainer.is_global_zero:
            try:
                claim()
            except UserError as err:
                refusal = str(err)
        refusal = trainer.strategy.broadcast(refusal)
        if refusal:
            raise UserError(refusal)

    def _claim(self, run_dir: Path, ckpt_path) -> None:
        """Refuse a folder holding another run, then lock it; only then delete what ``overwrite`` clears."""
        present = sorted({name for name in ARTIFACTS if (run_dir / name).exists()}
                         | {p.name for pattern in STAGE_ARTIFACTS for p in run_dir.glob(pattern)})
        resuming = ckpt_path is not None and is_recorded(run_dir, ckpt_path)
        if present and not resuming and not self.overwrite:
            if ckpt_path is not None:
                raise UserError(
                    f"run directory {run_dir} already holds a run ({', '.join(present)}) and --ckpt_path {ckpt_path} "
                    f"is not one of its checkpoints (none of the manifests under {run_dir} records it): resume this "
                    "run with --ckpt_path last, start from that checkpoint in another --trainer.default_root_dir, or "
                    "pass --overwrite true to delete this run's files first")
            raise UserError(
                f"run directory {run_dir} already holds a run ({', '.join(present)}): resume it with "
                "--ckpt_path last, choose another --trainer.default_root_dir, or pass --overwrite true to delete "
                "those files first")
        self._acquire(run_dir, "memefx fit")
        if present and not resuming:
            for name in present:
                target = run_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()

    def _acquire(self, run_dir: Path, what: str) -> None:
        if self._lock is None:
            self._lock = FolderLock(run_dir)
        self._lock.acquire(what)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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
        if stage != "fit":
            record["weights"] = weights = self.weights(trainer, pl_module)
            say = rank_zero_info if weights["from"] == "checkpoint" or weights.get("backbone_checkpoint") else rank_zero_warn
            say(f"memefx {stage}: evaluating {weights['description']}")
        if trainer.is_global_zero:
            run_dir = run_path(trainer)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / staged(CONFIG, stage)).write_text(yaml.safe_dump(_plain(config), sort_keys=False))
            (run_dir / staged(PROVENANCE, stage)).write_text(dumps(record, indent=2, default=str))
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.config.update({"provenance": record}, allow_val_change=True)

    def weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """Which weights an evaluation sees, with a one-line ``description`` (recorded in provenance and miATE).

        ``from``: ``fit`` (a validation inside the fit), ``checkpoint`` (a file was loaded), ``end of fit``
        (evaluated after a fit in this process without loading a checkpoint) or ``initial`` (the weights the
        model was built with: ``model.backbone_args.checkpoint`` when given, else untrained).
        """
        if trainer.state.fn == TrainerFn.FITTING:
            e = trainer.current_epoch
            return {"from": "fit", "epoch": e, "description": f"the weights being trained (epoch {e})"}
        if self.loaded is not None:
            e, step, path = self.loaded["epoch"], self.loaded["global_step"], self.loaded["path"]
            return {"from": "checkpoint", **self.loaded, "description": f"checkpoint {path} (epoch {e}, step {step})"}
        if self.last_trained_epoch is not None:
            e, step = self.last_trained_epoch, trainer.global_step
            return {"from": "end of fit", "epoch": e, "global_step": step,
                    "description": f"the weights at the end of the fit (epoch {e}, step {step}), not a saved checkpoint"}
        init = ((getattr(pl_module, "hparams", None) or {}).get("backbone_args") or {}).get("checkpoint")
        return {"from": "initial", "backbone_checkpoint": init,
                "description": f"the weights the model was built with (model.backbone_args.checkpoint {init})" if init
                else "the model's initial weights: untrained (no --ckpt_path, no model.backbone_args.checkpoint)"}

    def evaluated_epoch(self, trainer: L.Trainer) -> int | None:
        """The training epoch whose weights an evaluation sees.

        In a fit, the current epoch. Outside a fit (validate/test/predict), the epoch stored in the loaded
        checkpoint, else the last epoch trained in this process, else ``None`` (untrained weights): a
        re-validation after a fit never invents an epoch that did not train.
        """
        if trainer.state.fn == TrainerFn.FITTING:
            return trainer.current_epoch
        if self.loaded is not None:
            return self.loaded["epoch"]
        return self.last_trained_epoch

    # ------------------------------------------------------------------------------------ collection
    def _collect(self, trainer: L.Trainer, stage: str, outputs: Any) -> None:
        """Keep a step's (ids, labels, p_hateful, split), never its attention capture (a graph)."""
        if trainer.sanity_checking:
            return
        if isinstance(outputs, EvalStepOutput):
            outputs = {"ids": outputs.ids, "labels": outputs.labels, "p_hateful": outputs.p_hateful, "split": outputs.split}
        if not isinstance(outputs, dict) or "ids" not in outputs:
            return
        self._outputs.setdefault(stage, []).append({k: outputs[k] for k in ("ids", "labels", "p_hateful", "split")})

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
        results = pl_module.evaluation_results() if isinstance(pl_module, EvaluationResults) else {}
        epoch = self.evaluated_epoch(trainer)
        weights = self.weights(trainer, pl_module)
        if trainer.is_global_zero:
            for split in splits:
                result = results.get(split)
                if result is None or result.get("stage") != stage:  # no miATE of this split in this stage
                    continue
                payload = {**result, "epoch": epoch, "run": trainer.state.fn.value,
                           "checkpoint": self.loaded["path"] if self.loaded else None, "weights": weights}
                path = miate_file(run_path(trainer), split)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(dumps(payload, indent=2))  # strict JSON: an undefined SE is null, not NaN
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
            path = predictions_file(run_path(trainer), split)
            path.parent.mkdir(parents=True, exist_ok=True)
            part.sort_values("id").reset_index(drop=True).to_parquet(path, index=False)
        return splits

    def _write_metrics(self, trainer: L.Trainer) -> None:
        """The last value of each reported metric.

        A fit (with the evaluations it runs after itself) writes ``metrics.json``. ``validate``/``test`` on
        their own write ``metrics_<stage>.json`` and never touch the fit's file; in a folder where no fit ran
        (a checkpoint only evaluated) they also merge their own keys into ``metrics.json``.
        """
        reported = {key: float(value) for key, value in trainer.callback_metrics.items()
                    if key.split("/")[0] in STAGE_PREFIXES and key.split("/")[-1] in REPORTED}
        if self._fitted:
            self._metrics.update(reported)
            if trainer.is_global_zero and self._metrics:
                self.metrics_path = _write_json(run_path(trainer) / METRICS, self._metrics)
            return
        if not trainer.is_global_zero or not reported:
            return
        stage = trainer.state.fn.value
        run_dir = run_path(trainer)
        self.metrics_path = _write_json(run_dir / staged(METRICS, stage), reported)
        if not holds_fit(run_dir):
            path = run_dir / METRICS
            prefixes = {key.split("/")[0] for key in reported}
            kept = {k: v for k, v in (read_json(path) if path.is_file() else {}).items()
                    if k.split("/")[0] not in prefixes}
            _write_json(path, {**kept, **reported})

    def state_dict(self) -> dict:
        return {"metrics": dict(self._metrics), "training": self._training}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._stage == "fit":  # an evaluation of a checkpoint reports its own metrics, not the fit's
            self._metrics = dict(state_dict.get("metrics", {}))


def _training(trainer: L.Trainer) -> dict:
    """Trainer settings that decide which batches an optimizer step sees (compared when a fit resumes)."""
    return {"world_size": trainer.world_size, "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "limit_train_batches": trainer.limit_train_batches}


def _write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(data, indent=2, sort_keys=True))
    return path


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
