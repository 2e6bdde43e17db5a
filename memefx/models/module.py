"""MemeClassifier: the LightningModule around one backbone adapter.

Training is plain cross-entropy over two classes. Every evaluation epoch it logs AUROC/accuracy and
miATE per stratum kind (so loggers draw curves), and writes the run-directory artifacts that other tools
read with pandas alone: ``predictions/<split>.parquet`` and ``miate/<split>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import lightning as L
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from memefx.causal.miate import MiATE
from memefx.models.backbones import BackboneOutput, build_backbone
from memefx.schema import KINDS

STAGES = ("val", "test")


class MemeClassifier(L.LightningModule):
    """Binary hateful-meme classifier with miATE and prediction outputs.

    Args:
        backbone: registered family name (``memefx.models.backbones.BACKBONES``).
        backbone_args: keyword arguments of that family's adapter.
        lr: peak learning rate (AdamW), reached after a linear warm-up and followed by cosine decay.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the training steps used for warm-up.
        scheduler: ``cosine`` (warm-up + cosine) or ``constant``.
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
        scheduler: Literal["cosine", "constant"] = "cosine",
        miate_bootstrap: int = 1000,
        miate_seed: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, **(backbone_args or {}))
        self.metrics = nn.ModuleDict({
            s: MetricCollection({"auroc": BinaryAUROC(), "acc": BinaryAccuracy()}, prefix=f"{s}/") for s in STAGES
        })
        self.miate = nn.ModuleDict({
            f"{s}_{kind}": MiATE(n_bootstrap=miate_bootstrap, seed=miate_seed) for s in STAGES for kind in KINDS
        })
        self._predictions: dict[str, list[tuple[list[str], torch.Tensor, torch.Tensor]]] = {}
        self.capture_attentions = False  # set by MIDASCallback for the training step
        self.capture_eval: set[str] = set()  # evaluation stages whose forward MIDASCallback differentiates
        self.captured: dict | None = None

    # --------------------------------------------------------------------------------------- plumbing
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(dm, "tokenizer", None)
        if tokenizer is not None and len(tokenizer) > self.backbone.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the backbone's embedding table holds "
                f"{self.backbone.vocab_size}: set model.backbone_args.vocab_size >= {len(tokenizer)} "
                "(or data.vocab_size lower)"
            )

    def forward(self, batch: dict, output_attentions: bool = False) -> BackboneOutput:
        return self.backbone(batch, output_attentions=output_attentions)

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def _split_name(self, stage: str) -> str:
        dm = getattr(self.trainer, "datamodule", None)
        return dm.split_names[stage] if dm is not None and hasattr(dm, "split_names") else stage

    def on_train_start(self) -> None:
        """Resume mid-epoch: give the training loader its checkpointed position.

        ``configure_optimizers`` asks for ``estimated_stepping_batches``, which makes Lightning build the
        training loader (and its iterator) before the checkpoint's loop state is restored, so Lightning
        never hands the saved loader state over. Do it here and start the iterator again.
        """
        loop = self.trainer.fit_loop
        states, loop._combined_loader_states_to_load = loop._combined_loader_states_to_load, []
        # a state saved at the end of an epoch belongs to that epoch: the next one starts from its beginning
        if states and loop._combined_loader is not None and all(
            s.get("epoch") in (None, self.current_epoch) for s in states
        ):
            loop._combined_loader._load_state_dicts(states)
            iter(loop._data_fetcher)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # randomness of a step (dropout) depends on (seed, epoch, batch) only, not on what ran before
        # (data loader iterators, validation): a resumed run repeats an uninterrupted one
        L.seed_everything(self.hparams.seed + 1_000_003 * self.current_epoch + batch_idx, verbose=False)

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch, output_attentions=self.capture_attentions)
        loss = F.cross_entropy(out.logits, batch["labels"])
        if self.capture_attentions:  # MIDAS reads dLoss/dA from this very backward
            for attention in out.attentions:
                attention.retain_grad()
            p_gold = out.logits.detach().float().softmax(-1).gather(1, batch["labels"][:, None]).squeeze(1)
            self.captured = {"attentions": out.attentions, "segments": out.segments, "p_gold": p_gold,
                             "ids": list(batch["ids"])}
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        if stage in self.capture_eval and not self.trainer.sanity_checking:
            # MIDAS: the one eval forward keeps its graph, so the callback's backward needs no second pass
            with torch.inference_mode(False), torch.enable_grad():
                batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
                out = self(batch, output_attentions=True)
            self.captured = {"stage": stage, "out": out, "batch": batch}
            logits = out.logits.detach()
        else:
            logits = self(batch).logits
        probs = logits.float().softmax(-1)[:, 1]
        labels = batch["labels"]
        labeled = labels >= 0
        if labeled.any():
            loss = F.cross_entropy(logits[labeled], labels[labeled])
            self.log(f"{stage}/loss", loss, batch_size=int(labeled.sum()), sync_dist=True)
            self.metrics[stage].update(probs[labeled], labels[labeled])
        row_ids = torch.tensor([int(i) for i in batch["ids"]], device=probs.device)
        for kind in KINDS:
            self.miate[f"{stage}_{kind}"].update(probs, labels, batch[f"stratum_{kind.split('_')[1]}"], row_ids)
        self._predictions.setdefault(stage, []).append((list(batch["ids"]), labels.detach().cpu(), probs.detach().cpu()))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        probs = self(batch).logits.float().softmax(-1)[:, 1]
        self._predictions.setdefault("predict", []).append((list(batch["ids"]), batch["labels"].cpu(), probs.cpu()))
        return {"ids": batch["ids"], "p_hateful": probs}

    # ------------------------------------------------------------------------------------- epoch ends
    def on_validation_epoch_end(self) -> None:
        self._end_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval_epoch("test")

    def on_predict_epoch_end(self) -> None:
        self._write_predictions("predict")

    def _end_eval_epoch(self, stage: str) -> None:
        collection = self.metrics[stage]
        if any(m.update_count for m in collection.values()):  # nothing labeled: AUROC is undefined
            self.log_dict(collection.compute())
        collection.reset()
        results = {}
        for kind in KINDS:
            metric = self.miate[f"{stage}_{kind}"]
            result = metric.compute()
            metric.reset()
            results[kind] = result
            if result["n_strata"] > 0:
                self.log(f"{stage}/miate_{kind}", result["mean"])
                self.log(f"{stage}/miate_{kind}_lo", result["ci_low"])
                self.log(f"{stage}/miate_{kind}_hi", result["ci_high"])
        if self.trainer.sanity_checking:
            self._predictions.pop(stage, None)
            return
        if self.trainer.is_global_zero:
            self._write_json(f"miate/{self._split_name(stage)}.json", {
                "split": self._split_name(stage), "epoch": self.current_epoch, "stage": stage, **results,
            })
        self._write_predictions(stage)

    def _write_json(self, relative: str, payload: dict) -> None:
        path = self.run_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))

    def _write_predictions(self, stage: str) -> None:
        """Gather (id, label, p_hateful) from every rank; rank 0 writes one row per id."""
        chunks = self._predictions.pop(stage, [])
        ids = [i for c in chunks for i in c[0]]
        labels = torch.cat([c[1] for c in chunks]).tolist() if chunks else []
        probs = torch.cat([c[2] for c in chunks]).tolist() if chunks else []
        rows = list(zip(ids, labels, probs))
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not self.trainer.is_global_zero:
            return
        frame = pd.DataFrame(rows, columns=["id", "label", "p_hateful"])
        frame = frame.drop_duplicates("id").sort_values("id").reset_index(drop=True)  # DDP sampler padding
        path = self.run_dir / "predictions" / f"{self._split_name(stage)}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)

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
        schedule = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [torch.optim.lr_scheduler.LinearLR(optimizer, 1e-3, 1.0, warmup),
             torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total - warmup))],
            milestones=[warmup],
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
