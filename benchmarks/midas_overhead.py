"""MIDAS cost against what a user would otherwise run, and its fidelity, measured side by side in one run.

Configurations, all trained by Lightning on the same batches (random tokens, every sequence exactly
``length`` positions: [CLS] text [SEP] description [SEP] plus some padding), from the same weights:
  plain   a user's own LightningModule: a transformers BERT with SDPA attention, a linear head, AdamW
  off     memefx MemeClassifier (caption_pair backbone, SDPA), no MIDAS
  midas   the same with MIDASCallback(stages=[train, val]) capturing every training batch
  n10     the same with train_every_n_steps=10
  eager   memefx with attn_implementation=eager (every forward materializes attention maps), no MIDAS
The fits run side by side in lockstep: each in its own thread, one batch at a time in turn, so round k
runs batch k of every configuration back to back (order rotated each round) and a load that comes and
goes on a busy machine hits the paired steps alike. The first training and validation batch of each fit
is a warm-up and is not timed. Each timed step gives one paired ratio of epoch costs (an HMC epoch:
8500 train, 500 dev_seen memes; train step x train batches + validation step x validation batches +
MIDAS's table writing per sample); n10 pairs sliding 10-step windows (each holds one captured step).
The median of the paired ratios is printed with its interquartile range, min, max and count.
Peak memory is measured apart, one configuration at a time, in a child process.

Prints, per length (``length=``), then the fidelity lines first:
  midas_overhead_ratio=  midas over plain (the last such line, at the longest length, is the headline)
  midas_n10_ratio=       n10 over plain
  midas_off_ratio=       off over plain (memefx without MIDAS against a plain SDPA Lightning step)
  eager_over_sdpa=       eager over off
  train_step_ratio= / val_step_ratio=   midas over plain, per training / validation step
  peak_memory_ratio=     midas over plain (GPU: allocator peak of the whole fit; CPU: resident-set growth
                         of a training step, with glibc's mmap threshold fixed so freed tensors leave it)
  ig_over_single_ratio=  layer-wise integrated gradients (m steps) over single-gradient MIDAS, same samples
  single_vs_ig_spearman= rank agreement of attattr block scores (samples x heads x blocks), mean over layers

    python benchmarks/midas_overhead.py [--shape bert-base] [--lengths 64 128] [--batch-size 16] [--train-steps 20]
    python benchmarks/midas_overhead.py --accelerator gpu --precision bf16-mixed --batch-size 64 --lengths 128
    python benchmarks/midas_overhead.py --profile    # torch.profiler breakdown of one captured training step
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

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


class Lockstep:
    """Lets the fits of several configurations, each in its own thread, run one batch at a time in turn.

    Round k runs batch k of every configuration back to back (the order rotated by one each round, so no
    configuration always follows the same one): the k-th steps of two configurations are measured seconds
    apart on the same batch, and a load that comes and goes on a busy machine hits both alike. A thread
    holds its turn from the start of a batch until the start of its next one (Lightning's bookkeeping in
    between runs alone too) and gives it up for good when its fit ends, also when the fit raises.
    """

    def __init__(self, names: list[str]):
        self.names, self.active = list(names), set(names)
        self.round, self.position, self.holder = 0, 0, None
        self.cond = threading.Condition()

    def _current(self) -> str:
        order = self.names[self.round % len(self.names):] + self.names[: self.round % len(self.names)]
        return order[self.position]

    def _advance(self) -> None:
        """Move to the next active configuration (caller holds the lock)."""
        for _ in range(2 * len(self.names)):
            self.position += 1
            if self.position == len(self.names):
                self.round, self.position = self.round + 1, 0
            if self._current() in self.active:
                return

    def take(self, name: str) -> None:
        with self.cond:
            if self.holder == name:  # the previous batch's turn ends here
                self.holder = None
                self._advance()
                self.cond.notify_all()
            while not (self.holder is None and self._current() == name):
                self.cond.wait()
            self.holder = name

    def leave(self, name: str) -> None:
        with self.cond:
            self.active.discard(name)
            if self.holder == name:
                self.holder = None
            if self.active and self._current() not in self.active:
                self._advance()
            self.cond.notify_all()


class TurnProbe(Callback):
    """Takes the lockstep turn at every batch start, and times each training / validation batch (hooks to
    hooks). Listed after MIDASCallback, so its batch ends come after MIDAS's work on the batch."""

    def __init__(self, name: str, lockstep: Lockstep, cuda: bool):
        self.name, self.lockstep, self.cuda = name, lockstep, cuda
        self.train: list[float] = []
        self.val: list[float] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lockstep.take(self.name)
        self._t = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(self._now() - self._t)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.lockstep.take(self.name)
        self._tv = self._now()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val.append(self._now() - self._tv)


def _timed_flush(midas: MIDASCallback, spent: list) -> None:
    flush = midas._flush

    def timed(*args, **kwargs):
        start = time.perf_counter()
        flush(*args, **kwargs)
        spent.append(time.perf_counter() - start)

    midas._flush = timed


# ------------------------------------------------------------------------------------------ configurations
def build_models(configs: list[str], shape: dict, length: int) -> dict[str, L.LightningModule]:
    """One model per configuration (they train side by side), all starting from the same weights."""
    torch.manual_seed(0)
    max_position = max(512, length)
    plain = PlainSDPA(shape, max_position=max_position)
    models: dict[str, L.LightningModule] = {"plain": plain}
    state = {**{f"encoder.{k}": v for k, v in plain.encoder.state_dict().items()},
             **{f"head.{k}": v for k, v in plain.head.state_dict().items()}}
    for config in configs:
        if config == "plain":
            continue
        model = MemeClassifier(backbone="caption_pair", lr=1e-5, miate_bootstrap=10, scheduler="constant",
                               backbone_args={**shape, "vocab_size": VOCAB, "max_position": max_position,
                                              "attn_implementation": "eager" if config == "eager" else "sdpa"})
        model.backbone.load_state_dict(state)
        models[config] = model
    return models


def _callbacks(config: str, flush: list) -> list[Callback]:
    if config not in ("midas", "n10"):
        return []
    midas = MIDASCallback(stages=["train", "val"], train_every_n_steps=10 if config == "n10" else 1)
    _timed_flush(midas, flush)
    return [midas]


def _trainer(args, tmp: str, n_train: int, n_val: int, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp, accelerator=args.accelerator, devices=1, precision=args.precision,
                     max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=n_train,
                     limit_val_batches=n_val, callbacks=callbacks)


def one_malloc_arena() -> None:
    """Make threads started from now on share glibc's main heap, as a single-threaded training run does.

    By default each thread gets a heap of its own that keeps what it freed: five side-by-side fits would
    each hold a step's worth of freed activations (BERT-base, 128 tokens: past 24 GiB in all). Only one
    fit runs at a time, so sharing costs no contention.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1
    except (OSError, AttributeError):  # not glibc: its allocator has no per-thread heaps to share
        pass


def release_memory() -> None:
    """Collect the fits' reference cycles (trainer <-> model) and hand freed heap pages back to the system,
    so one length's models do not sit under the next length's."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_lockstep(models: dict, train, val, args) -> dict[str, dict]:
    """Every configuration fits the same batches, one batch at a time in turn; per-step times back."""
    cuda = args.accelerator == "gpu"
    one_malloc_arena()
    lockstep = Lockstep(list(models))
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def fit(config: str) -> None:
        flush: list[float] = []
        probe = TurnProbe(config, lockstep, cuda)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                trainer = _trainer(args, tmp, len(train), len(val), [*_callbacks(config, flush), probe])
                trainer.fit(models[config], train_dataloaders=_loader(train), val_dataloaders=_loader(val))
            results[config] = {"train": probe.train, "val": probe.val, "flush": sum(flush)}
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
        finally:
            lockstep.leave(config)

    threads = [threading.Thread(target=fit, args=(c,), name=f"fit-{c}") for c in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# ------------------------------------------------------------------------------------------ ratios
def epoch_cost(train_s: float, val_s: float, flush_per_sample: float, batch_size: int) -> float:
    """An HMC epoch (8500 train, 500 dev_seen memes) from a train and a validation step's cost."""
    n_train, n_val = -(-HMC_TRAIN // batch_size), -(-HMC_VAL // batch_size)
    return n_train * train_s + n_val * val_s + flush_per_sample * (HMC_TRAIN + HMC_VAL)


def paired_epoch_ratios(res: dict, base: dict, batch_size: int, window: int = 1) -> list[float]:
    """Epoch-cost ratios of ``res`` over ``base`` from steps run back to back.

    Pair w joins the mean of training steps w .. w+window-1 of both (windows slide by one step; a window
    of 10 holds exactly one step captured at N = 10) with validation step w mod n of both; table writing
    is added to ``res`` per sample, as measured once at the end of its fit.
    """
    train, base_train = np.asarray(res["train"]), np.asarray(base["train"])
    val, base_val = np.asarray(res["val"]), np.asarray(base["val"])
    samples = batch_size * (len(train) + 1 + len(val) + 1)  # the warm-up batches' samples are in the tables too
    flush = res["flush"] / samples
    out = []
    for w in range(len(train) - window + 1):
        v = w % len(val)
        num = epoch_cost(train[w:w + window].mean(), val[v], flush, batch_size)
        den = epoch_cost(base_train[w:w + window].mean(), base_val[v], base["flush"] / samples, batch_size)
        out.append(num / den)
    return out


def step_ratios(res: dict, base: dict, key: str) -> list[float]:
    return list(np.asarray(res[key]) / np.asarray(base[key]))


def _stats(values) -> str:
    q25, q75 = np.percentile(values, [25, 75])
    return (f"{np.median(values):.3f}  (IQR {q25:.3f}-{q75:.3f}, min {np.min(values):.3f}, max {np.max(values):.3f}, "
            f"n={len(values)})")


def _timed(results: dict) -> dict:
    """Drop each fit's first training and first validation batch (warm-up: optimizer state, first eval)."""
    return {c: {"train": r["train"][1:], "val": r["val"][1:], "flush": r["flush"]} for c, r in results.items()}


def run_length(length: int, args) -> None:
    configs = [c for c in CONFIGS if c in args.configs and (c != "n10" or args.train_steps >= 10)]
    models = build_models(configs, SHAPES[args.shape], length)
    train = make_batches(args.train_steps + 1, args.batch_size, length, seed=1)
    val = make_batches(args.val_steps + 1, args.batch_size, length, seed=2)
    res = _timed(run_lockstep(models, train, val, args))
    del models
    release_memory()
    if args.raw:
        raw = json.loads(Path(args.raw).read_text()) if Path(args.raw).is_file() else {}
        Path(args.raw).write_text(json.dumps({**raw, str(length): res}, indent=1))
    bs, plain = args.batch_size, res["plain"]
    steps = " ".join(f"step_s_{c}={np.median(r['train']):.3f}" for c, r in res.items())
    print(f"length={length} shape={args.shape} batch={bs} train_steps={args.train_steps} val_steps={args.val_steps} "
          f"precision={args.precision} {steps}")
    if "midas" in res:
        print(f"train_step_ratio={_stats(step_ratios(res['midas'], plain, 'train'))}")
        print(f"val_step_ratio={_stats(step_ratios(res['midas'], plain, 'val'))}")
        samples = bs * (args.train_steps + args.val_steps + 2)
        print(f"table_s_per_1000_samples={1000 * res['midas']['flush'] / samples:.3f}")
    if "eager" in res and "off" in res:
        print(f"eager_over_sdpa={_stats(paired_epoch_ratios(res['eager'], res['off'], bs))}")
    if "off" in res:
        print(f"midas_off_ratio={_stats(paired_epoch_ratios(res['off'], plain, bs))}")
    if not args.skip_memory and {"midas", "eager"} <= set(res):
        memory(length, args)
    if "n10" in res:
        print(f"midas_n10_ratio={_stats(paired_epoch_ratios(res['n10'], plain, bs, window=10))}")
    if "midas" in res:
        print(f"midas_overhead_ratio={_stats(paired_epoch_ratios(res['midas'], plain, bs))}  (length {length})")


# ------------------------------------------------------------------------------------------ memory
def memory(length: int, args) -> None:
    """Peak-memory ratio, measured apart from the timings: one configuration at a time, in a child process
    (a CPU child fixes glibc's mmap threshold, so freed tensors leave the resident set; timed runs keep
    the allocator a user has)."""
    cmd = [sys.executable, __file__, "--memory-only", "--lengths", str(length), "--shape", args.shape,
           "--batch-size", str(args.batch_size), "--accelerator", args.accelerator, "--precision", args.precision]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"} if args.accelerator != "gpu" else dict(os.environ)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("MEMORY ")]
    if out.returncode != 0 or not lines:
        print(f"peak_memory_ratio=nan  (memory child failed, exit {out.returncode}: {out.stderr.strip()[-400:]})")
        return
    peaks = json.loads(lines[-1][len("MEMORY "):])
    what = "allocator peak of the fit" if args.accelerator == "gpu" else "resident-set growth in a training step"
    mib = ", ".join(f"{c} {v / 2**20:.0f}" for c, v in peaks.items())
    if peaks["plain"] > 0:
        print(f"peak_memory_ratio={peaks['midas'] / peaks['plain']:.3f}  (eager {peaks['eager'] / peaks['plain']:.3f}; "
              f"{what}, MiB: {mib})")
    else:
        print(f"peak_memory_ratio=nan  ({what} of plain is 0; MiB: {mib})")


class _PeakProbe(Callback):
    """Peak memory of the fit (GPU) or resident-set growth of each training step above its start (CPU)."""

    def __init__(self, cuda: bool, rss: _PeakRSS | None):
        self.cuda, self.rss, self.steps = cuda, rss, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.rss is not None:
            self._base = self.rss.reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.rss is not None:
            self.steps.append(self.rss.peak - self._base)


def memory_only(args) -> None:
    """Child of ``memory``: each configuration alone, freshly built, a warm-up and two training steps."""
    cuda = args.accelerator == "gpu"
    rss = None if cuda else _PeakRSS()
    length, peaks = args.lengths[0], {}
    train = make_batches(3, args.batch_size, length, seed=1)
    for config in ("plain", "midas", "eager"):
        model = build_models([config], SHAPES[args.shape], length)[config]
        probe = _PeakProbe(cuda, rss)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = _trainer(args, tmp, 3, 0, [*_callbacks("midas" if config == "midas" else "off", []), probe])
            trainer.fit(model, train_dataloaders=_loader(train))
        peaks[config] = torch.cuda.max_memory_allocated() if cuda else float(np.median(probe.steps[1:]))
        del model, trainer
        gc.collect()
    print("MEMORY " + json.dumps(peaks))


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
    length = max(args.lengths)
    model = build_models(["off"], SHAPES[args.shape], length)["off"]
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
    p.add_argument("--train-steps", type=int, default=20,
                   help="timed training steps of every configuration, after one warm-up (n10 needs >= 10)")
    p.add_argument("--val-steps", type=int, default=4, help="timed validation steps, after one warm-up")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                   help="configurations to run (plain always runs: every ratio is over it)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--ig-samples", type=int, default=8)
    p.add_argument("--ig-steps", type=int, default=20)
    p.add_argument("--ig-chunk", type=int, default=40)
    p.add_argument("--skip-fidelity", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--raw", help="also write every timed step of every configuration to this JSON file")
    p.add_argument("--profile", action="store_true", help="only profile one captured and one plain step")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the memory child
    args = p.parse_args()
    args.configs = ["plain", *[c for c in args.configs if c != "plain"]]
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.memory_only:
        memory_only(args)
    elif args.profile:
        profile(args)
    else:
        if not args.skip_fidelity:
            fidelity(args)
            release_memory()
        for length in sorted(args.lengths):
            run_length(length, args)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
