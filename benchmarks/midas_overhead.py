"""MIDAS cost against what a user would otherwise run, and its fidelity, measured side by side in one run.

Configurations, all trained by Lightning on the same batches (random tokens, every sequence exactly
``length`` positions: [CLS] text [SEP] description [SEP] plus some padding):
  plain   a user's own LightningModule: a transformers BERT with SDPA attention, a linear head, AdamW
  off     memefx MemeClassifier (caption_pair backbone, SDPA), no MIDAS
  midas   the same with MIDASCallback(stages=[train, val]) capturing every training batch
  n10     the same with train_every_n_steps=10
  eager   memefx with attn_implementation=eager (every forward materializes attention maps), no MIDAS
Each repeat runs one short block per configuration, in rotated order, on the same batches; the first
training step of a block is a warm-up and is not timed. A block's cost is an epoch estimate: mean train
step x train batches + mean val step x val batches of an HMC epoch (8500 train, 500 dev_seen memes),
plus the table writing measured once per block and scaled to the epoch. Ratios are formed within a
repeat (paired), and the median over repeats is printed with its min-max spread.

Prints, per length (``length=``), then the fidelity lines:
  midas_overhead_ratio=  midas over plain (the last such line, at the longest length, is the headline)
  midas_n10_ratio=       n10 over plain
  midas_off_ratio=       off over plain (memefx without MIDAS against a plain SDPA Lightning step)
  eager_over_sdpa=       eager over off
  train_step_ratio= / val_step_ratio=   midas over plain, per training / validation step
  peak_memory_ratio=     midas over plain, peak memory of a training step (GPU: allocator peak;
                         CPU: resident-set growth during the step, sampled every 2 ms)
  ig_over_single_ratio=  layer-wise integrated gradients (m steps) over single-gradient MIDAS, same samples
  single_vs_ig_spearman= rank agreement of attattr block scores (samples x heads x blocks), mean over layers

    python benchmarks/midas_overhead.py [--shape bert-base] [--lengths 64 128] [--batch-size 16] [--repeats 5]
    python benchmarks/midas_overhead.py --accelerator gpu --precision bf16-mixed --batch-size 64 --lengths 128
    python benchmarks/midas_overhead.py --profile    # torch.profiler breakdown of one captured training step
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
import warnings

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from scipy.stats import spearmanr
from torch import nn
from transformers import BertConfig, BertModel

from memefx.attribution.integrated import integrated_attattr
from memefx.attribution.midas import reduce_layers, target_classes
from memefx.callbacks.midas import MIDASCallback
from memefx.models.module import MemeClassifier
from memefx.schema import IMAGE, PAD, SPECIAL, TEXT

SHAPES = {
    "bert-base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072},
    "minilm": {"hidden_size": 384, "num_layers": 6, "num_heads": 12, "intermediate_size": 1536},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
}
VOCAB = 4096
HMC_TRAIN, HMC_VAL = 8500, 500
CONFIGS = ("plain", "off", "midas", "n10", "eager")


# ------------------------------------------------------------------------------------------ data
def make_batches(n: int, batch_size: int, length: int, seed: int) -> list[dict]:
    """Collated caption-pair batches of exactly ``length`` positions, as memefx's collator lays them out."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        ids = torch.randint(5, VOCAB, (batch_size, length), generator=g)
        segments = torch.full((batch_size, length), PAD)
        types = torch.zeros(batch_size, length, dtype=torch.long)
        for b in range(batch_size):
            used = length - int(torch.randint(0, max(1, length // 8), (1,), generator=g))  # some padding
            split = int(torch.randint(used // 4, max(used // 4 + 1, 3 * used // 4), (1,), generator=g))
            segments[b, :used] = TEXT
            segments[b, split:used] = IMAGE
            types[b, split:used] = 1
            for pos in (0, split - 1, used - 1):
                segments[b, pos] = SPECIAL
        ids[segments == PAD] = 0
        labels = torch.randint(0, 2, (batch_size,), generator=g)
        strata = torch.arange(batch_size) // 2 + k * batch_size
        out.append({"input_ids": ids, "attention_mask": (segments != PAD).long(), "token_type_ids": types,
                    "segments": segments, "labels": labels, "ids": [f"{k * batch_size + b:05d}" for b in range(batch_size)],
                    "stratum_image": strata, "stratum_text": torch.full((batch_size,), -1)})
    return out


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _loader(batches):
    return torch.utils.data.DataLoader(_Batches(batches), batch_size=None, shuffle=False)


# ------------------------------------------------------------------------------------------ models
class PlainSDPA(L.LightningModule):
    """What a user writes without memefx: a transformers BERT (SDPA), a linear head on [CLS], AdamW."""

    def __init__(self, shape: dict, max_position: int, lr: float = 1e-5):
        super().__init__()
        config = BertConfig(vocab_size=VOCAB, hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_layers"],
                            num_attention_heads=shape["num_heads"], intermediate_size=shape["intermediate_size"],
                            max_position_embeddings=max_position, attn_implementation="sdpa")
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(shape["hidden_size"], 2))
        self.lr = lr

    def _logits(self, batch):
        out = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"])
        return self.head(out.last_hidden_state[:, 0])

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self._logits(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self._logits(batch), batch["labels"]), batch_size=len(batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


# ------------------------------------------------------------------------------------------ probes
class _PeakRSS:
    """Resident-set peak, sampled by a background thread (CPU runs: there is no allocator counter)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, False
        self._page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def reset(self) -> int:
        now = self.rss()
        self.peak = now
        return now


class StepProbe(Callback):
    """Wall time of every training / validation batch (hooks to hooks), and the peak memory of each
    training step above its start. Listed after MIDASCallback, so its batch ends come after MIDAS's."""

    def __init__(self, cuda: bool, rss: _PeakRSS | None):
        self.cuda, self.rss = cuda, rss
        self.train, self.val, self.memory = [], [], []

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif self.rss is not None:
            self._base = self.rss.reset()
        self._t = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(self._now() - self._t)
        if self.cuda:
            self.memory.append(torch.cuda.max_memory_allocated() - self._base)
        elif self.rss is not None:
            self.memory.append(self.rss.peak - self._base)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._tv = self._now()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.append(self._now() - self._tv)


def _timed_flush(midas: MIDASCallback, spent: list) -> None:
    flush = midas._flush

    def timed(*args, **kwargs):
        start = time.perf_counter()
        flush(*args, **kwargs)
        spent.append(time.perf_counter() - start)

    midas._flush = timed


# ------------------------------------------------------------------------------------------ blocks
def _block(config: str, models: dict, train, val, args, rss) -> dict:
    """One fit of ``config`` over the given batches; per-step times, memory and table-writing time."""
    cuda = args.accelerator == "gpu"
    probe, callbacks, flush = StepProbe(cuda, rss), [], []
    if config in ("midas", "n10"):
        midas = MIDASCallback(stages=["train", "val"], train_every_n_steps=10 if config == "n10" else 1)
        _timed_flush(midas, flush)
        callbacks.append(midas)
    model = models["plain"] if config == "plain" else models["memefx"]
    if config != "plain":
        model.backbone.encoder.config._attn_implementation = "eager" if config == "eager" else "sdpa"
    n_train = (args.n10_steps if config == "n10" else args.train_steps) + 1
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(default_root_dir=tmp, accelerator=args.accelerator, devices=1, precision=args.precision,
                            max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=n_train,
                            limit_val_batches=args.val_steps, callbacks=[*callbacks, probe])
        trainer.fit(model, train_dataloaders=_loader(train[:n_train]), val_dataloaders=_loader(val))
    samples = (n_train - 1) * args.batch_size  # table writing scales with the samples held
    return {"train": float(np.mean(probe.train[1:])), "val": float(np.mean(probe.val)),
            "memory": float(np.median(probe.memory[1:])) if probe.memory[1:] else float("nan"),
            "flush_per_sample": sum(flush) / max(1, samples + args.val_steps * args.batch_size)}


def _epoch(block: dict, batch_size: int) -> float:
    """Epoch estimate of an HMC-sized epoch from a block's per-step costs."""
    n_train, n_val = -(-HMC_TRAIN // batch_size), -(-HMC_VAL // batch_size)
    return (n_train * block["train"] + n_val * block["val"]
            + block["flush_per_sample"] * (HMC_TRAIN + HMC_VAL))


def _stats(values) -> str:
    return f"{np.median(values):.3f}  (min {np.min(values):.3f}, max {np.max(values):.3f}, n={len(values)})"


def run_length(length: int, args, rss) -> None:
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    n_batches = max(args.train_steps, args.n10_steps) + 1
    train = make_batches(n_batches, args.batch_size, length, seed=1)
    val = make_batches(args.val_steps, args.batch_size, length, seed=2)
    models = {
        "plain": PlainSDPA(shape, max_position=max(512, length)),
        "memefx": MemeClassifier(backbone="caption_pair", lr=1e-5, miate_bootstrap=10, scheduler="constant",
                                 backbone_args={**shape, "vocab_size": VOCAB, "max_position": max(512, length)}),
    }
    configs = [c for c in CONFIGS if c != "n10" or args.n10_steps > 0]
    results: dict[str, list[dict]] = {c: [] for c in configs}
    warmup = args.warmup_blocks
    for r in range(args.repeats + warmup):
        order = configs[r % len(configs):] + configs[: r % len(configs)]  # rotate: drifts hit all alike
        for config in order:
            block = _block(config, models, train, val, args, rss)
            if r >= warmup:
                results[config].append(block)
    bs = args.batch_size

    def ratios(a: str, b: str, key=None) -> list[float]:
        get = (lambda blk: _epoch(blk, bs)) if key is None else (lambda blk: blk[key])
        return [get(x) / get(y) if get(y) > 0 else float("nan") for x, y in zip(results[a], results[b])]

    plain = results["plain"]
    print(f"length={length} shape={args.shape} batch={bs} train_steps={args.train_steps} val_steps={args.val_steps} "
          f"precision={args.precision} step_s_plain={np.median([b['train'] for b in plain]):.3f} "
          f"step_s_midas={np.median([b['train'] for b in results['midas']]):.3f}")
    print(f"train_step_ratio={_stats(ratios('midas', 'plain', 'train'))}")
    print(f"val_step_ratio={_stats(ratios('midas', 'plain', 'val'))}")
    print(f"table_s_per_1000_samples={1000 * np.median([b['flush_per_sample'] for b in results['midas']]):.3f}")
    print(f"eager_over_sdpa={_stats(ratios('eager', 'off'))}")
    print(f"midas_off_ratio={_stats(ratios('off', 'plain'))}")
    mem = ratios("midas", "plain", "memory")
    if all(np.isfinite(mem)):
        print(f"peak_memory_ratio={_stats(mem)}  (eager: {np.median(ratios('eager', 'plain', 'memory')):.3f})")
    else:  # CPU: a step that grew no resident memory gives no ratio
        print(f"peak_memory_ratio=nan  (resident-set growth per step, MiB: plain "
              f"{np.median([b['memory'] for b in plain]) / 2**20:.1f}, midas "
              f"{np.median([b['memory'] for b in results['midas']]) / 2**20:.1f})")
    if "n10" in results:
        print(f"midas_n10_ratio={_stats(ratios('n10', 'plain'))}")
    print(f"midas_overhead_ratio={_stats(ratios('midas', 'plain'))}  (length {length})")


# ------------------------------------------------------------------------------------------ fidelity
def fidelity(args) -> None:
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    model = MemeClassifier(backbone="caption_pair", backbone_args={**shape, "vocab_size": VOCAB}).backbone.eval()
    batch = make_batches(1, args.ig_samples, min(args.lengths), seed=3)[0]
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
    print(f"ig_over_single_ratio={t_ig / t_single:.1f}  (m={args.ig_steps}, {args.ig_samples} samples, all layers)")
    print(f"single_vs_ig_spearman={np.nanmean(rhos):.3f}  (worst layer {np.nanmin(rhos):.3f})")


# ------------------------------------------------------------------------------------------ profile
class _Spans(Callback):
    """Forward / backward / rest of one training step (batch ``at``), and a torch.profiler trace of it."""

    def __init__(self, at: int):
        from torch.profiler import ProfilerActivity, profile

        self.at, self.spans = at, {}
        self.prof = profile(activities=[ProfilerActivity.CPU])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            self.prof.__enter__()
            self.spans["start"] = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss):
        self.spans["forward_end"] = time.perf_counter()

    def on_after_backward(self, trainer, pl_module):
        self.spans["backward_end"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.spans["end"] = time.perf_counter()
            self.prof.__exit__(None, None, None)


def profile(args) -> None:
    """torch.profiler breakdown of one captured training step against one uncaptured (SDPA) step."""
    shape, length = SHAPES[args.shape], max(args.lengths)
    torch.manual_seed(0)
    model = MemeClassifier(backbone="caption_pair", lr=1e-5, miate_bootstrap=10, scheduler="constant",
                           backbone_args={**shape, "vocab_size": VOCAB, "max_position": max(512, length)})
    train = make_batches(3, args.batch_size, length, seed=1)
    for config in ("off", "midas"):
        spans = _Spans(at=2)
        callbacks = [MIDASCallback(stages=["train"])] if config == "midas" else []
        with tempfile.TemporaryDirectory() as tmp:
            trainer = L.Trainer(default_root_dir=tmp, accelerator="cpu", max_epochs=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, limit_train_batches=3, limit_val_batches=0,
                                callbacks=[*callbacks, spans])
            trainer.fit(model, train_dataloaders=_loader(train))
        t = spans.spans
        total, fwd, bwd = t["end"] - t["start"], t["forward_end"] - t["start"], t["backward_end"] - t["forward_end"]
        print(f"profile_{config}: step_s={total:.3f} forward_s={fwd:.3f} backward_s={bwd:.3f} "
              f"optimizer_and_rest_s={total - fwd - bwd:.3f}")
        events = spans.prof.key_averages()
        total_ms = sum(e.self_cpu_time_total for e in events) / 1000
        reduce_ms = sum(e.cpu_time_total for e in events if e.key == "midas.block_sums") / 1000
        print(f"  profiled_cpu_ms={total_ms:.1f} midas_block_sums_ms={reduce_ms:.1f} "
              f"({100 * reduce_ms / max(total_ms, 1e-9):.1f}% of the step)")
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.profile_rows]:
            print(f"  {e.key[:60]:60s} self_cpu_ms={e.self_cpu_time_total / 1000:9.1f} calls={e.count}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="bert-base")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (one block per configuration each)")
    p.add_argument("--warmup-blocks", type=int, default=1, help="untimed rounds of blocks first")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps per block (after 1 warm-up)")
    p.add_argument("--n10-steps", type=int, default=10, help="timed steps of the n10 block (0: skip n10)")
    p.add_argument("--val-steps", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--ig-samples", type=int, default=8)
    p.add_argument("--ig-steps", type=int, default=20)
    p.add_argument("--ig-chunk", type=int, default=40)
    p.add_argument("--skip-fidelity", action="store_true")
    p.add_argument("--profile", action="store_true", help="only profile one captured and one plain step")
    p.add_argument("--profile-rows", type=int, default=15)
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.profile:
        profile(args)
        return
    if args.accelerator != "gpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc would keep freed blocks: with a fixed mmap threshold large tensors go back to the
        # system when freed, so the resident set follows what a step allocates
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"})
    rss = None if args.accelerator == "gpu" else _PeakRSS()
    if not args.skip_fidelity:
        fidelity(args)
    for length in sorted(args.lengths):
        run_length(length, args, rss)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
