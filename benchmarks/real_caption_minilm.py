"""Fine-tune the packaged MiniLM caption-pair encoder on the real HMC side tables (train -> dev_seen).

Prints dev_seen AUROC and accuracy, miATE per stratum kind with its bootstrap interval, MIDAS block
means (attattr, gold class) on dev_seen, and the wall time. Needs ../shared/data and the minilm extra.

    python benchmarks/real_caption_minilm.py [--epochs 3] [--run-dir runs/caption_minilm_hm]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pandas as pd

from memefx.attribution.midas import block_summary
from memefx.cli import main as memefx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--run-dir", default="runs/caption_minilm_hm")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--limit-train-batches", type=float, default=1.0)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    data = Path(args.data)
    if not (data / "confounders.parquet").is_file():
        raise SystemExit(f"real data not found under {data}")
    start = time.perf_counter()
    memefx(["fit", "--config", "configs/experiment/caption_minilm_hm.yaml",
            "--data.confounders", str(data / "confounders.parquet"), "--data.captions", str(data / "hm_captions.parquet"),
            "--trainer.max_epochs", str(args.epochs), "--trainer.default_root_dir", args.run_dir,
            "--trainer.limit_train_batches", str(args.limit_train_batches), "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=memefx.callbacks.midas.MIDASCallback", "--trainer.callbacks.stages=[val]",
            "--test_after_fit", "true"])
    wall = time.perf_counter() - start
    run = Path(args.run_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    miate = json.loads((run / "miate" / "dev_seen.json").read_text())
    last = max((run / "midas").glob("val_epoch*.parquet"), key=lambda q: int(q.stem.rsplit("epoch", 1)[1]))
    midas = block_summary(pd.read_parquet(last, filters=[("score", "==", "attattr")]))
    print(f"dev_seen_auroc={metrics['test/auroc']:.4f} dev_seen_acc={metrics['test/acc']:.4f} (best checkpoint)")
    for kind in ("shared_image", "shared_text"):
        r = miate[kind]
        print(f"miate_{kind}={r['mean']:.4f} ci=[{r['ci_low']:.4f}, {r['ci_high']:.4f}] strata={r['n_strata']} "
              f"placebo={r['placebo']['mean']:.4f}")
    print("midas_attattr " + " ".join(f"{b.block}={b.mean:.3e}" for b in midas.itertuples()) + f" ({last.name})")
    print(f"wall_s={wall:.0f}")


if __name__ == "__main__":
    main()
