"""Benchmark: preparing a task's worktree on a 10,000-file repository, against `git clone`.

    python3 tests/bench/bench_workspaces.py [--files N] [--rounds R] [--later K] [--dir D]

A bare repository of N files (100 per directory, about 200 bytes each) is made once and
reached by file:// URL, as a remote would be. Each round, interleaved:

- clone:  `git clone file://...` of it into a fresh directory: what an agent that clones
          for itself pays for every task;
- first:  a fresh sparkqd, an `agent` tool with `workspace: worktree`; the time from a
          claim request to its reply for the first task (clone without checkout,
          `git worktree add`, the journal's fsync);
- later:  the same for the next K tasks of that daemon, all held at once (fetch, resolve
          the ref, `git worktree add`): target at most 0.2 x a clone.

Disk: what one more worktree adds (its checkout; the objects are shared), against a
whole clone. Medians over the rounds; the machine is shared, so ratios matter more. Both
sides are mostly the creation of N files: ``--dir /dev/shm`` takes the disk out of it.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from conftest import Daemon  # noqa: E402
from sparkqd import disk_usage  # noqa: E402

GIT_ENV = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "bench",
           "GIT_AUTHOR_EMAIL": "bench@example.org", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@example.org"}


def git(*args, cwd=None) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True)


def make_repository(where: Path, files: int) -> Path:
    """A bare repository of ``files`` files on main; its path."""
    seed, bare = where / "seed", where / "big.git"
    for n in range(files):
        folder = seed / f"d{n // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{n:05d}.txt").write_text(f"line of file {n}\n" * 12)
    git("init", "--quiet", "-b", "main", cwd=seed)
    git("add", "--all", cwd=seed)
    git("commit", "--quiet", "-m", "many files", cwd=seed)
    git("clone", "--quiet", "--bare", str(seed), str(bare))
    return bare


def timed_clone(url: str, where: Path) -> tuple[float, int]:
    """Seconds a `git clone` takes, and the bytes the clone uses."""
    target = where / f"clone-{time.monotonic_ns()}"
    started = time.perf_counter()
    git("clone", "--quiet", url, str(target))
    elapsed = time.perf_counter() - started
    return elapsed, disk_usage(str(target))


def daemon_round(url: str, later: int, top: str) -> tuple[float, list[float], int, int]:
    """(first claim, later claims, bytes of one worktree, bytes of the shared clone)."""
    config = f"""
workers: {{count: 0}}
database: {{snapshot_interval: 3600}}
tools:
  agent: {{task_class: LLM_HEAVY, workspace: worktree, repo: "{url}"}}
"""
    with tempfile.TemporaryDirectory(prefix="sqb-", dir=top) as d:
        daemon = Daemon(Path(d), config, env={"GIT_CONFIG_NOSYSTEM": "1"}).start()
        try:
            conn = daemon.connect()
            conn.sock.settimeout(600)
            times, tasks = [], []
            for _ in range(later + 1):  # all held at once: no collection runs meanwhile
                conn.ok(op="enqueue", tool="agent", payload="work")
                started = time.perf_counter()
                tasks.append(conn.ok(op="claim", tool="agent"))
                times.append(time.perf_counter() - started)
            path = tasks[-1]["workspace"]["path"]
            sizes = disk_usage(path), disk_usage(str(Path(path).parent.parent / "main"))
            for task in tasks:
                conn.ok(op="complete", task=task["id"], lease=task["lease"])
            return times[0], times[1:], *sizes
        finally:
            daemon.stop()
            daemon.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--later", type=int, default=5)
    parser.add_argument("--dir", default="/tmp", help="where the files go (default /tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sqb-repo-", dir=args.dir) as d:
        where = Path(d)
        url = f"file://{make_repository(where, args.files)}"
        clones, firsts, laters, sizes = [], [], [], []
        for _ in range(args.rounds):
            seconds, clone_bytes = timed_clone(url, where)
            clones.append(seconds)
            first, later, worktree_bytes, main_bytes = daemon_round(url, args.later, args.dir)
            firsts.append(first)
            laters += later
            sizes.append((clone_bytes, worktree_bytes, main_bytes))
    clone, first, later = (statistics.median(x) for x in (clones, firsts, laters))
    clone_bytes, worktree_bytes, main_bytes = sizes[-1]
    print(f"a repository of {args.files} files in {args.dir}; medians of {args.rounds} rounds "
          f"({args.later} later tasks each)")
    print(f"{'':28} {'seconds':>8} {'x clone':>8}")
    for name, t in (("git clone", clone), ("first task (clone + worktree)", first),
                    ("later task (fetch + worktree)", later)):
        print(f"{name:28} {t:8.3f} {t / clone:8.2f}")
    print(f"later task: {later / clone:.2f} x a clone "
          f"(target <= 0.2: {'met' if later / clone <= 0.2 else 'missed'})")
    print(f"disk: a clone {clone_bytes / 2**20:.1f} MiB; the shared clone (no checkout) "
          f"{main_bytes / 2**20:.1f} MiB; each extra worktree {worktree_bytes / 2**20:.1f} MiB "
          f"({worktree_bytes / clone_bytes:.2f} x a clone)")


if __name__ == "__main__":
    main()
