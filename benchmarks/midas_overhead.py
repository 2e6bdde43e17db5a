"""MIDAS cost and fidelity on a BERT-base-shaped backbone, measured side by side in one run.

Prints
  midas_overhead_ratio=    epoch time (train + val) with MIDASCallback over the same epoch without it
  ig_over_single_ratio=    layer-wise integrated gradients (m steps) over single-gradient MIDAS, same samples
  single_vs_ig_spearman=   rank agreement of attattr block scores (samples x heads x blocks), mean over layers
Medians of --repeats alternating runs. Timings are wall-clock on a shared machine: read them as ratios.

    python benchmarks/midas_overhead.py [--repeats 3] [--train-batches 12] [--val-batches 6]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import lightning as L
import numpy as np
import torch
from scipy.stats import spearmanr

from memefx.attribution.integrated import integrated_attattr
from memefx.attribution.midas import reduce_layers, target_classes
from memefx.callbacks.midas import MIDASCallback
from memefx.data.datamodule import MemeDataModule
from memefx.models.module import MemeClassifier

BERT_BASE = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072, "vocab_size": 4096}


def _epoch_time(dm, with_midas: bool, args) -> float:
    torch.manual_seed(0)
    model = MemeClassifier(backbone="caption_pair", backbone_args=BERT_BASE, lr=1e-5, miate_bootstrap=100)
    callbacks = [MIDASCallback(stages=["train", "val"])] if with_midas else []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(default_root_dir=tmp, accelerator="cpu", max_epochs=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_train_batches=args.train_batches,
                            limit_val_batches=args.val_batches, callbacks=callbacks)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        return time.perf_counter() - start


def _fidelity(dm, args) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = MemeClassifier(backbone="caption_pair", backbone_args=BERT_BASE).backbone.eval()
    batch = next(iter(dm.val_dataloader()))
    batch = {k: (v[: args.ig_samples] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
    start = time.perf_counter()
    with torch.enable_grad():
        out = model(batch, output_attentions=True)
        probs = out.logits.float().softmax(-1)
        tgt = target_classes(probs.detach(), batch["labels"], "gold")
        grads = torch.autograd.grad(probs.gather(1, tgt[:, None]).sum(), out.attentions)
    single = reduce_layers(out.attentions, grads, out.segments, ["attattr"])["attattr"].numpy()
    t_single = time.perf_counter() - start
    start = time.perf_counter()
    ig = [integrated_attattr(model, batch, layer, steps=args.ig_steps, chunk=args.ig_chunk)["block"].numpy()
          for layer in range(model.num_layers)]
    t_ig = time.perf_counter() - start
    rhos = [spearmanr(single[:, layer].ravel(), ig[layer].ravel()).statistic for layer in range(model.num_layers)]
    return t_ig / t_single, float(np.nanmean(rhos)), float(np.nanmin(rhos))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-batches", type=int, default=12)
    p.add_argument("--val-batches", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--ig-samples", type=int, default=8)
    p.add_argument("--ig-steps", type=int, default=20)
    p.add_argument("--ig-chunk", type=int, default=40)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MEMEFX_CACHE", os.path.join(tempfile.gettempdir(), "memefx-bench-cache"))
    dm = MemeDataModule(image_side="caption", caption_column="text", max_length=args.max_length,
                        batch_size=args.batch_size, synthetic={"n_memes": 2000, "seed": 0})
    dm.prepare_data()
    dm.setup("fit")
    plain, midas = [], []
    for _ in range(args.repeats):  # alternate so drifts in machine load hit both alike
        plain.append(_epoch_time(dm, False, args))
        midas.append(_epoch_time(dm, True, args))
    ratios = [m / q for m, q in zip(midas, plain)]
    print(f"epoch_s_plain={np.median(plain):.2f} epoch_s_midas={np.median(midas):.2f} "
          f"(train {args.train_batches} x {args.batch_size}, val {args.val_batches} x {args.batch_size}, "
          f"{args.max_length} tokens, {args.repeats} repeats)")
    print(f"midas_overhead_ratio={np.median(ratios):.3f}  (per repeat: {', '.join(f'{r:.3f}' for r in ratios)})")
    fid = [_fidelity(dm, args) for _ in range(max(1, args.repeats // 2))]
    print(f"ig_over_single_ratio={np.median([f[0] for f in fid]):.1f}  (m={args.ig_steps}, {args.ig_samples} samples, all layers)")
    print(f"single_vs_ig_spearman={np.median([f[1] for f in fid]):.3f}  (worst layer {min(f[2] for f in fid):.3f})")


if __name__ == "__main__":
    main()
