"""Time `write_synthetic` for 10,000 memes (the issue's target: under a minute on 2 cores), median of runs.

    python benchmarks/synth_speed.py [--n-memes 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from memefx.data.synthetic import SyntheticConfig, write_synthetic


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-memes", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    times = []
    for seed in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_synthetic(Path(tmp) / "d", SyntheticConfig(n_memes=args.n_memes, seed=seed))
            times.append(time.perf_counter() - start)
    print(f"synth_seconds_median={statistics.median(times):.2f} n_memes={args.n_memes} "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)}); ratio_to_60s_budget={statistics.median(times) / 60:.3f}")


if __name__ == "__main__":
    main()
