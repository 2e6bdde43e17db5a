"""``MiATE``: the torchmetrics shell around the pure miATE maths of ``memefx.causal.miate``, so a model logs
miATE per stratum kind every evaluation epoch, reduced correctly across DDP processes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torchmetrics import Metric

from memefx.causal.miate import miate


class MiATE(Metric):
    """torchmetrics shell: collects (meme id, stratum, label, p) and reports ``miate`` at compute.

    States are concatenated across processes and de-duplicated by meme id at compute time, because
    DistributedSampler pads the last batch with repeated samples: sum states would count those twice.
    """

    full_state_update = False

    def __init__(self, n_bootstrap: int = 1000, seed: int = 0, threshold: float | None = None,
                 correct_only: bool = False, pairs_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.options = {"n_bootstrap": n_bootstrap, "seed": seed, "threshold": threshold,
                        "correct_only": correct_only, "pairs_only": pairs_only}
        for name in ("row_ids", "strata", "labels", "probs"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor, strata: torch.Tensor, row_ids: torch.Tensor) -> None:
        """Add a batch. ``row_ids`` are integer meme ids (unique per split); stratum -1 means none."""
        if torch.isnan(probs).any():
            bad = row_ids[torch.isnan(probs)].tolist()[:10]
            raise ValueError(f"MiATE.update: {int(torch.isnan(probs).sum())} NaN probabilities (meme ids {bad})")
        keep = strata >= 0
        self.row_ids.append(row_ids[keep].long())
        self.strata.append(strata[keep].long())
        self.labels.append(labels[keep].long())
        self.probs.append(probs[keep].detach().double())

    def _frame(self) -> pd.DataFrame:
        def flat(state) -> np.ndarray:
            if isinstance(state, torch.Tensor):
                return state.cpu().numpy()
            return torch.cat(state).cpu().numpy() if state else np.zeros(0)

        frame = pd.DataFrame({"id": flat(self.row_ids), "stratum": flat(self.strata),
                              "label": flat(self.labels), "p": flat(self.probs)})
        return frame.drop_duplicates("id").sort_values("id").reset_index(drop=True)

    def compute(self) -> dict:
        # an empty kind goes through the same function: one fixed set of keys whatever the data
        return miate(self._frame(), **self.options)
