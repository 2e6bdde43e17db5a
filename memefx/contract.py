"""The contract between a LightningModule and memefx's callbacks (a leaf module: no memefx imports).

``MIDASCallback`` and ``RunDirectory`` work with any LightningModule that implements these protocols, not
only ``MemeClassifier``:

- ``AttentionCapture`` (for MIDAS): the callback *asks* the module, through these two methods, to keep the
  attention maps of the next training step or of every step of some evaluation stages, and takes what was
  kept with ``pop_capture``. Evaluation steps may instead return their capture in their step output
  (``EvalStepOutput.capture``), which the callback reads in ``on_*_batch_end``. No callback sets
  attributes on a module.
- ``EvaluationResults`` (for the run directory): the results an evaluation epoch computed (miATE per
  stratum kind of each split), read when the epoch ends.
- ``SplitData`` (for a module, from its data module): the split names of each role and their label counts.
- ``EvalStepOutput``: what validation, test and predict steps return (Lightning hands it to every
  callback's ``on_*_batch_end``): meme ids, labels (-1 unlabeled), hateful probabilities, the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: importing the contract costs nothing
    import torch


@dataclass
class TrainCapture:
    """A training step's kept attention maps (graph nodes the training backward flows through)."""

    attentions: tuple[torch.Tensor, ...]
    segments: torch.Tensor
    p_gold: torch.Tensor  # probability of each sample's gold class (detached)
    ids: list[str]


@dataclass
class EvalCapture:
    """An evaluation step's forward kept with its graph: ``logits``, ``attentions`` (graph nodes), ``segments``."""

    stage: str
    logits: torch.Tensor
    attentions: tuple[torch.Tensor, ...]
    segments: torch.Tensor
    labels: torch.Tensor
    ids: list[str]


@dataclass
class EvalStepOutput:
    """What an evaluation or predict step returns."""

    ids: list[str]
    labels: torch.Tensor
    p_hateful: torch.Tensor
    split: str
    capture: EvalCapture | None = field(default=None, repr=False)

    def __getitem__(self, key: str) -> Any:  # dict-style reads of earlier code and user callbacks
        return getattr(self, key)


@runtime_checkable
class AttentionCapture(Protocol):
    """A module MIDAS can read attention from."""

    def request_capture(self, train: bool, eval_stages: Sequence[str]) -> None:
        """Keep the next training step's maps (``train``) and the maps of every step of ``eval_stages``."""

    def pop_capture(self) -> TrainCapture | EvalCapture | None:
        """What the last step kept (then forgotten)."""


@runtime_checkable
class SplitData(Protocol):
    """A data module that names its splits (``MemeDataModule`` does): a module keys its metrics by split
    (``val/auroc`` for a role's only split, ``test/<split>/auroc`` for several) and checks, before training,
    that the validation split can give the metric a checkpoint monitors."""

    def eval_splits(self, role: str) -> list[str]:
        """The split names of a role (``train``, ``val``, ``test``, ``predict``), in loader order."""

    def label_counts(self, split: str) -> tuple[int, int, int] | None:
        """(hateful, benign, all) memes of a loaded split; None when it is not loaded."""


@runtime_checkable
class EvaluationResults(Protocol):
    """A module whose evaluation epochs compute results the run directory writes (``miate/<split>.json``)."""

    def evaluation_results(self) -> dict[str, dict]:
        """split -> {"split", "stage", <stratum kind>: miATE result, ...} of the evaluation epochs so far."""
