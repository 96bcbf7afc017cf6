"""Event validation speed: ``parse_event`` beside bare ``orjson.loads`` on the same bytes.

    python bench/event_parsing.py [--events 200000] [--rounds 3]

Events are shaped like the ml-100k replay's (~120 bytes, with a value). Best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import orjson

from freshrec.events import parse_event


def _rate(fn: Callable[[bytes], object], raws: list[bytes], rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for raw in raws:
            fn(raw)
        best = max(best, len(raws) / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    raws = [
        orjson.dumps(
            {
                "event_id": f"ml-100k:{i % 943}:{i % 1682}",
                "user_id": str(i % 943),
                "item_id": str(i % 1682),
                "type": "rating",
                "ts": 881_250_949_000 + i,
                "value": float(i % 5 + 1),
            }
        )
        for i in range(args.events)
    ]
    loads = _rate(orjson.loads, raws, args.rounds)
    parse = _rate(
        lambda raw: parse_event(raw, now_ms=2_000_000_000_000, max_future_skew_ms=0), raws, args.rounds
    )
    size = sum(map(len, raws)) / len(raws)
    print(f"event parsing, {args.events:,} events of {size:.0f} B, best of {args.rounds}")
    print(f"{'orjson.loads':<14}{loads:>12,.0f}/s")
    ratio = f"{parse / loads:.2f}x orjson.loads, {1e6 / parse:.2f} µs/event"
    print(f"{'parse_event':<14}{parse:>12,.0f}/s  ({ratio})")


if __name__ == "__main__":
    main()
