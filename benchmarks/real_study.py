"""The packaged real-data config measured like a study: the pooling chosen on the carved validation split,
then three training seeds, and a plain fine-tuning loop as the anchor.

Runs ``configs/experiment/hmc_caption_minilm.yaml`` on ``../shared/data`` (meme text from the HMC jsonl
files, image side = the BLIP-2 ``text_captioned`` description). Every choice reads ``train_heldout`` only
(10% of train, carved whole confounder groups at a time); dev_seen, dev_unseen and the test files are only
evaluated, from the checkpoint chosen there.

1. selection: seed 0 with each ``--poolings`` value into ``OUT/pooling_<p>/seed0``; the one with the higher
   ``val/auroc`` (train_heldout, best checkpoint) is chosen;
2. study: the chosen pooling's folder gets the other ``--seeds`` (``memefx study``; seed 0 is reused);
3. anchor (``--plain``): ``benchmarks/plain_minilm.py``, a plain PyTorch loop over the same encoder, inputs,
   split and budget, as a user without memefx would write it.

    OMP_NUM_THREADS=2 python benchmarks/real_study.py --out runs/real_study [--seeds 0,1,2] [--poolings cls,mean]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from memefx.cli import main as memefx

CONFIG = "configs/experiment/hmc_caption_minilm.yaml"


def data_args(data: Path) -> list[str]:
    return ["--data.root", str(data / "hmc"), "--data.captions", str(data / "hm_captions.parquet"),
            "--data.confounders", str(data / "confounders.parquet")]


def study(out: Path, seeds: str, pooling: str, data: Path, epochs: int) -> float:
    start = time.perf_counter()
    code = memefx(["study", "--config", CONFIG, "--seeds", seeds, "--out", str(out), *data_args(data),
                   "--model.backbone_args.pooling", pooling, "--trainer.max_epochs", str(epochs),
                   "--trainer.enable_progress_bar", "false"])
    if code:
        raise SystemExit(f"memefx study failed (exit {code})")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/real_study")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--poolings", default="cls,mean")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--plain", action="store_true", help="also run the plain-loop anchor (seed 0)")
    a = p.parse_args()
    out, data = Path(a.out), Path(a.data)
    if not (data / "hmc" / "train.jsonl").is_file():
        raise SystemExit(f"real data not found under {data}/hmc")
    selection = {}
    for pooling in a.poolings.split(","):
        wall = study(out / f"pooling_{pooling}", "0", pooling, data, a.epochs)
        metrics = json.loads((out / f"pooling_{pooling}" / "seed0" / "metrics.json").read_text())
        selection[pooling] = metrics["val/auroc"]
        print(f"selection pooling={pooling} train_heldout_auroc={metrics['val/auroc']:.4f} wall_s={wall:.0f}", flush=True)
    chosen = max(selection, key=selection.get)
    print(f"chosen pooling={chosen} (on train_heldout only)", flush=True)
    wall = study(out / f"pooling_{chosen}", a.seeds, chosen, data, a.epochs)
    summary = json.loads((out / f"pooling_{chosen}" / "study.json").read_text())
    from memefx.report.study import study_lines

    print("\n".join(study_lines(summary)))
    print(f"study_wall_s={wall:.0f} (seeds not reused from the selection)")
    if a.plain:
        subprocess.run([sys.executable, "benchmarks/plain_minilm.py", "--data", str(data), "--epochs", str(a.epochs),
                        "--pooling", chosen, "--out", str(out / "plain")], check=True)


if __name__ == "__main__":
    main()
