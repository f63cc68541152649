"""Does a large request body, or a large reply, stall everyone else? Small-request latency on other
connections, with and without 4 MiB bodies or 30 MB replies flowing through the engine, in one run.

Two probes run on their own connections, one request at a time: ``ping`` (answered by the engine's event loop
alone, so it measures the loop's stalls directly) and a small chat request (the whole path through the
simulator). They run four times: alone, while another client sends 4 MiB chat bodies back to back that the
engine admits and sends upstream, while it sends 4 MiB bodies that exceed the lane's per-minute token limit
(refused by the engine, never sent), and while it asks for embeddings of 512 inputs at 3072 dimensions back
to back (replies of about 31 MB of JSON, relayed to it as they came). The ratios to "alone" are what
matters; the machine is noisy.

The simulator counts the prompt tokens of what it admits, and builds the embeddings, in its own process,
which stalls *its* loop: the chat probe's figures in those phases include that, the ping probe's do not.

    python bench/loop_stall.py                 # about two minutes
    python bench/loop_stall.py --probes 400 --rounds 5 --body-mib 4 --reply-inputs 2048
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FRAME_PREFIX, chat_body, engine_process, frame, pct, simulator_process

from trio_mapper import AsyncClient

ENDPOINT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


def big_body(mib: float, model: str) -> dict[str, Any]:
    # Varied words, as real text: a run without spaces would be one pre-token and cost far more to count.
    words = " ".join(f"w{i % 5003}" for i in range(int(mib * 1024 * 1024 / 6)))
    return {"model": model, "messages": [{"role": "user", "content": words}], "max_tokens": 1}


async def probe(socket: Path, count: int, kind: str) -> list[float]:
    latencies = []
    async with AsyncClient(socket) as client:
        for i in range(count):
            started = time.perf_counter()
            if kind == "ping":
                await client.ping()
            else:
                await client.request(ENDPOINT, chat_body(i, words=20, max_tokens=16))
            latencies.append(time.perf_counter() - started)
            await trio.sleep(0.005)  # a steady trickle, so each probe samples a different moment
    return latencies


def large_reply_request(inputs: int) -> dict[str, Any]:
    """An embeddings request whose reply is large: ``inputs`` vectors of 3072 floats, about 60 kB each."""
    texts = [f"text number {i}" for i in range(inputs)]
    return {"model": "text-embedding-3-large", "input": texts, "encoding_format": "float"}


async def flood(socket: Path, body: dict[str, Any], stop: trio.Event, sent: list[int]) -> None:
    if "input" in body:
        return await flood_reading_raw(socket, body, stop, sent)
    async with AsyncClient(socket) as client:
        while not stop.is_set():
            try:
                await client.request(ENDPOINT, body)
            except Exception as exc:  # a refusal is what the "refused" phase expects
                if "request_too_large" not in repr(exc) and "RequestTooLarge" not in type(exc).__name__:
                    raise
            sent[0] += 1


async def flood_reading_raw(socket: Path, body: dict[str, Any], stop: trio.Event, sent: list[int]) -> None:
    """Large replies, one at a time, read as bytes and dropped: a client helper would decode each (tenths of a
    second for 31 MB of JSON) in this process, which runs the probes too, and measure its own stalls."""
    async with await trio.open_unix_socket(str(socket)) as stream:
        await stream.send_all(frame({"type": "hello", "protocol": 1, "body_format": "json"}))
        pending = bytearray()
        frames = 0  # the welcome, then one reply per request

        async def received(at_most: int) -> bytes:
            data = await stream.receive_some(at_most)
            if not data:
                raise RuntimeError("the engine closed the connection")
            return data

        async def next_frame() -> None:
            while len(pending) < FRAME_PREFIX.size:
                pending.extend(await received(1 << 20))
            (length,) = FRAME_PREFIX.unpack_from(pending)
            left = FRAME_PREFIX.size + length - len(pending)
            del pending[: FRAME_PREFIX.size + length]
            while left > 0:  # read and drop, never past the frame's end
                left -= len(await received(min(left, 1 << 20)))

        await next_frame()
        while not stop.is_set():
            await stream.send_all(frame({"type": "submit", "id": frames, "endpoint": EMBEDDINGS, "body": body}))
            await next_frame()
            frames += 1
            sent[0] += 1


async def phase(socket: Path, count: int, body: dict[str, Any] | None) -> tuple[list[float], list[float], int]:
    stop = trio.Event()
    sent = [0]
    results: dict[str, list[float]] = {}
    async with trio.open_nursery() as nursery:
        if body is not None:
            nursery.start_soon(flood, socket, body, stop, sent)
            await trio.sleep(0.5)  # let the first big body be on its way

        async def run(kind: str) -> None:
            results[kind] = await probe(socket, count, kind)

        async with trio.open_nursery() as probes:
            probes.start_soon(run, "ping")
            probes.start_soon(run, "chat")
        stop.set()
    return results["ping"], results["chat"], sent[0]


async def main(args: argparse.Namespace, config: Path) -> None:
    simulator_flags = ["--rpm", "100000000", "--tpm", "10000000000", "--latency-ms", "0",
                       "--per-token-latency-ms", "0", "--seed", "1"]  # fmt: skip
    frame = int((args.body_mib + 1) * 1024 * 1024)
    engine_flags = ["--rpm", "100000000", "--tpm", "10000000000", "--max_concurrent_reqs", "64",
                    "--max-frame-bytes", str(frame)]  # fmt: skip
    rows: list[tuple[str, list[float], list[float], int]]
    async with (
        simulator_process(*simulator_flags) as url,
        engine_process(url, *engine_flags, "--config", str(config)) as socket,
    ):
        await probe(socket, 20, "chat")  # warm up
        phases = (
            ("alone", None),
            ("4 MiB admitted", big_body(args.body_mib, "gpt-4o-mini")),
            ("4 MiB refused", big_body(args.body_mib, "refused-model")),
            ("large replies", large_reply_request(args.reply_inputs)),
        )
        rows = [(name, [], [], 0) for name, _ in phases]
        # The phases take turns, round after round, so a slow moment of the machine does not land on one
        # phase alone; each phase's probes are pooled over the rounds.
        for _ in range(args.rounds):
            for index, (name, body) in enumerate(phases):
                pings, chats, sent = await phase(socket, args.probes, body)
                _, all_pings, all_chats, all_sent = rows[index]
                rows[index] = (name, all_pings + pings, all_chats + chats, all_sent + sent)

    base_ping, base_chat = rows[0][1], rows[0][2]
    print(
        f"{args.probes} probes of each kind per phase and round, {args.rounds} rounds; latency in ms; "
        "ratio = p99 / p99 alone"
    )
    print(f"{'phase':<16} {'big sent':>8} {'ping p50':>9} {'ping p99':>9} {'ratio':>6} "
          f"{'chat p50':>9} {'chat p99':>9} {'ratio':>6}")  # fmt: skip
    for name, pings, chats, sent in rows:
        print(
            f"{name:<16} {sent:>8} {1000 * pct(pings, 50):>9.2f} {1000 * pct(pings, 99):>9.2f} "
            f"{pct(pings, 99) / pct(base_ping, 99):>6.2f} {1000 * pct(chats, 50):>9.2f} "
            f"{1000 * pct(chats, 99):>9.2f} {pct(chats, 99) / pct(base_chat, 99):>6.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=300, help="per kind, phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--body-mib", type=float, default=3.5)
    parser.add_argument("--reply-inputs", type=int, default=512, help="embeddings per large reply (2048 at most)")
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "limits.toml"
        # The "refused" model's per-minute token limit is far below one big body, far above a small one.
        config.write_text('[models."refused-model"]\nrpm = 100000\ntpm = 50000\n')
        trio.run(main, parser.parse_args(), config)
