"""How long decoding a large request body holds the event loop, by the body's shape, with the cyclic garbage
collector running (as before `trio_mapper/collector.py`) and paused (as the engine decodes now), side by side.

Each shape fills ``--mib`` MiB (the default request cap, ``max_frame_bytes``, is 4 MiB). For each, the JSON
decode (the HTTP front) and the msgpack decode of the same body in a submit frame (the msgpack front) are
timed, alternating running/paused ``--rounds`` times; the median is printed. "Paused" includes the
collector's next pass over the new objects, which comes soon after, on the same loop. The engine decodes on
its event loop: these are the milliseconds every other client waits.

    python bench/decoding.py                 # 4 MiB, 5 rounds
    python bench/decoding.py --mib 16 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec

from trio_mapper import collector
from trio_mapper.wire.framing import engine_codec


def shapes(size: int) -> dict[str, bytes]:
    def array_of(item: bytes) -> bytes:
        return b'{"model":"m","input":[' + b",".join([item] * (size // (len(item) + 1))) + b"]}"

    return {
        "one long string (a prompt)": b'{"model":"m","input":"' + b"word " * (size // 5) + b'"}',
        "token arrays (embeddings)": array_of(b"[" + b",".join([b"1234"] * 63) + b"]"),
        "short strings": array_of(b'"a"'),
        "one-element arrays": array_of(b"[1]"),
        "empty objects": array_of(b"{}"),
        "many keys": b"{" + b",".join(b'"k%d":1' % i for i in range(size // 12)) + b"}",
    }


def held(decode: Callable[[], Any], paused: bool, size: int) -> float:
    gc.collect()
    started = time.perf_counter()
    if paused:
        with collector.paused_for(size):
            value = decode()
        gc.collect(0)  # the pass the collector owes, which the next allocations would start on the loop
    else:
        value = decode()
    elapsed = time.perf_counter() - started
    del value
    return elapsed


def main(args: argparse.Namespace) -> None:
    codec = engine_codec()
    print(f"decoding a {args.mib} MiB body, median of {args.rounds} rounds (ms the event loop is held)")
    print(f"{'shape':>28} {'front':>8} {'running':>9} {'paused':>8} {'ratio':>6}")
    for name, raw in shapes(args.mib << 20).items():
        body = msgspec.json.decode(raw)
        frame = msgspec.msgpack.encode({"type": "submit", "id": 1, "endpoint": "/v1/embeddings", "body": body})
        del body
        for front, payload, decode in (
            ("http", raw, lambda raw=raw: msgspec.json.decode(raw)),
            ("msgpack", frame, lambda frame=frame: codec.decode(frame)),
        ):
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for paused in (False, True):
                    times[paused].append(held(decode, paused, len(payload)))
            running, paused_ms = (1000 * statistics.median(times[p]) for p in (False, True))
            print(f"{name:>28} {front:>8} {running:>9.1f} {paused_ms:>8.1f} {paused_ms / running:>6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    main(parser.parse_args())
