"""MemeClassifier: the LightningModule around one backbone adapter.

Training is plain cross-entropy over two classes. Every evaluation epoch it logs AUROC/accuracy and
miATE per stratum kind and split (so loggers draw curves). It writes nothing to disk: evaluation steps
return ``EvalStepOutput`` (id, label, p_hateful, split, and the attention capture MIDAS asked for) and the
miATE results wait in ``evaluation_results()`` for the ``RunDirectory`` callback, the one owner of the run
directory: the contract of ``memefx.contract``, which any LightningModule can implement.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.aggregation import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from memefx.causal.miate_metric import MiATE
from memefx.contract import EvalCapture, EvalStepOutput, SplitData, TrainCapture
from memefx.errors import UserError
from memefx.lightning_internals import attached_trainer, restore_loader_position
from memefx.models.backbones import BACKBONES, BackboneOutput, build_backbone
from memefx.schema import KINDS, STRATUM_COLUMN


def coerce_backbone_args(name: str, args: dict | None) -> dict:
    """Convert string values (a command-line ``--model.backbone_args.X 64``) to the adapter's annotated
    types, and name unknown keys: the dict is untyped for the CLI parser, the adapter's signature is not."""
    args = dict(args or {})
    cls = BACKBONES.get(name)
    if cls is None:
        return args
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise UserError(f"model.backbone_args: unknown keys {unknown} for backbone {name!r}; "
                            f"known: {sorted(k for k in params if k != 'self')}")
    hints = typing.get_type_hints(cls.__init__)
    for key, value in args.items():
        if isinstance(value, str) and key in hints:
            args[key] = _from_string(value, hints[key], key)
    return args


def _from_string(value: str, hint, key: str):
    """``value`` as the first of the annotated types (int, float, bool, None) that parses it."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if str in options:
        return value
    for option in options:
        try:
            if option is bool and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if option in (int, float):
                return option(value)
            if option is type(None) and value.lower() in ("null", "none"):
                return None
        except ValueError:
            continue
    raise UserError(f"model.backbone_args.{key}={value!r}: expected {hint}")


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor of transformers' ``get_linear_schedule_with_warmup`` (what Vilio trains with)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


class MemeClassifier(L.LightningModule):
    """Binary hateful-meme classifier with miATE and prediction outputs.

    Args:
        backbone: registered family name (``memefx.models.backbones.BACKBONES``).
        backbone_args: keyword arguments of that family's adapter.
        lr: peak learning rate (AdamW), reached after a linear warm-up and followed by cosine decay.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the training steps used for warm-up.
        scheduler: ``cosine`` (warm-up + cosine), ``linear`` (warm-up + linear decay to 0, Vilio's
            ``get_linear_schedule_with_warmup``) or ``constant``.
        miate_bootstrap: stratum-bootstrap resamples for the miATE interval.
        miate_seed: seed of the bootstrap (recorded with each result).
        seed: every training step starts from a seed fixed by (seed, epoch, batch index), so dropout
            does not depend on what ran before and a resumed run repeats an uninterrupted one.
    """

    def __init__(
        self,
        backbone: str = "visualbert",
        backbone_args: dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        miate_bootstrap: int = 1000,
        miate_seed: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, **coerce_backbone_args(backbone, backbone_args))
        # one set of metrics per (stage, split), made when a split is first seen (several test splits a run)
        self.evaluators = nn.ModuleDict()
        self._results: dict[str, dict] = {}  # split -> {stage, miate per kind}: evaluation_results()
        self._stage_splits: dict[str, list[str]] = {}
        self._skips_said: set[tuple[str, str]] = set()
        # attention capture (memefx.contract.AttentionCapture): what MIDAS asked for, and what a step kept
        self._capture_train = False
        self._capture_eval: frozenset[str] = frozenset()
        self._kept: TrainCapture | None = None

    # ------------------------------------------------------------------------------------ the contract
    def request_capture(self, train: bool, eval_stages=()) -> None:
        """Keep the next training step's attention maps (``train``), and every step's of ``eval_stages``."""
        self._capture_train, self._capture_eval = bool(train), frozenset(eval_stages)

    def pop_capture(self) -> TrainCapture | None:
        """The training step's kept maps (evaluation steps return theirs in their output), then forgotten."""
        kept, self._kept = self._kept, None
        return kept

    def evaluation_results(self) -> dict[str, dict]:
        """split -> miATE per stratum kind (with split and stage) of the latest evaluation epoch of each split."""
        return dict(self._results)

    # --------------------------------------------------------------------------------------- plumbing
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if attached_trainer(self) is not None else None
        tokenizer = getattr(dm, "tokenizer", None)
        if tokenizer is not None and len(tokenizer) > self.backbone.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the backbone's embedding table holds "
                f"{self.backbone.vocab_size}: set model.backbone_args.vocab_size >= {len(tokenizer)} "
                "(or data.vocab_size lower)"
            )
        if stage == "fit":
            self._check_monitored()

    def _check_monitored(self) -> None:
        """Refuse, before training, a callback monitoring a validation metric the validation split never gives.

        An unlabeled split logs no ``val/*`` metric and a one-class split no AUROC/accuracy; Lightning would
        only fail after epoch 0 ("could not find the monitored key"), with the run folder half written.
        """
        dm = self._split_data()
        if dm is None or not self.trainer.limit_val_batches:
            return
        split = dm.eval_splits("val")[0]
        counts = dm.label_counts(split)
        if counts is None:
            return
        positives, negatives, total = counts
        if positives and negatives:
            return
        for callback in self.trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            if not isinstance(monitor, str) or not monitor.startswith("val/"):
                continue
            if positives + negatives == 0:
                why = f"has no labels ({total} memes): it logs no val/ metric"
            elif monitor.split("/")[-1] in ("auroc", "acc"):
                why = f"has one class only ({positives} hateful, {negatives} benign): it logs no AUROC or accuracy"
            else:
                continue
            raise UserError(
                f"{type(callback).__name__} monitors {monitor!r}, but the validation split {split!r} {why}: validate "
                "on a labeled split (--data.val_split NAME, or --data.val_from_train 0.1) or monitor another metric")

    def log(self, name: str, value, *args, **kwargs) -> None:
        """``LightningModule.log``; a validation outside a fit reaches the loggers as ``val_ckpt/...``.

        ``memefx validate`` and the best checkpoint re-validated after a fit are not one more epoch: under the
        fit's ``val/*`` names, W&B and the CSV logger would draw them as a repeated last point of the per-epoch
        curves. Callbacks, the progress bar and ``metrics.json`` still see the ``val/*`` names.
        """
        renamed = self._checkpoint_name(name) if not args else None
        if renamed is None:
            return super().log(name, value, *args, **kwargs)
        super().log(name, value, **{**kwargs, "logger": False})
        super().log(renamed, value, **{**kwargs, "logger": True, "prog_bar": False})

    def _outside_fit(self) -> bool:
        return attached_trainer(self) is not None and self.trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING)

    def _checkpoint_name(self, name: str) -> str | None:
        """The logger name of a validation metric logged outside a fit (``None``: keep the name)."""
        if not self._outside_fit() or self.trainer.state.fn != TrainerFn.VALIDATING:
            return None
        for prefix in ("val/", "midas/val_"):
            if name.startswith(prefix):
                return prefix.rstrip("/_") + "_ckpt" + prefix[-1] + name[len(prefix):]
        return None

    def _split_data(self) -> SplitData | None:
        """The trainer's data module when it names its splits (``memefx.contract.SplitData``), else None."""
        dm = getattr(self.trainer, "datamodule", None) if attached_trainer(self) is not None else None
        return dm if isinstance(dm, SplitData) else None

    def forward(self, batch: dict, output_attentions: bool = False) -> BackboneOutput:
        return self.backbone(batch, output_attentions=output_attentions)

    def _split_of(self, batch: dict, stage: str) -> str:
        """The split a batch comes from: its own ``split`` key, else the data module's split of the stage."""
        if "split" in batch:
            return str(batch["split"])
        dm = self._split_data()
        return dm.eval_splits(stage)[0] if dm is not None else stage

    def _evaluator(self, stage: str, split: str) -> nn.ModuleDict:
        key = f"{stage}__{split}"
        if key not in self.evaluators:
            hp = self.hparams
            self.evaluators[key] = nn.ModuleDict({
                # unlabeled memes (-1) are left out by the metrics themselves
                "metrics": MetricCollection({"auroc": BinaryAUROC(ignore_index=-1), "acc": BinaryAccuracy(ignore_index=-1)}),
                "positives": SumMetric(), "negatives": SumMetric(), "loss": MeanMetric(),
                **{kind: MiATE(n_bootstrap=hp.miate_bootstrap, seed=hp.miate_seed) for kind in KINDS},
            }).to(self.device)
            self._stage_splits.setdefault(stage, []).append(split)
        return self.evaluators[key]

    def on_train_start(self) -> None:
        """Resume mid-epoch: the training loader gets its checkpointed position (Lightning does not hand it
        over here: see ``memefx.lightning_internals``)."""
        restore_loader_position(self.trainer, self.current_epoch)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # randomness of a step (dropout) depends on (seed, epoch, batch) only, not on what ran before
        # (data loader iterators, validation): a resumed run repeats an uninterrupted one
        L.seed_everything(self.hparams.seed + 1_000_003 * self.current_epoch + batch_idx, verbose=False)

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch, output_attentions=self._capture_train)
        loss = F.cross_entropy(out.logits, batch["labels"])
        if self._capture_train:  # MIDAS hooks these maps and reduces dLoss/dA inside this very backward
            p_gold = out.logits.detach().float().softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
            self._kept = TrainCapture(out.attentions, out.segments, p_gold, list(batch["ids"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _eval_step(self, batch: dict, stage: str) -> EvalStepOutput:
        capture = None
        if stage in self._capture_eval and not self.trainer.sanity_checking:
            # MIDAS: the one eval forward keeps its graph, so the callback's backward needs no second pass
            with torch.inference_mode(False), torch.enable_grad():
                batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
                out = self(batch, output_attentions=True)
            capture = EvalCapture(stage, out.logits, out.attentions, out.segments, batch["labels"], list(batch["ids"]))
            logits = out.logits.detach()
        else:
            logits = self(batch).logits
        probs = logits.float().softmax(-1)[:, 1]
        labels = batch["labels"]
        split = self._split_of(batch, stage)
        ev = self._evaluator(stage, split)
        labeled = labels >= 0
        ev["positives"].update((labels == 1).sum().float())
        ev["negatives"].update((labels == 0).sum().float())
        if labeled.any():
            # a sample-weighted mean over every rank (not a mean of per-rank means)
            ev["loss"].update(F.cross_entropy(logits[labeled], labels[labeled]), weight=int(labeled.sum()))
            ev["metrics"].update(probs, labels)
        row_ids = torch.tensor([int(i) for i in batch["ids"]], device=probs.device)
        for kind in KINDS:
            ev[kind].update(probs, labels, batch[STRATUM_COLUMN[kind]], row_ids)
        return EvalStepOutput(list(batch["ids"]), labels.detach().cpu(), probs.detach().cpu(), split, capture)

    def _key(self, stage: str, split: str, name: str) -> str:
        """``val/auroc`` for a stage's only split; ``test/<split>/auroc`` when a stage has several."""
        dm = self._split_data()
        splits = dm.eval_splits(stage) if dm is not None else self._stage_splits.get(stage, [])
        return f"{stage}/{name}" if len(splits) <= 1 else f"{stage}/{split}/{name}"

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> EvalStepOutput:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> EvalStepOutput:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> EvalStepOutput:
        probs = self(batch).logits.float().softmax(-1)[:, 1]
        return EvalStepOutput(list(batch["ids"]), batch["labels"].cpu(), probs.cpu(), self._split_of(batch, "predict"))

    # ------------------------------------------------------------------------------------- epoch ends
    def on_validation_epoch_end(self) -> None:
        self._end_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval_epoch("test")

    def _end_eval_epoch(self, stage: str) -> None:
        if self._outside_fit():
            # logged at the fit's last step with no epoch: Lightning would stamp the epoch counter's final value,
            # an epoch that never trained (MIDAS's values logged in the same hook share the step)
            super().log("step", float(self.trainer.global_step))
        for split in self._stage_splits.get(stage, []):
            ev = self.evaluators[f"{stage}__{split}"]
            positives, negatives = int(ev["positives"].compute()), int(ev["negatives"].compute())
            if positives + negatives:
                self.log(self._key(stage, split, "loss"), ev["loss"].compute(), add_dataloader_idx=False)
            if positives and negatives:
                for name, value in ev["metrics"].compute().items():
                    self.log(self._key(stage, split, name), value, add_dataloader_idx=False)
            elif not self.trainer.sanity_checking:
                self._say_once(stage, split, positives, negatives)
            results = {}
            for kind in KINDS:
                results[kind] = result = ev[kind].compute()
                if result["n_strata"] > 0:
                    for suffix, key in (("", "mean"), ("_lo", "ci_low"), ("_hi", "ci_high")):
                        self.log(self._key(stage, split, f"miate_{kind}{suffix}"), result[key],
                                 add_dataloader_idx=False)
            for metric in ev.values():
                metric.reset()
            if not self.trainer.sanity_checking:
                self._results[split] = {"split": split, "stage": stage, **results}

    def _say_once(self, stage: str, split: str, positives: int, negatives: int) -> None:
        """An unlabeled or one-class split has no AUROC: say so once a run, never log a made-up 0."""
        if (stage, split) in self._skips_said:
            return
        self._skips_said.add((stage, split))
        what = "has no labels" if positives + negatives == 0 else f"has one class only ({positives} hateful, {negatives} benign)"
        rank_zero_info(f"memefx: {stage} split {split!r} {what}: AUROC/accuracy not computed"
                       + ("" if positives + negatives else ", miATE skipped") + "; predictions are still written")

    # ------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        if self.hparams.scheduler == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_ratio * total))
        if self.hparams.scheduler == "linear":  # lr * step / warmup, then lr * (total - step) / (total - warmup)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: linear_warmup_decay(step, warmup, total))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        schedule = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [torch.optim.lr_scheduler.LinearLR(optimizer, 1e-3, 1.0, warmup),
             torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total - warmup))],
            milestones=[warmup],
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
