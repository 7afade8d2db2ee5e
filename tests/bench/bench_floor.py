#!/usr/bin/env python3
"""What limits a one-client request/reply queue on this machine: the floors beside SparkQ.

Run from the repository root::

    python3 tests/bench/bench_floor.py             # about 1 minute
    python3 tests/bench/bench_floor.py --rounds 9 --count 5000

``bench_core.py`` compares SparkQ with beanstalkd. This script says how much of what
is left between them any server written like SparkQ pays, by timing, with the same
one-request-then-the-whole-reply client and in alternating rounds:

- **python floor**: a uvloop server of a dozen lines that splits msgpack frames,
  decodes each, and answers a small encoded map on the next loop turn, as sparkqd
  does, and nothing else: the least a Python asyncio server pays per round trip;
- **sparkqd** with ``fsync: never`` (only CPU is measured) and ``always``;
- **beanstalkd** with ``-F`` and ``-f 0``, the anchors of ``bench_core.py``;
- **disk floor**: 128-byte appends to a preallocated file, each followed by
  ``fdatasync``, in this process: the most durable one-client requests the disk allows.

Each row is the median rate of the rounds with its min..max, and its ratio to the row it
is compared with (the median of per-round ratios). Never collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402 (this script's own directory)
from bench_core import (Beanstalkd, SparkQ, SqClient, _children, interleave,  # noqa: E402
                        serial_enqueue, spread)

#: The python floor: frames in, a small map out on the next loop turn, nothing else.
FLOOR_SERVER = r"""
import asyncio, struct, sys, msgspec, uvloop
HEADER = struct.Struct(">I")
decode, encode = msgspec.msgpack.decode, msgspec.msgpack.encode
class Floor(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buf = transport, bytearray()
    def data_received(self, data):
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (n,) = HEADER.unpack_from(self.buf, 0)
            if len(self.buf) < 4 + n:
                break
            request = decode(bytes(self.buf[4:4 + n]))
            del self.buf[:4 + n]
            body = encode({"id": request.get("id"), "ok": True, "result": {"id": 1}})
            out.append(HEADER.pack(len(body)) + body)
        asyncio.get_running_loop().call_soon(self.transport.write, b"".join(out))
async def main():
    await asyncio.get_running_loop().create_unix_server(Floor, sys.argv[1])
    await asyncio.Event().wait()
uvloop.run(main())
"""


class PythonFloor:
    """The floor server as a process of its own, spoken to as sparkqd is."""

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True)
        self.socket = str(workdir / "floor.sock")
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, self.socket])
        _children.append(self.proc)
        deadline = time.perf_counter() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError("the floor server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def client(self) -> SqClient:
        return SqClient(self.socket)


def disk_floor(workdir: Path, count: int, time_limit: float) -> float:
    """Durable 128-byte appends per second: write then fdatasync, one at a time."""
    path = workdir / "floor.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, 128 * count + 4096)
        record, done, started = b"r" * 128, 0, time.perf_counter()
        while done < count and time.perf_counter() - started < time_limit:
            os.write(fd, record)
            os.fdatasync(fd)
            done += 1
        return done / (time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()


def rounds_of(server, count: int, limit: float):
    return lambda: serial_enqueue(server, count, limit)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=3000, help="requests per round")
    parser.add_argument("--time-limit", type=float, default=4.0, help="seconds per round")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sparkq-floor-", dir="/tmp"))
    servers = {"python floor": PythonFloor(work / "floor"),
               "sparkqd never": SparkQ(work / "never", fsync="never"),
               "beanstalkd -F": Beanstalkd(work / "bf", fsync=False),
               "sparkqd always": SparkQ(work / "always", fsync="always"),
               "beanstalkd -f 0": Beanstalkd(work / "b0", fsync=True)}
    for server in servers.values():
        server.start()
    try:
        rates: dict[str, list[float]] = {}
        pairs = [("sparkqd never", "python floor"), ("python floor", "beanstalkd -F"),
                 ("sparkqd always", "beanstalkd -f 0")]
        for a, b in pairs:
            bench_core.log(f"{a} vs {b}")
            xs, ys = interleave(args.rounds, rounds_of(servers[a], args.count, args.time_limit),
                                rounds_of(servers[b], args.count, args.time_limit))
            rates.setdefault(a, []).extend(xs)
            rates.setdefault(b, []).extend(ys)
            rates[f"{a} / {b}"] = [x / y for x, y in zip(xs, ys)]
        bench_core.log("disk floor vs beanstalkd -f 0")
        xs, ys = interleave(args.rounds, lambda: disk_floor(work, args.count, args.time_limit),
                            rounds_of(servers["beanstalkd -f 0"], args.count, args.time_limit))
        rates["disk floor"] = xs
        rates["beanstalkd -f 0 / disk floor"] = [y / x for x, y in zip(xs, ys)]
    finally:
        for server in servers.values():
            server.stop()
    print(f"one client, request/reply, {args.rounds} interleaved rounds "
          f"(load {os.getloadavg()[0]:.1f}); rates in requests/s, ratios per round")
    for name, values in rates.items():
        median, low, high = spread(values)
        unit = "x" if "/" in name else "/s"
        shown = (f"{median:.2f}x [{low:.2f}..{high:.2f}]" if unit == "x"
                 else f"{median:,.0f}/s [{low:,.0f}..{high:,.0f}]")
        print(f"  {name:34} {shown}")
    per_trip = {name: 1e6 / statistics.median(values) for name, values in rates.items()
                if "/" not in name}
    print("  microseconds per round trip: " + ", ".join(
        f"{name} {us:.0f}" for name, us in per_trip.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
