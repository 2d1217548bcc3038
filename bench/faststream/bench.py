#!/usr/bin/env python3
"""FastStream (Python) on the natty bench's consume and publish workloads.

    python bench.py --url nats://127.0.0.1:PORT [--messages N] [--rounds R]

Runs against an existing nats-server with JetStream (it starts none). Creates the stream
`fsbench` (subjects `fsbench.>`, file storage) with nats-py for setup, deletes it at the end.
Prints the medians over the rounds on stdout, exactly:

    faststream consume <msgs_per_sec>
    faststream publish <msgs_per_sec>

and the per-round figures on stderr.

consume: N ~128-byte JSON orders already in the stream; a FastStream subscriber on a durable
pull consumer (fresh durable each round, max_ack_pending 20000 like the Rust bench), whose
handler takes the decoded pydantic `Order`s and counts them (by default a batch handler,
`list[Order]`, see PULL_BATCH below; `--handler message` for one `Order` per call); FastStream
acks each message after the handler returns (its default AckPolicy.REJECT_ON_ERROR). Timed
from `broker.start()` (connect, consumer creation, subscriber start) until N handled.

publish: N `broker.publish(order, subject, stream="fsbench", headers={"Nats-Msg-Id": ...})`
calls (an idempotency key each), each awaiting its PubAck, at most 2000 in flight (asyncio tasks bounded by a semaphore), on a connected broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

import nats
from nats.js.api import ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from pydantic import BaseModel

from faststream.nats import JStream, NatsBroker, PullSub

STREAM = "fsbench"
CONSUME_SUBJECT = "fsbench.orders"
PUBLISH_SUBJECT = "fsbench.published"
DURABLE = "faststream-consume"
WINDOW = 2000
MAX_ACK_PENDING = 20_000

# The pull configuration, chosen by measurement on the 2-core bench machine (N = 20000,
# a concurrent build running, so +-15%): `PullSub(batch_size=1000, batch=True)`, a handler
# that takes `list[Order]`. FastStream still decodes and validates every message into an
# `Order` (pydantic validates the list) and acks every message individually after the
# handler returns (NatsBatchMessage.ack), so the work per message is the same as the
# per-message path's; what it saves is FastStream's per-message machinery (a task, the
# middleware/logging scopes and a fast-depends call per message). Measured:
#   batch=True,  batch_size 50 / 200 / 500 / 1000 / 2000: ~11.5k / 11.4k / 13.5k / 13.4k / 12.3k msg/s
#   batch=False, batch_size 1 / 100 / 200 / 500 / 1000 / 5000: ~1.4k / 4.0k / 4.3k / 3.6k / 3.6k / 3.5k msg/s
# (batch=False fetches batch_size messages per pull request and runs one handler task per
# message, concurrently, then fetches the next batch.) `--handler message` measures the
# per-message handler, the same handler shape as natty's and the raw async-nats loop's.
PULL_BATCH = 1000
PULL_TIMEOUT = 1.0
# FastStream's publish() waits 0.5 s for the PubAck by default; with 2000 in flight on a
# busy 2-core machine an ack can take longer than that, so allow more (not a throughput knob).
PUBLISH_TIMEOUT = 10.0


class Order(BaseModel):
    """The ~128-byte JSON event of the Rust bench."""

    id: int
    region: str
    customer: str
    amount: int
    note: str


def order(i: int) -> dict:
    return {
        "id": i,
        "region": "eu-west-1",
        "customer": f"customer-{i % 1_000_000:06d}",
        "amount": i * 7 % 100_000,
        "note": "x" * 32,
    }


def median(values: list[float]) -> float:
    """The Rust bench's median: the upper middle value."""
    return sorted(values)[len(values) // 2]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_broker(url: str, faststream_logging: bool) -> NatsBroker:
    if faststream_logging:
        # FastStream's default: an INFO line per received and per processed message.
        return NatsBroker(url)
    # Only warnings and errors from FastStream's logger: the per-message INFO lines
    # ("Received" / "Processed") are what a production service would turn off.
    logger = logging.getLogger("faststream-bench")
    logger.setLevel(logging.WARNING)
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))
    return NatsBroker(url, logger=logger)


async def fill(js, count: int) -> None:
    """Publishes `count` orders with nats-py, pipelined, 2000 acks in flight (not timed)."""
    pending = []
    for i in range(count):
        payload = json.dumps(order(i), separators=(",", ":")).encode()
        pending.append(await js.publish_async(CONSUME_SUBJECT, payload))
        if len(pending) >= WINDOW:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


async def delete_consumer(js) -> None:
    try:
        await js.delete_consumer(STREAM, DURABLE)
    except NotFoundError:
        pass


async def consume_round(url: str, js, count: int, args) -> float:
    await delete_consumer(js)
    broker = make_broker(url, args.faststream_logging)
    handled = 0
    done = asyncio.Event()

    subscriber = dict(
        stream=JStream(STREAM, declare=False),
        durable=DURABLE,
        config=ConsumerConfig(max_ack_pending=MAX_ACK_PENDING),
    )
    if args.handler == "batch":

        @broker.subscriber(
            CONSUME_SUBJECT,
            pull_sub=PullSub(batch_size=args.pull_batch, timeout=PULL_TIMEOUT, batch=True),
            **subscriber,
        )
        async def handle_batch(orders: list[Order]) -> None:
            nonlocal handled
            handled += len(orders)
            if handled >= count:
                done.set()

    else:

        @broker.subscriber(
            CONSUME_SUBJECT,
            pull_sub=PullSub(batch_size=args.pull_batch, timeout=PULL_TIMEOUT),
            **subscriber,
        )
        async def handle(order: Order) -> None:
            nonlocal handled
            handled += 1
            if handled == count:
                done.set()

    started = time.perf_counter()
    await broker.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=args.round_timeout)
    except asyncio.TimeoutError:
        raise SystemExit(
            f"consume: only {handled} of {count} handled in {args.round_timeout} s"
        ) from None
    elapsed = time.perf_counter() - started
    await broker.stop()  # waits for the handlers in flight and their acks
    if handled != count:
        raise SystemExit(f"consume: handled {handled}, expected {count}")
    # Not timed: every message was acked (FastStream acks after the handler). The last
    # batch's acks may still be on their way when the broker stops: wait for them, bounded.
    deadline = time.monotonic() + 10
    while True:
        info = await js.consumer_info(STREAM, DURABLE)
        if (info.ack_floor.stream_seq >= count and not info.num_ack_pending) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    if info.ack_floor.stream_seq < count or info.num_ack_pending:
        raise SystemExit(
            f"consume: ack floor {info.ack_floor.stream_seq}, "
            f"{info.num_ack_pending} unacked, expected {count} acked"
        )
    return count / elapsed


async def publish_round(broker: NatsBroker, js, orders: list[Order], args, round_id: int) -> float:
    await js.purge_stream(STREAM)
    permits = asyncio.Semaphore(WINDOW)
    failures: list[BaseException] = []

    async def publish_one(item: Order) -> None:
        try:
            # An idempotency key each, as the Rust bench's raw and natty publishes carry.
            await broker.publish(
                item,
                PUBLISH_SUBJECT,
                stream=STREAM,
                timeout=PUBLISH_TIMEOUT,
                headers={"Nats-Msg-Id": f"fs-{round_id}-{item.id}"},
            )
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(error)
        finally:
            permits.release()

    in_flight: set[asyncio.Task] = set()
    started = time.perf_counter()
    for item in orders:
        await permits.acquire()
        task = asyncio.create_task(publish_one(item))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"publish: {len(failures)} failed, first: {failures[0]!r}")
    stored = (await js.stream_info(STREAM)).state.messages
    if stored != len(orders):
        raise SystemExit(f"publish: stream holds {stored}, expected {len(orders)}")
    return len(orders) / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="nats://host:port of a JetStream server")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="consume,publish", help="consume,publish")
    parser.add_argument("--pull-batch", type=int, default=PULL_BATCH,
                        help="PullSub(batch_size=...) (default %(default)s)")
    parser.add_argument("--handler", choices=("batch", "message"), default="batch",
                        help="batch: PullSub(batch=True), the handler takes list[Order]; "
                        "message: the handler takes one Order (default %(default)s)")
    parser.add_argument("--faststream-logging", action="store_true",
                        help="keep FastStream's default per-message INFO logging")
    parser.add_argument("--round-timeout", type=float, default=None,
                        help="seconds before a consume round is given up (default: N/100 + 60)")
    args = parser.parse_args()
    if args.messages < 1 or args.rounds < 1:
        parser.error("--messages and --rounds must be positive")
    if args.round_timeout is None:
        args.round_timeout = args.messages / 100 + 60
    only = set(args.only.split(","))

    # Fail fast (after ~3 tries) when no server listens there: nats-py retries for minutes.
    nc = await nats.connect(args.url, max_reconnect_attempts=3, reconnect_time_wait=0.5)
    js = nc.jetstream()
    try:
        await js.delete_stream(STREAM)
    except NotFoundError:
        pass
    await js.add_stream(
        StreamConfig(name=STREAM, subjects=[f"{STREAM}.>"], storage=StorageType.FILE)
    )
    log(
        f"faststream-bench: {args.messages} messages, {args.rounds} rounds, {args.url}; "
        f"PullSub(batch_size={args.pull_batch}), {args.handler} handler, "
        f"FastStream logging {args.faststream_logging}"
    )
    try:
        if "consume" in only:
            started = time.perf_counter()
            await fill(js, args.messages)
            log(f"  filled {args.messages} in {time.perf_counter() - started:.1f} s")
            rates = []
            for round_ in range(args.rounds):
                rates.append(await consume_round(args.url, js, args.messages, args))
                log(f"  consume round {round_}: faststream {rates[-1]:.0f} msg/s")
            await delete_consumer(js)
            print(f"faststream consume {median(rates):.0f}", flush=True)

        if "publish" in only:
            orders = [Order(**order(i)) for i in range(args.messages)]
            broker = make_broker(args.url, args.faststream_logging)
            await broker.connect()
            try:
                rates = []
                for round_ in range(args.rounds):
                    rates.append(await publish_round(broker, js, orders, args, round_))
                    log(f"  publish round {round_}: faststream {rates[-1]:.0f} msg/s")
            finally:
                await broker.stop()
            print(f"faststream publish {median(rates):.0f}", flush=True)
    finally:
        try:
            await js.delete_stream(STREAM)
        finally:
            await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
