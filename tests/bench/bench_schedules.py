"""Benchmark: 10,000 schedules loaded: startup time added, memory per schedule, claim latency.

    python3 tests/bench/bench_schedules.py [--schedules N] [--rounds R] [--claims C]

Daemons run with ``fsync: never`` (the core, not the disk) and no workers. The
schedules are half cron (a daily time of day in one of six zones, or every 5th
hour at a minute of its own) and half every (1 h to 3 h, each anchored at its own
creation), the socket-created ones on their own stream ``sched``, so their firings go
on during the measurement (a few a minute, as 10,000 real schedules would) without
touching the claimed stream. sparkq.yml cannot create a stream: its schedules go to
``default``.

1. startup: time from starting sparkqd to its first answer (median of 3), for an
   empty data directory's daemon, for one holding N socket-created schedules
   (after kill -9 before any snapshot, once: all N replayed from the journal; then
   after clean stops: loaded from the snapshot), and
   for one with N schedules in sparkq.yml (the first start creates them, a restart
   finds them unchanged).
2. memory: (VmRSS of the restarted daemon with N schedules - VmRSS of the restarted
   empty one) / N.
3. claim latency: two daemons, one with the N schedules and one with none, each
   with 1,000 pending tasks; each round times C claims (request/reply; each claimed
   task is completed and replaced, untimed), alternating which daemon goes first.
   Reported: the median of each, side by side per round, and the ratio. Target
   (issue 12): within 1.1x.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_scheduling import pipelined  # noqa: E402
from conftest import Daemon  # noqa: E402

BASE = """\
database: {fsync: never, snapshot_interval: 3600}
workers: {count: 0}
"""
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney",
         "America/Los_Angeles"]


def spec(n: int) -> dict:
    """Schedule n's timing: even n a cron, odd n an every."""
    if n % 2 == 0:
        if n % 4 == 0:
            return {"cron": f"{n % 60} {n // 60 % 24} * * *", "timezone": ZONES[n % 6]}
        return {"cron": f"{n % 60} */5 * * *", "timezone": ZONES[n % 6]}
    return {"every": f"{3600 + n % 7200}s"}


def schedule_requests(count: int) -> list[dict]:
    return [{"op": "schedule.create", "name": f"s{n:05d}", "tool": "llm-haiku",
             "stream": "sched", "payload": {"n": n}, "overlap": "allow", **spec(n)}
            for n in range(count)]


def config_text(count: int) -> str:
    lines = [BASE, "schedules:"]
    for n in range(count):
        fields = ", ".join(f"{k}: '{v}'" for k, v in spec(n).items())
        lines.append(f"  f{n:05d}: {{tool: llm-haiku, overlap: allow, {fields}}}")
    return "\n".join(lines) + "\n"


def rss(daemon: Daemon) -> int:
    with open(f"/proc/{daemon.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def timed_start(daemon: Daemon) -> float:
    started = time.perf_counter()
    daemon.start()
    return time.perf_counter() - started


def restarts(daemon: Daemon, times: int = 3, kill: bool = False) -> float:
    """Median start-to-ready of ``times`` restarts (after a clean stop, or kill -9)."""
    seconds = []
    for _ in range(times):
        daemon.kill() if kill else daemon.stop()
        seconds.append(timed_start(daemon))
    return statistics.median(seconds)


def fill_tasks(daemon: Daemon):
    conn = daemon.connect("msgpack")
    conn.sock.settimeout(None)
    pipelined(conn, [{"op": "enqueue", "tool": "llm-sonnet", "payload": f"job {n}"}
                     for n in range(1000)])
    return conn


def claim_round(conn, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        claimed = conn.ok(op="claim", stream="default", tool="llm-sonnet")
        latencies.append(time.perf_counter() - started)
        conn.ok(op="complete", task=claimed["id"])
        conn.ok(op="enqueue", tool="llm-sonnet", payload="again")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--claims", type=int, default=500)
    args = parser.parse_args()
    n = args.schedules
    with tempfile.TemporaryDirectory(prefix="sqsc-", dir="/tmp") as d:
        dirs = {name: Path(d) / name for name in ("empty", "socket", "file")}
        for path in dirs.values():
            path.mkdir()
        empty, loaded = Daemon(dirs["empty"], BASE), Daemon(dirs["socket"], BASE)
        from_file = Daemon(dirs["file"], config_text(n))
        try:
            empty.start()
            empty.ok(op="stream.create", name="sched", session="default")
            empty_start = restarts(empty)
            empty_rss = rss(empty)

            loaded.start()
            loaded.ok(op="stream.create", name="sched", session="default")
            conn = loaded.connect("msgpack")
            conn.sock.settimeout(None)
            started = time.perf_counter()
            refused = [r for r in pipelined(conn, schedule_requests(n)) if not r["ok"]]
            if refused:
                raise RuntimeError(f"{len(refused)} schedules refused, the first: {refused[0]}")
            created = time.perf_counter() - started
            conn.close()
            killed_start = restarts(loaded, times=1, kill=True)  # no snapshot yet: all replayed
            loaded_start = restarts(loaded)
            loaded_rss = rss(loaded)

            file_first = timed_start(from_file)
            file_again = restarts(from_file)
            assert len(from_file.ok(op="schedule.list")) == n
            from_file.kill()

            conns = {"with": fill_tasks(loaded), "none": fill_tasks(empty)}
            rounds = []
            for r in range(args.rounds):
                order = ["with", "none"] if r % 2 == 0 else ["none", "with"]
                medians = {k: statistics.median(claim_round(conns[k], args.claims)) for k in order}
                rounds.append((medians["with"], medians["none"]))
            fired = sum(s["fired"] for s in loaded.ok(op="schedule.list"))
        finally:
            for daemon in (empty, loaded, from_file):
                daemon.kill()
    report(n, created, empty_start, loaded_start, killed_start, file_first, file_again,
           empty_rss, loaded_rss, rounds, fired, args)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def report(n, created, empty_start, loaded_start, killed_start, file_first, file_again,
           empty_rss, loaded_rss, rounds, fired, args) -> None:
    print(f"{n:,} schedules (half cron in 6 zones, half every), created over the socket "
          f"pipelined in {created:.2f} s ({n / created:,.0f}/s)")
    print(f"startup to ready, median of 3: empty {ms(empty_start)}; "
          f"{n:,} socket schedules: snapshot {ms(loaded_start)} "
          f"(+{ms(loaded_start - empty_start)}),"
          f" journal replay (one run) {ms(killed_start)} (+{ms(killed_start - empty_start)}); "
          f"sparkq.yml: first start {ms(file_first)} (+{ms(file_first - empty_start)}), "
          f"restart {ms(file_again)} (+{ms(file_again - empty_start)})")
    print(f"memory: VmRSS {loaded_rss / 2**20:.1f} MiB vs {empty_rss / 2**20:.1f} MiB empty: "
          f"{(loaded_rss - empty_rss) / n:,.0f} bytes per schedule")
    print(f"claim latency, {args.claims} claims per round, median per round (us), with {n:,} "
          f"schedules vs none ({fired} firings during the rounds):")
    for r, (with_, none) in enumerate(rounds):
        print(f"  round {r + 1}: {with_ * 1e6:6.1f} vs {none * 1e6:6.1f}  ratio {with_ / none:.3f}")
    ratios = [w / o for w, o in rounds]
    ratio = statistics.median(ratios)
    print(f"  median {statistics.median(w for w, _ in rounds) * 1e6:.1f} us vs "
          f"{statistics.median(o for _, o in rounds) * 1e6:.1f} us, ratio {ratio:.3f}x "
          f"[{min(ratios):.3f}..{max(ratios):.3f}] (target <= 1.1x: "
          f"{'met' if ratio <= 1.1 else 'missed'})")


if __name__ == "__main__":
    main()
