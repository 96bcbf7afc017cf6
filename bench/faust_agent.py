"""A faust-streaming agent doing the stream worker's simplest job: decode JSON, count items.

    python bench/faust_agent.py BOOTSTRAP TOPIC N

Run by ``bench/faust_vs_confluent.py`` in its own process (faust owns its event loop and worker).
Prints ``RESULT faust <events/s>``, timed from its first batch to its N-th event.
"""

from __future__ import annotations

import os
import sys
import time

import faust
import orjson

bootstrap, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = faust.App(
    f"bench-faust-{os.getpid()}",
    broker=f"kafka://{bootstrap}",
    store="memory://",
    web_enabled=False,
    value_serializer="raw",
    topic_partitions=4,
    consumer_auto_offset_reset="earliest",
)
events = app.topic(topic, value_serializer="raw")
counts: dict[str, int] = {}
state = {"seen": 0, "first": 0.0}


@app.agent(events)
async def count(stream: faust.StreamT[bytes]) -> None:
    async for batch in stream.take(1000, within=0.5):
        if not state["first"]:
            state["first"] = time.perf_counter()
        for value in batch:
            item = orjson.loads(value)["item_id"]
            counts[item] = counts.get(item, 0) + 1
        state["seen"] += len(batch)
        if state["seen"] >= n:
            elapsed = time.perf_counter() - state["first"]
            print(f"RESULT faust {state['seen'] / elapsed:.0f}", flush=True)
            os._exit(0)


if __name__ == "__main__":
    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.execute_from_commandline()
