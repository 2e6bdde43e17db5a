"""Lightning internals memefx relies on still exist (memefx/lightning_internals.py): fails loudly on a
Lightning release that renames them, before a resumed run silently starts its epoch again."""

from __future__ import annotations

import inspect

import lightning as L
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from memefx.lightning_internals import RELIED_ON


def test_the_fit_loop_and_combined_loader_still_have_what_memefx_uses():
    loop = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).fit_loop
    missing = [name for name in RELIED_ON["fit_loop"] if not hasattr(loop, name)]
    assert not missing, f"Lightning {L.__version__}: the fit loop lost {missing}; update memefx/lightning_internals.py"
    assert all(callable(getattr(CombinedLoader, n, None)) for n in RELIED_ON["combined_loader"]), L.__version__
    assert list(inspect.signature(CombinedLoader._load_state_dicts).parameters) == ["self", "states"]
    from memefx.models.module import MemeClassifier
    from tests.conftest import TINY_BACKBONE

    module = MemeClassifier(backbone_args=TINY_BACKBONE)
    assert hasattr(module, "_trainer") and module._trainer is None  # what attached_trainer reads


def test_only_that_module_touches_lightning_internals():
    """No other memefx module reaches into the fit loop's private attributes."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "memefx"
    names = [n for group in RELIED_ON.values() for n in group if n != "_trainer"] + ["._trainer", "checkpoint_io ="]
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if p.name != "lightning_internals.py" and any(n in p.read_text() for n in names))
    assert users == []
