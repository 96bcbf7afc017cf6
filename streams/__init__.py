"""Event consumers and producers: validation, the audit sink, replays; real-time counters come next.

Modules: ``admin`` (topics), ``producer`` (idempotent producer), ``replay`` (datasets → ``events``),
``sink`` (``events`` → ClickHouse ``events`` / ``dead_letters``, exactly once).
"""
