"""The one place memefx relies on Lightning internals, because no public route exists:

- handing a checkpointed training-loader position back after ``configure_optimizers`` built the loader;
- whether a LightningModule is attached to a trainer (``module.trainer`` raises when it is not);
- wrapping the trainer's CheckpointIO from a callback: ``Trainer(plugins=[...])`` is the public route, but
  ``RunDirectory`` must also work in a Trainer a user built (the strategy's ``checkpoint_io`` setter).

``configure_optimizers`` asks for ``trainer.estimated_stepping_batches``, which makes Lightning build the
training loader (and its iterator) before a checkpoint's loop state is restored, so Lightning never gives
the saved loader state to the loader: a run resumed mid-epoch would start the epoch again. What this
module touches of ``lightning.pytorch.loops.fit_loop._FitLoop``: ``_combined_loader_states_to_load``,
``_combined_loader`` (a ``CombinedLoader``, its ``_load_state_dicts``) and ``_data_fetcher``.
``tests/test_lightning_internals.py`` fails loudly when a Lightning release renames or removes them.
"""

from __future__ import annotations

import lightning as L

RELIED_ON = {
    "fit_loop": ("_combined_loader_states_to_load", "_combined_loader", "_data_fetcher"),
    "combined_loader": ("_load_state_dicts",),
    "lightning_module": ("_trainer",),
}


def restore_loader_position(trainer: L.Trainer, epoch: int) -> bool:
    """Give the training loader the position a checkpoint saved, and restart its iterator; True when done.

    A state saved at the end of an epoch belongs to that epoch: the next one starts from its beginning."""
    loop = trainer.fit_loop
    states, loop._combined_loader_states_to_load = loop._combined_loader_states_to_load, []
    if not states or loop._combined_loader is None or not all(s.get("epoch") in (None, epoch) for s in states):
        return False
    loop._combined_loader._load_state_dicts(states)
    iter(loop._data_fetcher)
    return True


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer ``module`` is attached to, or None (``module.trainer`` raises instead)."""
    return module._trainer


def wrap_checkpoint_io(trainer: L.Trainer, wrapper: type, wrapped: type | None = None) -> None:
    """Give the trainer's strategy ``wrapper(<its CheckpointIO>)`` unless it already has one of that type."""
    if not isinstance(trainer.strategy.checkpoint_io, wrapped or wrapper):
        trainer.strategy.checkpoint_io = wrapper(trainer.strategy.checkpoint_io)

