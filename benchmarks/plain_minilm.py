"""The anchor for the real-data figures: a plain PyTorch fine-tuning loop, as a user without memefx writes it.

The packaged MiniLM (transformers ``AutoModel``) over (meme text, BLIP-2 ``text_captioned`` description)
pairs, a linear head on the pooled state, AdamW with linear warm-up and decay, the same budget as the
packaged config (3 epochs, batch 32, 96 tokens, lr 5e-5). Trained on the same 90% of train and the epoch
chosen on the same ``train_heldout`` memes as memefx (``memefx.data.carve``: whole confounder groups),
then scored on dev_seen and dev_unseen. No Lightning, no miATE, no MIDAS.

    OMP_NUM_THREADS=2 python benchmarks/plain_minilm.py [--data ../shared/data] [--epochs 3] [--pooling mean]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

from memefx.data.carve import carve_validation
from memefx.data.tables import read_confounders
from memefx.pretrained import minilm_path


def load(data: Path, split: str, captions: pd.DataFrame) -> pd.DataFrame:
    frame = pd.read_json(data / "hmc" / f"{split}.jsonl", lines=True, dtype={"id": str})
    frame["id"] = frame.id.str.zfill(5)
    return frame.assign(description=frame.id.map(captions))


class Classifier(torch.nn.Module):
    def __init__(self, pooling: str):
        super().__init__()
        self.encoder = AutoModel.from_pretrained(minilm_path(), local_files_only=True)
        self.head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(self.encoder.config.hidden_size, 2))
        self.pooling = pooling

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              token_type_ids=batch.get("token_type_ids")).last_hidden_state
        if self.pooling == "cls":
            return self.head(hidden[:, 0])
        mask = batch["attention_mask"][..., None].float()
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))


def scores(model: Classifier, tokenizer, frame: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(frame), batch_size):
            rows = frame.iloc[start:start + batch_size]
            batch = tokenizer(rows.text.tolist(), rows.description.tolist(), padding=True, truncation="longest_first",
                              max_length=96, return_tensors="pt")
            out.append(model(batch).softmax(-1)[:, 1].numpy())
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--pooling", default="mean", choices=("cls", "mean"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/plain_minilm")
    a = p.parse_args()
    data = Path(a.data)
    torch.manual_seed(a.seed)
    caps = pd.read_parquet(data / "hm_captions.parquet")
    captions = dict(zip(caps.image_id.astype(str).str.zfill(5), caps.text_captioned))
    conf = read_confounders(data / "confounders.parquet")
    train = load(data, "train", captions)
    held, _ = carve_validation(train.id, conf, "train", 0.1, seed=0)  # the packaged config's cut
    heldout, train = train[held], train[~held]
    evals = {s: load(data, s, captions) for s in ("dev_seen", "dev_unseen")}
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    model = Classifier(a.pooling)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=5e-5)
    steps = a.epochs * ((len(train) + 31) // 32)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    best, best_state, log = -1.0, None, []
    start = time.perf_counter()
    for epoch in range(a.epochs):
        model.train()
        order = np.random.default_rng(a.seed * 1000 + epoch).permutation(len(train))
        for k in range(0, len(order), 32):
            rows = train.iloc[order[k:k + 32]]
            batch = tokenizer(rows.text.tolist(), rows.description.tolist(), padding=True, truncation="longest_first",
                              max_length=96, return_tensors="pt")
            loss = torch.nn.functional.cross_entropy(model(batch), torch.tensor(rows.label.values))
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        auroc = roc_auc_score(heldout.label, scores(model, tokenizer, heldout))
        log.append({"epoch": epoch, "train_heldout_auroc": auroc})
        print(f"plain epoch={epoch} train_heldout_auroc={auroc:.4f} wall_s={time.perf_counter() - start:.0f}", flush=True)
        if auroc > best:
            best, best_state = auroc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    result = {"pooling": a.pooling, "seed": a.seed, "epochs": log, "train_heldout_auroc": best,
              "wall_s": time.perf_counter() - start}
    for split, frame in evals.items():
        result[f"{split}_auroc"] = roc_auc_score(frame.label, scores(model, tokenizer, frame))
        print(f"plain {split}_auroc={result[f'{split}_auroc']:.4f} (epoch chosen on train_heldout)", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "plain.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
