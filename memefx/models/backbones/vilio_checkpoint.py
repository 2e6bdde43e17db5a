"""Vilio checkpoints: the files the paper's fine-tuned models were saved as, loaded strictly.

Vilio's ``hm.py`` saves ``Model{U,O,V}.state_dict()``: keys ``model.*`` (the BERT-based encoder with its
visual embeddings) and ``classifier.*`` (the ``--contrib`` layout, also used without it). With ``--swa`` it
saves ``torch.optim.swa_utils.AveragedModel(Model*)``: an int64 ``n_averaged`` plus the same keys under
``module.``. Vilio's own ``load()`` drops ``n_averaged`` and strips ``module.``; so does memefx, then loads
strictly, so a checkpoint of another family, shape or layout is refused with the keys that differ.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LAYOUTS = {
    "contrib": "keys model.* and classifier.* (hm.py saving Model{U,O,V}.state_dict())",
    "swa": "n_averaged plus module.model.* and module.classifier.* (hm.py --swa: an AveragedModel)",
}
_SHOW = 8


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOW]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")


def vilio_layout(state: dict) -> str:
    """Which of Vilio's save layouts ``state`` is: ``swa`` (``n_averaged`` + ``module.*``), else ``contrib``."""
    return "swa" if "n_averaged" in state or any(k.startswith("module.") for k in state) else "contrib"


def normalize_vilio_state(state: dict) -> dict[str, torch.Tensor]:
    """The state dict as Vilio's ``load()`` hands it to ``load_state_dict``: no ``n_averaged``, no ``module.``."""
    return {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}


def read_vilio_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(normalized state dict, layout name) of a Vilio checkpoint file; never executes pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_args.checkpoint={str(path)!r}: no such file (a Vilio checkpoint "
                                "saved by hm.py, e.g. LAST_U.pth or a --swa file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a torn or foreign file
        raise ValueError(f"{path}: not a readable PyTorch state dict ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        raise ValueError(f"{path}: a Lightning checkpoint, not a Vilio one: resume it with --ckpt_path instead")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: expected a state dict (names -> tensors) as Vilio's hm.py saves it")
    return normalize_vilio_state(state), vilio_layout(state)


def load_vilio_checkpoint(module: nn.Module, path: str | Path, family: str) -> str:
    """Load a Vilio checkpoint into ``module`` (whose keys are ``model.*``/``classifier.*``) strictly.

    Returns the layout found. Missing or unexpected keys, or a shape that differs (another BERT size in
    ``bert``), are an error listing them and naming the layouts expected.
    """
    state, layout = read_vilio_checkpoint(path)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = [f"missing keys: {_listing(missing)}" if missing else "",
                 f"unexpected keys: {_listing(unexpected)}" if unexpected else ""]
        raise ValueError(
            f"{path}: not a Vilio {family} checkpoint of this shape ({'; '.join(p for p in parts if p)}). "
            f"Found layout {layout!r}; expected {LAYOUTS['contrib']}, or {LAYOUTS['swa']}. "
            "Check model.backbone (vilio_uniter, vilio_oscar, vilio_visualbert) against the model that was trained")
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})" for k in sorted(own)
             if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"{path}: shapes differ from the model built from model.backbone_args.bert: "
                         f"{_listing(wrong)}; give the BERT folder the checkpoint was trained from "
                         "(bert-large-cased for U, bert-large-uncased for O, bert-base-uncased for V)")
    module.load_state_dict(state, strict=True)
    return layout
