"""The packaged MiniLM caption-pair encoder on the real Hateful Memes text files (no images).

Runs ``configs/experiment/hmc_caption_minilm.yaml`` on ``../shared/data/hmc`` (meme text from the jsonl
files, image side = the BLIP-2 ``text_captioned`` description): train on train, validate on dev_seen every
epoch (miATE on the real strata, MIDAS), then test the best checkpoint on the four evaluation splits.
The two steps are the two commands a user runs (``memefx fit`` then ``memefx test --ckpt_path``); they
are separate here so that the MIDAS stratum analysis pairs the last validation epoch's MIDAS table with
the miATE of that same epoch before the test step rewrites ``miate/dev_seen.json``.

Prints ``dev_seen_auroc=`` (best checkpoint), miATE per kind with its bootstrap interval, the MIDAS
stratum-analysis AUC, wall times, and the path of the test_unseen predictions. Needs ../shared/data and
the minilm extra. Test files are only predicted, never scored or used to choose anything.

    python benchmarks/real_caption_minilm.py [--epochs 3] [--run-dir runs/hmc_caption_minilm]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

from memefx.cli import main as memefx
from memefx.data.strata import KINDS

CONFIG = "configs/experiment/hmc_caption_minilm.yaml"
EVAL_SPLITS = ("dev_seen", "dev_unseen", "test_seen", "test_unseen")


def _data_args(data: Path) -> list[str]:
    return ["--data.root", str(data / "hmc"), "--data.captions", str(data / "hm_captions.parquet"),
            "--data.confounders", str(data / "confounders.parquet")]


def _last_val_table(run: Path) -> Path | None:
    tables = list((run / "midas").glob("val_epoch*.parquet"))
    return max(tables, key=lambda q: int(q.stem.rsplit("epoch", 1)[1])) if tables else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--run-dir", default="runs/hmc_caption_minilm")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--limit-train-batches", type=float, default=1.0)
    p.add_argument("--val-check-interval", type=float, default=1.0, help="fraction of an epoch between validations")
    p.add_argument("--splits", nargs="+", default=list(EVAL_SPLITS), help="splits predicted by the test step")
    p.add_argument("--skip-fit", action="store_true", help="only the test step, on an existing run directory")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    data, run = Path(args.data), Path(args.run_dir)
    if not (data / "hmc" / "train.jsonl").is_file():
        raise SystemExit(f"real data not found under {data}/hmc")
    fit_wall = None
    if not args.skip_fit:
        start = time.perf_counter()
        code = memefx(["fit", "--config", CONFIG, *_data_args(data), "--test_after_fit", "false",
                       "--trainer.max_epochs", str(args.epochs), "--trainer.default_root_dir", str(run),
                       "--trainer.limit_train_batches", str(args.limit_train_batches),
                       "--trainer.val_check_interval", str(args.val_check_interval),
                       "--trainer.enable_progress_bar", "false"])
        if code != 0:
            raise SystemExit(f"memefx fit failed (exit {code})")
        fit_wall = time.perf_counter() - start
    val_miate = json.loads((run / "miate" / "dev_seen.json").read_text())  # last validation, before the test step
    val_table = _last_val_table(run)
    epochs = pd.read_csv(next((run / "logs").glob("version_*/metrics.csv")))
    val_curve = epochs.dropna(subset=["val/auroc"])[["epoch", "step", "val/auroc"]]

    # the test step in a fresh process: the best checkpoint on every evaluation split, as a user runs it
    start = time.perf_counter()
    ckpt = run / "checkpoints" / "best.ckpt"
    splits = "[" + ",".join(args.splits) + "]"
    subprocess.run([sys.executable, "-m", "memefx.cli", "test", "--config", str(run / "config.yaml"),
                    *_data_args(data), "--ckpt_path", str(ckpt), "--data.test_split", splits,
                    "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false"], check=True)
    test_wall = time.perf_counter() - start

    from sklearn.metrics import roc_auc_score

    from memefx.report.run import stratum_analysis

    for row in val_curve.itertuples():
        print(f"val_auroc epoch={row.epoch} step={row.step} auroc={row._3:.4f}")
    dev = pd.read_parquet(run / "predictions" / "dev_seen.parquet")
    print(f"dev_seen_auroc={roc_auc_score(dev.label, dev.p_hateful):.4f} "
          f"dev_seen_acc={((dev.p_hateful >= 0.5).astype(int) == dev.label).mean():.4f} (best checkpoint, n={len(dev)})")
    test_miate = json.loads((run / "miate" / "dev_seen.json").read_text())
    for kind in KINDS:
        r = test_miate.get(kind) or {}
        if r.get("n_strata"):
            print(f"miate_{kind}={r['mean']:.4f} ci=[{r['ci_low']:.4f}, {r['ci_high']:.4f}] strata={r['n_strata']} "
                  f"weighted={r['weighted_mean']:.4f} placebo={r['placebo']['mean']:.4f}")
        else:
            print(f"miate_{kind}=nan strata=0")
    if val_table is not None:
        analysis = stratum_analysis(run, val_table, val_miate)
        for name in ("grouped", "row_split_leaky"):
            if analysis and name in analysis:
                r = analysis[name]
                print(f"midas_stratum_auc_{name}={r['auc']:.4f} ci=[{r['ci_low']:.4f}, {r['ci_high']:.4f}] "
                      f"strata={analysis['n_strata']} positive={analysis['n_positive']} ({val_table.name})")
        if analysis and "note" in analysis:
            print(f"midas_stratum_note={analysis['note']!r}")
    for split in args.splits:
        path = run / "predictions" / f"{split}.parquet"
        if path.is_file():
            frame = pd.read_parquet(path)
            print(f"predictions_{split}={path} rows={len(frame)} unlabeled={int((frame.label.isna() | (frame.label < 0)).sum())}")
    if fit_wall is not None:
        print(f"fit_wall_s={fit_wall:.0f}")
    print(f"test_wall_s={test_wall:.0f}")


if __name__ == "__main__":
    main()
