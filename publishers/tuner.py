"""A fine-tuner wired to the publisher: the trainer (``learners``) learns, this package ships.

The fine-tuner only knows the ``ModelSink`` protocol it publishes to; this is where the sink is the
real :class:`~publishers.publisher.Publisher`, over the local snapshot store and the audit log.
"""

from __future__ import annotations

from freshrec.settings import Settings
from freshrec.store import Store
from learners.finetune import FineTuner, store_window
from publishers.publisher import Publisher
from publishers.snapshots import SnapshotStore

__all__ = ["build_tuner"]


def build_tuner(settings: Settings, store: Store) -> FineTuner:
    """A fine-tuner reading the freshest window from ``store`` and publishing to the model topics."""
    publisher = Publisher(settings, snapshots=SnapshotStore.for_settings(settings), store=store)
    return FineTuner(
        settings,
        publisher=publisher,
        source=store_window(store, last_events=settings.train.window_events),
        store=store,
    )
