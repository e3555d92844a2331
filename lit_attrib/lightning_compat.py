"""Work-arounds for Lightning behaviour that lit_attrib's guarantees depend on. Each names its issue."""

from __future__ import annotations

from lightning.pytorch import Trainer

__all__ = ["restore_train_loader_state"]


def restore_train_loader_state(trainer: Trainer) -> None:
    """Load a stateful train loader's checkpointed position that Lightning dropped.

    When ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (every LR schedule with
    a length does), the train loader is built before the checkpoint is restored and its saved state
    is never loaded, so a resumed epoch starts again from its first batch
    (Lightning-AI/pytorch-lightning#20550). Call from ``on_train_start``; a no-op when there is
    nothing pending (a fresh run, or a Lightning version that fixed the bug).
    """
    loop = trainer.fit_loop
    pending = getattr(loop, "_combined_loader_states_to_load", None)
    if not (loop.restarting and pending and getattr(loop, "_combined_loader", None) is not None):
        return
    loop._load_combined_loader_states()
    if loop._data_fetcher is not None:
        iter(loop._data_fetcher)  # the old iterator was created before the state was loaded
