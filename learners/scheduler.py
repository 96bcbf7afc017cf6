"""The fine-tune schedule: APScheduler runs a :class:`~learners.finetune.FineTuner` cycle on an interval.

Why APScheduler: interval triggers, coalescing of missed runs and one-instance-per-job are exactly
what a periodic trainer needs, and its background scheduler lets ``freshrec run`` host the trainer
beside the other roles in one process. The guarantees, and who gives them:

- **Jobs never overlap**: ``max_instances=1`` per job, and one lock shared by the interval job and
  its retry, so a retry and a scheduled run cannot train at once either (a run that finds the lock
  taken is skipped, not queued). Missed runs coalesce into one.
- **A failed cycle is logged, recorded** (``training_runs.status = 'failed'``) **and retried** after
  ``retry_s``, once; the interval keeps going whatever happens.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from learners.finetune import FineTuner

__all__ = ["FineTuneSchedule"]

logger = logging.getLogger(__name__)


class FineTuneSchedule:
    """Runs ``tuner.cycle`` now and every ``interval_s``; see the module docstring."""

    def __init__(self, tuner: FineTuner, *, interval_s: float, retry_s: float) -> None:
        self.tuner = tuner
        self.interval_s = interval_s
        self.retry_s = retry_s
        self.succeeded = 0
        self.failed = 0
        self.skipped = 0
        self._running = threading.Lock()
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    def start(self) -> FineTuneSchedule:
        self.scheduler.add_job(
            self._job,
            IntervalTrigger(seconds=self.interval_s, timezone=UTC),
            id="finetune",
            next_run_time=datetime.now(UTC),
            kwargs={"retry": True},
        )
        self.scheduler.start()
        return self

    def stop(self) -> None:
        self.scheduler.shutdown(wait=True)

    def _job(self, retry: bool) -> None:
        if not self._running.acquire(blocking=False):
            self.skipped += 1
            logger.info("a fine-tune is still running: this run is skipped")
            return
        try:
            self.tuner.cycle()
            self.succeeded += 1
        except Exception:
            self.failed += 1
            logger.exception(
                "fine-tune cycle failed%s", f"; retrying in {self.retry_s:.0f} s" if retry else ""
            )
            if retry:
                self.scheduler.add_job(
                    self._job,
                    "date",
                    run_date=datetime.now(UTC) + timedelta(seconds=self.retry_s),
                    id="finetune-retry",
                    replace_existing=True,
                    kwargs={"retry": False},
                )
        finally:
            self._running.release()
