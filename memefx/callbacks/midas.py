"""MIDASCallback: per-epoch attention attribution collected during training and evaluation.

Train stage: the training step's forward keeps its attention maps (eager path, for the captured steps
only) and this callback hooks them before the training backward, so that backward itself hands each
layer's dLoss/dA to a reduction into block sums (no retained gradient, no extra pass); the sums are
then rescaled exactly into each sample's gradient of its gold-class probability (AMP loss scale and
gradient accumulation undone). ``train_every_n_steps=N`` captures one training batch in N; every other
step runs the backbone's fast (SDPA) path untouched.
Evaluation stages: the evaluation step's own forward keeps its graph (with attention capture) and this
callback runs one backward of sum_b F_b per batch: no second forward.
Only (samples x layers x heads x blocks) sums survive a step; they stay on the device until the epoch's
table is written, once, to ``<run dir>/midas/<stage>_epoch<k>.parquet``; a checkpoint carries the
unfinished epoch.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from memefx.attribution.midas import (
    SCORES,
    BackwardBlockReducer,
    block_summary,
    loss_grad_factor,
    target_classes,
    to_table,
)
from memefx.callbacks.run_directory import midas_table_path
from memefx.contract import AttentionCapture, EvalCapture, TrainCapture

PLAIN = ("ids", "layers", "epoch", "batches")  # buffer entries that are not lists of tensors


class MIDASCallback(Callback):
    """Collect MIDAS block sums every epoch.

    Args:
        stages: any of ``train``, ``val``, ``test``.
        target: class attributed in evaluation stages: ``gold`` (pred where unlabeled), ``pred`` or
            ``hateful``. The train stage always uses the gold class (that is what the loss holds).
        layers: layer indices to keep (``None``: all).
        scores: subset of ``attention``, ``gradient``, ``attattr``.
        train_every_n_steps: capture training batches 0, N, 2N, ... of each epoch only (1: every batch).
            The epoch's train table then holds the samples of those batches, and its summaries average
            over them; the parquet metadata (``DataFrame.attrs["midas"]``) records N and the batch count.
    """

    def __init__(self, stages: list[str] | tuple[str, ...] = ("train", "val"), target: str = "gold",
                 layers: list[int] | None = None, scores: list[str] | tuple[str, ...] = SCORES,
                 train_every_n_steps: int = 1):
        super().__init__()
        unknown = set(stages) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"MIDASCallback stages {sorted(unknown)}: expected train, val or test")
        target_classes(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), target)  # validates the name
        if set(scores) - set(SCORES) or not scores:
            raise ValueError(f"MIDASCallback scores {list(scores)}: expected a non-empty subset of {SCORES}")
        if int(train_every_n_steps) < 1:
            raise ValueError(f"MIDASCallback train_every_n_steps={train_every_n_steps}: expected an integer >= 1")
        self.stages, self.target, self.layers, self.scores = tuple(stages), target, layers, tuple(scores)
        self.train_every_n_steps = int(train_every_n_steps)
        self._buffers: dict[str, dict[str, list]] = {}
        self._reducer: BackwardBlockReducer | None = None
        self._captured: dict | None = None
        self._weights_epoch: int | None = None  # epoch of the checkpoint an evaluation loaded
        self._trained_epoch: int | None = None  # last epoch trained in this process

    # ------------------------------------------------------------------------------------ the contract
    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(pl_module, AttentionCapture):
            raise TypeError(f"MIDASCallback needs a LightningModule with request_capture() and pop_capture() "
                            f"(memefx.contract.AttentionCapture); {type(pl_module).__name__} has "
                            f"{[m for m in ('request_capture', 'pop_capture') if hasattr(pl_module, m)] or 'neither'}")
        self._weights_epoch = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._weights_epoch = int(checkpoint["epoch"]) if "epoch" in checkpoint else None

    def _evaluated_epoch(self) -> int | None:
        """Outside a fit: the loaded checkpoint's epoch, else the last epoch this process trained (None: the
        weights the model was built with)."""
        return self._weights_epoch if self._weights_epoch is not None else self._trained_epoch

    def _request(self, pl_module, train: bool = False) -> None:
        pl_module.request_capture(train, [s for s in self.stages if s != "train"])

    # ------------------------------------------------------------------------------------ collection
    def _keep(self, attentions):
        n = len(attentions)
        layers = [i % n for i in self.layers] if self.layers is not None else list(range(n))
        return layers, [attentions[i] for i in layers]

    def _add(self, stage: str, epoch: int, ids: list[str], reduced: dict[str, torch.Tensor], layers: list[int]) -> None:
        """Append one batch's sums, left on their device (no host sync per step)."""
        buf = self._buffers.setdefault(stage, {"ids": [], "layers": layers, "epoch": epoch, "batches": 0,
                                               **{k: [] for k in reduced}})
        buf["ids"].extend(ids)
        buf["batches"] += 1
        for key, value in reduced.items():
            buf[key].append(value.detach())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._flush_stale(trainer, pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._request(pl_module)
        self._flush_stale(trainer, pl_module)

    def _flush_stale(self, trainer, pl_module) -> None:
        """A checkpoint taken after validation but before the epoch's end holds a complete earlier
        epoch: write it under its own epoch before collecting the new one (resume after a kill)."""
        for stage in [s for s, b in self._buffers.items() if b.get("epoch", trainer.current_epoch) < trainer.current_epoch]:
            self._flush(stage, trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._drop_reducer()  # left over only if the previous backward raised
        self._request(pl_module, "train" in self.stages and batch_idx % self.train_every_n_steps == 0)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """Hook the captured attention maps so the training backward reduces their gradients in passing."""
        captured = pl_module.pop_capture()
        if not isinstance(captured, TrainCapture):
            return
        layers, attentions = self._keep(captured.attentions)
        self._reducer = BackwardBlockReducer(attentions, captured.segments, self.scores)
        self._captured = {"layers": layers, "p_gold": captured.p_gold, "ids": captured.ids}

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reducer, captured = self._reducer, self._captured
        if reducer is None:
            return
        self._drop_reducer()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None else 1.0
        factor = loss_grad_factor(captured["p_gold"], len(captured["ids"]), loss_scale, trainer.accumulate_grad_batches)
        self._add("train", trainer.current_epoch, captured["ids"], reducer.result(factor), captured["layers"])

    def _drop_reducer(self) -> None:
        if self._reducer is not None:
            self._reducer.remove()
        self._reducer, self._captured = None, None

    def _eval_batch(self, stage: str, trainer, outputs) -> None:
        captured = getattr(outputs, "capture", None)  # EvalStepOutput.capture: what the step kept for MIDAS
        if stage not in self.stages or trainer.sanity_checking or not isinstance(captured, EvalCapture) \
                or captured.stage != stage:
            return
        layers, attentions = self._keep(captured.attentions)
        reducer = BackwardBlockReducer(attentions, captured.segments, self.scores)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                probs = captured.logits.float().softmax(-1)
                tgt = target_classes(probs.detach(), captured.labels, self.target)
                f = probs.gather(1, tgt[:, None]).sum()  # samples do not interact: one backward for all
                # differentiating down to the earliest kept layer runs every kept layer's hook on the way;
                # only that one gradient is returned (and dropped), none is kept per layer
                torch.autograd.grad(f, attentions[int(np.argmin(layers))])
        finally:
            reducer.remove()
        self._add(stage, trainer.current_epoch, captured.ids, reducer.result(), layers)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch("val", trainer, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch("test", trainer, outputs)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._request(pl_module)

    # ------------------------------------------------------------------------------------ epoch ends
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._request(pl_module, False)
        self._trained_epoch = trainer.current_epoch
        self._flush("train", trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.request_capture(False, [])
        if not trainer.sanity_checking:
            self._flush("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        pl_module.request_capture(False, [])
        self._flush("test", trainer, pl_module)

    def _flush(self, stage: str, trainer, pl_module) -> None:
        buf = self._buffers.pop(stage, None)
        table = None
        # the file and the epoch whose weights were evaluated (a fit's epoch, or a checkpoint's)
        path, epoch = midas_table_path(trainer, stage, trainer.current_epoch if buf is None else buf["epoch"],
                                       self._evaluated_epoch())
        epoch = -1 if epoch is None else epoch  # -1: untrained weights
        batches = 0
        if buf is not None:  # one host transfer per epoch and stage
            reduced = {k: torch.cat([x.cpu() for x in buf[k]]).double().numpy() for k in (*self.scores, "count")}
            table = to_table(buf["ids"], reduced, epoch, stage, buf["layers"])
            batches = buf["batches"]
        if trainer.world_size > 1:
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, (table, batches))
            batches = sum(p[1] for p in parts)
            parts = [p[0] for p in parts if p[0] is not None]
            table = pd.concat(parts, ignore_index=True) if parts else None
        if table is None or table.empty:
            return
        # DistributedSampler pads with repeated samples: keep each id once (one process holds no repeats)
        first = table.drop_duplicates(["id", "layer", "head", "block", "score"]) if trainer.world_size > 1 else table
        first.attrs["midas"] = {"every_n_steps": self.train_every_n_steps if stage == "train" else 1,
                                "captured_batches": int(batches), "target": "gold" if stage == "train" else self.target}
        summary = block_summary(first)
        for row in summary[summary.score == "attattr"].itertuples():
            pl_module.log(f"midas/{stage}_attattr_{row.block}", float(row.mean), rank_zero_only=True, sync_dist=False)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            first.to_parquet(path, index=False)
            self._log_heatmap(trainer, first, stage)

    def _log_heatmap(self, trainer, table: pd.DataFrame, stage: str) -> None:
        """Layer x head heatmap of the cross-block attattr mean, for loggers that take images (W&B)."""
        loggers = [lg for lg in trainer.loggers if hasattr(lg, "log_image")]
        if not loggers:
            return
        grid = block_summary(table[(table.score == "attattr") & (table.block == "cross")], by=("layer", "head"))
        image = grid.pivot(index="layer", columns="head", values="mean").to_numpy()
        lo, hi = np.nanmin(image), np.nanmax(image)
        scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
        # a validation outside a fit (a checkpoint re-validated) is no epoch of the fit's curves: its own key
        name = f"{stage}_ckpt" if stage == "val" and trainer.state.fn == "validate" else stage
        for logger in loggers:
            logger.log_image(key=f"midas/{name}_cross_heatmap", images=[scaled], step=trainer.global_step)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The unfinished epoch's sums, so a resumed run writes the same tables as an uninterrupted one.

        Sums are stored as CPU tensors: checkpoints load with ``torch.load(weights_only=True)``.
        """
        return {"buffers": {s: {k: (v if k in PLAIN else [x.detach().cpu() for x in v]) for k, v in buf.items()}
                            for s, buf in self._buffers.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._buffers = {s: {k: (v if k in PLAIN else [torch.as_tensor(x) for x in v]) for k, v in buf.items()}
                         for s, buf in state_dict.get("buffers", {}).items()}
        for buf in self._buffers.values():
            buf.setdefault("batches", 0)  # checkpoints of earlier versions
