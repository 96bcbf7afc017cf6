"""The stream side: everything that consumes ``events`` or produces to it.

- Kafka plumbing: ``admin`` (topics), ``producer`` (idempotent producer), ``replay`` (datasets →
  ``events``), ``lag`` (consumer lag of freshrec's groups).
- The audit log: ``sink`` (``events`` → ClickHouse ``events`` / ``dead_letters``, exactly once),
  ``impressions`` (the decision log: ``impressions`` → ClickHouse), ``dedup`` (recent event ids).
- Real-time state: ``counters`` (total, decayed and windowed counts), ``histories`` (per-user recent
  items), ``cooccurrence``, ``clicks`` (CTR posteriors), ``ids`` (item id → row), kept per input
  partition (``stores``) by ``worker``, snapshotted to and restored from Kafka (``changelog``), read
  by serving through ``reader`` and by operators through ``state_top``.
- ``consume``: the poll loop and the stop-on-signal block every consumer runs.

Model heads are given to the worker by whoever builds it (``learners.heads``): this package never
imports the layers above it.
"""
