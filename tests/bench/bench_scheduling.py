"""Benchmark: claim latency with priorities, locks and waiting tasks, large queue vs small.

    python3 tests/bench/bench_scheduling.py [--pending N] [--rounds R]

Two daemons (``fsync: never``, to measure the core rather than the disk) hold the same
shape of queue at two sizes:

- large: N pending tasks (default 1,000,000), N/10 waiting ones (delayed a day), every
  pending task under one of 1,000 lock keys and one of 5 priorities;
- small: 1,000 pending tasks, 100 waiting, the same keys and priorities.

In both, 500 of the 1,000 locks are held by claimed tasks that stay running, so claims
keep meeting tasks whose lock is taken and must set them aside. Each round times claim
requests (request/reply, one at a time; each claimed task is completed and replaced,
untimed), alternating between the daemons. Reported: median claim latency of each and
the ratio large/small. Target (issue 3): within 1.5x.
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import Daemon  # noqa: E402

CONFIG = """\
database: {fsync: never, snapshot_interval: 3600}
workers: {count: 0}
tools:
  bench: {task_class: Q}
task_classes:
  Q: {timeout: 86400}
"""
LOCKS = 1000


def pipelined(conn, messages: list[dict]) -> list:
    """Send from a thread while reading here: the daemon holds back a client that stops reading."""
    data = b"".join(conn.frame(m) for m in messages)
    sender = threading.Thread(target=conn.send_raw, args=(data,))
    sender.start()
    replies = [conn.recv() for _ in messages]
    sender.join()
    return replies


def task(n: int, **extra) -> dict:
    return {"op": "enqueue", "tool": "bench", "payload": f"job {n}", "priority": n % 5,
            "lock": f"git@example.com:team/repo-{n % LOCKS}"} | extra


def fill(daemon: Daemon, pending: int) -> object:
    conn = daemon.connect("msgpack")
    conn.sock.settimeout(None)
    for start in range(0, pending, 50_000):
        pipelined(conn, [task(n) for n in range(start, min(pending, start + 50_000))])
    pipelined(conn, [task(n, delay=86400) for n in range(pending // 10)])
    held = 0
    while held < LOCKS // 2:  # hold half of the locks with tasks that stay running
        claimed = conn.ok(op="claim", stream="default")
        if int(claimed["lock"].rsplit("-", 1)[1]) < LOCKS // 2:
            held += 1
        else:
            conn.ok(op="complete", task=claimed["id"])
    return conn


def claim_round(conn, count: int, serial: int) -> list[float]:
    latencies = []
    for n in range(count):
        started = time.perf_counter()
        claimed = conn.ok(op="claim", stream="default")
        latencies.append(time.perf_counter() - started)
        conn.ok(op="complete", task=claimed["id"])
        conn.ok(**task(serial + n, lock=claimed["lock"]))  # same size, same locks free
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--claims", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sqs-", dir="/tmp") as d:
        for name in ("large", "small"):
            (Path(d) / name).mkdir()
        large, small = Daemon(Path(d) / "large", CONFIG), Daemon(Path(d) / "small", CONFIG)
        for daemon in (large, small):
            daemon.start()
        try:
            started = time.perf_counter()
            conn_large = fill(large, args.pending)
            print(f"filled {args.pending:,} pending + {args.pending // 10:,} waiting in "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
            conn_small = fill(small, 1000)
            big, little, ratios = [], [], []
            for r in range(args.rounds):
                order = [(conn_large, big), (conn_small, little)]
                for conn, sink in (order if r % 2 == 0 else order[::-1]):
                    sink.append(statistics.median(claim_round(conn, args.claims, 10**9 + r * 10**6)))
                ratios.append(big[-1] / little[-1])
        finally:
            for daemon in (large, small):
                daemon.kill()
    print(f"claim latency, {args.pending:,} pending + {args.pending // 10:,} waiting + {LOCKS} "
          f"lock keys (half held) vs 1,000 pending: median of {args.rounds} rounds")
    print(f"  large {statistics.median(big) * 1e6:.0f} us, small {statistics.median(little) * 1e6:.0f} us,"
          f" ratio {statistics.median(ratios):.2f}x [{min(ratios):.2f}..{max(ratios):.2f}]"
          f" (target <= 1.5x: {'met' if statistics.median(ratios) <= 1.5 else 'missed'})")


if __name__ == "__main__":
    main()
