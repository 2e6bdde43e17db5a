"""``MemeCLI``: the LightningCLI behind ``memefx fit|validate|test|predict``, wired to the run directory.

Kept apart from ``memefx.cli`` so the other subcommands (and ``--help``) start without importing
Lightning, torch and transformers.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from memefx.callbacks.run_directory import (
    RunDirectory,
    best_checkpoint,
    find,
    holds_fit,
    last_checkpoint,
)
from memefx.data.datamodule import MemeDataModule
from memefx.errors import UserError, read_json
from memefx.models.module import MemeClassifier, coerce_backbone_args
from memefx.run_files import CHECKPOINTS, MANIFEST


class MemeCLI(LightningCLI):
    """LightningCLI wired to the run directory: loggers and checkpoints write there, ``RunDirectory`` owns it.

    Everything written to the folder comes from the ``RunDirectory`` callback, which a user's own
    ``LightningCLI`` or plain ``Trainer`` can add too; this class only passes it the resolved config.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="after fit, evaluate the best checkpoint on the validation and test splits")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="let fit delete an earlier run's files in the run directory (refused otherwise)")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.get("model")
        if model is not None and model.get("backbone_args"):
            # typed once, here, so the saved config.yaml holds 16, not the command line's '16'
            model["backbone_args"] = coerce_backbone_args(model["backbone"], dict(model["backbone_args"]))
        trainer = config["trainer"]
        run_dir = trainer.get("default_root_dir") or "."
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            path = str(getattr(logger, "class_path", ""))
            if path.endswith("WandbLogger") and importlib.util.find_spec("wandb") is None:
                raise UserError("the W&B logger needs the wandb package: pip install 'memefx[wandb]' "
                                "(or use --config configs/logger/csv.yaml)")
            init = getattr(logger, "init_args", None)
            if init is not None and init.get("save_dir") in (None, "."):
                init["save_dir"] = run_dir  # "." in a logger fragment means the run directory
        for callback in trainer.get("callbacks") or []:
            init = getattr(callback, "init_args", None)
            if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and init.get("dirpath") is None:
                # one fixed folder, so `--ckpt_path last` finds the checkpoint whatever the logger version
                init["dirpath"] = str(Path(run_dir) / CHECKPOINTS)

    def instantiate_trainer(self, **kwargs):
        """The trainer with a ``RunDirectory`` that holds the resolved config (LightningCLI's public hook)."""
        import yaml

        plain = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_check=True))
        if self.subcommand:
            plain = plain[self.subcommand]
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        given = init["trainer"].get("callbacks") or []
        given = list(given) if isinstance(given, list) else [given]
        owner = RunDirectory(overwrite=bool(plain.get("overwrite")), config=plain, argv=sys.argv)
        return super().instantiate_trainer(**{**kwargs, "callbacks": [*given, owner]})

    def _resolve_checkpoint(self) -> None:
        """``--ckpt_path last|best`` from the run directory's manifests, in any process.

        ``last``: the recorded checkpoint with the highest step (not the newest file time); ``best``: the file
        the ModelCheckpoint held best at its latest save. An evaluation that names neither a checkpoint nor
        ``model.backbone_args.checkpoint`` evaluates untrained weights: refused in a folder holding a fit.
        """
        stage = self.subcommand
        config = self.config_init[stage]
        given = config.get("ckpt_path")
        run_dir = Path(self.trainer.default_root_dir)
        if given in ("last", "best"):
            found = last_checkpoint(run_dir) if given == "last" else best_checkpoint(run_dir)
            if found is not None and not found.is_file():
                raise UserError(f"--ckpt_path best: the best checkpoint recorded in {run_dir} is {found}, which is "
                                "missing: pass --ckpt_path last or a checkpoint file")
            if found is not None:
                config["ckpt_path"] = str(found)
            elif stage != "fit" or given == "best":  # fit --ckpt_path last on a new folder: a fresh start
                what = "checkpoint" if given == "last" else "best checkpoint (no ModelCheckpoint chose one)"
                raise UserError(f"--ckpt_path {given}: no {what} is recorded under {run_dir} (no checkpoints/"
                                f"{MANIFEST} names one): pass the checkpoint file with --ckpt_path PATH, or check "
                                "--trainer.default_root_dir")
        elif given is None and stage != "fit" and holds_fit(run_dir):
            if not (self.model.hparams.get("backbone_args") or {}).get("checkpoint"):
                raise UserError(f"memefx {stage} without --ckpt_path evaluates the model's untrained initial weights "
                                f"and would write their results into the finished run {run_dir}: pass --ckpt_path "
                                "best, last or a checkpoint file (or another --trainer.default_root_dir)")

    def before_fit(self) -> None:
        self._resolve_checkpoint()
        # every split the command will read, before training: a bad --data.test_split fails now, not after the fit
        roles = ("train", "val", "test") if self.config["fit"].get("test_after_fit") else ("train", "val")
        self.datamodule.check_splits(roles)

    def before_validate(self) -> None:
        self._resolve_checkpoint()

    def before_test(self) -> None:
        self._resolve_checkpoint()

    def before_predict(self) -> None:
        self._resolve_checkpoint()

    def after_fit(self) -> None:
        if self.config["fit"].get("test_after_fit") and not self.trainer.fast_dev_run:
            ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
            if ckpt is None:
                rank_zero_warn("memefx: --test_after_fit: the fit saved no best checkpoint (no validation ran, or no "
                               "ModelCheckpoint): validating and testing the weights at the end of the fit")
            # validate the same checkpoint, so predictions/<val split> and miate/ match the test numbers
            self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        self._summarize()

    def after_validate(self) -> None:
        self._summarize()

    def after_test(self) -> None:
        self._summarize()

    def _summarize(self) -> None:
        """Print the metrics file this command wrote in one line, with the weights an evaluation saw."""
        owner = find(self.trainer)
        path = owner.metrics_path if owner is not None else None
        if not self.trainer.is_global_zero or path is None or not path.is_file():
            return
        metrics = read_json(path)
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if v is not None and not math.isnan(v))
        weights = "" if self.subcommand == "fit" else f" ({owner.weights(self.trainer, self.model)['description']})"
        print(f"memefx [{path}]{weights} {shown}", flush=True)


def run_lightning_cli(argv: list[str] | None) -> None:
    """``memefx fit|validate|test|predict ...`` (``argv`` None: the process's own arguments)."""
    from memefx.threads import apply_thread_default

    said = apply_thread_default()
    if said:
        rank_zero_warn(said)
    MemeCLI(
        MemeClassifier, MemeDataModule, args=argv, save_config_callback=None,
        parser_kwargs={"parser_mode": "omegaconf"}, seed_everything_default=0,
    )
