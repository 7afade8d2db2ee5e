"""Benchmark: the daemon running trivial tasks itself, against a shell loop.

    python3 tests/bench/bench_runner.py [--tasks N] [--rounds R]

Each round, interleaved on the same machine:

- shell:     a bash loop running ``bash -c true`` N times, one after another: the cost of
             the process spawns alone;
- sparkqd 1: N run-bash tasks with payload ``true`` and one worker slot, from the first
             enqueue to the last completion (durable, fsync always): spawn + daemon;
- sparkqd 4: the same with ``workers.count: 4``.

Reported: tasks/s of each, the ratio to the shell loop, and the daemon's own overhead
per task: (sparkqd 1 time - shell time) / N. Target: at most 2 ms per task.
Medians over the rounds; the machine is shared, so ratios matter more than times.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import Daemon, wait_until  # noqa: E402


def shell_loop(n: int) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-c", f"for i in $(seq {n}); do bash -c true; done"], check=True)
    return time.perf_counter() - started


def daemon_run(n: int, workers: int) -> float:
    """Seconds from the first enqueue to the last completion of n `true` tasks."""
    with tempfile.TemporaryDirectory(prefix="sqb-", dir="/tmp") as d:
        daemon = Daemon(Path(d), f"workers:\n  count: {workers}\n").start()
        try:
            conn = daemon.connect("msgpack")
            frame = conn.frame({"op": "enqueue", "tool": "run-bash", "payload": "true"})
            # Pipelined from a thread while this one reads the replies: the enqueues are not
            # what is measured, and a client that stops reading is held back by the daemon.
            sender = threading.Thread(target=conn.send_raw, args=(frame * n,))
            started = time.perf_counter()
            sender.start()
            ids = [conn.recv()["result"]["id"] for _ in range(n)]
            sender.join()
            conn.sock.settimeout(None)  # `wait` answers when the last task ends
            conn.ok(op="wait", tasks=ids, timeout=600)
            elapsed = time.perf_counter() - started
            counts = conn.ok(op="status")["counts"]
            assert counts["completed"] == n, counts
            return elapsed
        finally:
            daemon.stop()
            daemon.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.tasks
    shell, one, four = [], [], []
    for _ in range(args.rounds):
        shell.append(shell_loop(n))
        one.append(daemon_run(n, 1))
        four.append(daemon_run(n, 4))
    s, o, f = (statistics.median(x) for x in (shell, one, four))
    print(f"{n} trivial tasks, median of {args.rounds} interleaved rounds")
    print(f"{'':12} {'seconds':>8} {'tasks/s':>8} {'x shell':>8}")
    for name, t in (("shell loop", s), ("sparkqd 1", o), ("sparkqd 4", f)):
        print(f"{name:12} {t:8.2f} {n / t:8.0f} {s / t:8.2f}")
    overhead = (o - s) / n * 1000
    print(f"daemon overhead per task (1 worker, beyond the spawn): {overhead:.2f} ms "
          f"(target <= 2 ms: {'met' if overhead <= 2 else 'missed'})")
    print("spread: shell " + ", ".join(f"{x:.2f}" for x in shell)
          + "; sparkqd 1 " + ", ".join(f"{x:.2f}" for x in one)
          + "; sparkqd 4 " + ", ".join(f"{x:.2f}" for x in four))


if __name__ == "__main__":
    main()
