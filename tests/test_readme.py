"""The README's shell blocks run as pasted, in order, on a fresh install.

Every ```sh and ```bash block of README.md is run by bash (with `set -e`: any command
that fails fails the block), one after another, as a new user would paste them: in an
empty working directory, with a HOME and an XDG_RUNTIME_DIR of their own and no SPARKQ_
variable, so the daemon and the blocks find each other at the default paths. PATH starts
with `sparkqctl`, `sparkqd` and `python3` wrappers that run this checkout's files with
this Python (what `pip install .` would put there). The daemon is started as the first
set-up command does: `sparkqctl start`.

A block is skipped when the line before it is a comment
`<!-- not run by tests/test_readme.py: REASON -->`: the set-up commands (they install;
`.ci/run` runs the test command, which a test below checks is the README's), the systemd
units (tests/test_systemd.py) and the SSH forward (another machine). Illustrative blocks
use another fence language (```text) and are not run.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sparkqd
from conftest import ROOT, wait_until

README = ROOT / "README.md"
SKIP_MARK = re.compile(r"<!-- not run by tests/test_readme\.py: (.+) -->")
#: The first set-up command: what a user types to install and start.
SET_UP = "pip install . && sparkqctl start"


def shell_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, text, why it is skipped or None) of every sh or bash block, in order."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if re.fullmatch(r"```(sh|bash)\s*", lines[i]):
            skipped = SKIP_MARK.fullmatch(lines[i - 1].strip()) if i else None
            end = lines.index("```", i + 1)
            blocks.append((i + 1, "\n".join(lines[i + 1:end]) + "\n",
                           skipped[1] if skipped else None))
            i = end
        i += 1
    return blocks


def fenced(text: str, language: str, after: str) -> str:
    """The body of the first block of ``language`` after the line ``after``."""
    tail = text[text.index(after):]
    start = tail.index(f"```{language}\n") + len(language) + 4
    return tail[start:tail.index("```", start)]


def wrapper(bindir: Path, name: str, command: str) -> None:
    path = bindir / name
    path.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
    path.chmod(0o755)


@pytest.fixture
def new_user(workdir):
    """The environment and working directory of a new user who just ran `pip install .`."""
    home, run, bindir, cwd = (workdir / name for name in ("home", "run", "bin", "work"))
    for directory in (home, bindir, cwd):
        directory.mkdir()
    run.mkdir(mode=0o700)
    wrapper(bindir, "sparkqctl", f"{sys.executable} {ROOT / 'sparkqctl.py'}")
    wrapper(bindir, "sparkqd", f"{sys.executable} {ROOT / 'sparkqd.py'}")
    wrapper(bindir, "python3", sys.executable)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPARKQ_", "XDG_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
    env.update(HOME=str(home), XDG_RUNTIME_DIR=str(run), PATH=f"{bindir}:{env['PATH']}")
    yield env, cwd
    stop_daemon(env, cwd, home / ".local/state/sparkq/sparkqd.lock")


def stop_daemon(env: dict, cwd: Path, lock: Path) -> None:
    """Stop the daemon the blocks left running, and wait until it is gone."""
    if not lock.exists() or not lock.read_text().split():
        return
    pid = int(lock.read_text().split()[0])
    subprocess.run(["sparkqctl", "stop"], env=env, cwd=cwd, capture_output=True, timeout=30)
    try:
        wait_until(lambda: not Path(f"/proc/{pid}").exists()
                   or "zombie" in Path(f"/proc/{pid}/status").read_text(), timeout=20,
                   message=f"sparkqd {pid} to stop")
    except AssertionError:
        os.kill(pid, 9)
        raise


def run_block(env: dict, cwd: Path, line: int, block: str) -> None:
    out = subprocess.run(["bash", "-e", "-c", block], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=40)
    if out.returncode != 0:
        log = Path(env["HOME"], ".local/state/sparkq/sparkqd.log")
        pytest.fail(f"README.md block at line {line} exited {out.returncode}:\n{block}\n"
                    f"--- stdout:\n{out.stdout}\n--- stderr:\n{out.stderr}\n"
                    f"--- sparkqd.log:\n{log.read_text() if log.exists() else '(none)'}",
                    pytrace=False)


#: The outside tools the README's blocks call (.ci/run installs them).
TOOLS = ("socat", "sqlite3")


@pytest.mark.skipif(not all(map(shutil.which, TOOLS)), reason=f"needs {', '.join(TOOLS)}")
def test_readme_shell_blocks_run_as_pasted_in_order(new_user):
    """`sparkqctl start`, then every README shell block not marked as skipped, exits 0."""
    env, cwd = new_user
    blocks = shell_blocks(README.read_text())
    assert blocks[0][1:] == (SET_UP + "\n", "it installs")
    run_block(env, cwd, blocks[0][0], SET_UP.split(" && ", 1)[1])
    ran = 0
    for line, block, skipped in blocks:
        if skipped is None:
            run_block(env, cwd, line, block)
            ran += 1
    assert ran >= 5, "the README's runnable blocks went missing"


def test_readme_test_command_is_what_ci_runs():
    """The second set-up command, which the test above skips, is the one .ci/run runs."""
    blocks = shell_blocks(README.read_text())
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert blocks[1][1] == ci + "\n" and blocks[1][2] is not None


#: A configuration of each mistake the README shows, in the README's order.
MISTAKES = ["databse: {}", "database: {fsync: sometimes}",
            "tools: {deploy: {task_class: SLOW}}", "server: {port: 8420}",
            "http: {listen: '0.0.0.0:8420'}"]


def test_readme_config_error_examples_are_the_real_messages():
    """The configuration errors the README shows are, word for word, what sparkqd says."""
    shown = fenced(README.read_text(), "text", "Mistakes are refused").splitlines()
    real = []
    for text in MISTAKES:
        with pytest.raises(sparkqd.ConfigError) as refused:
            sparkqd.parse_config(text, "sparkq.yml")
        real.append(str(refused.value))
    assert shown == real


def test_readme_stream_list_fields_are_the_replys(shared):
    """The README's `stream.list` fields are the keys of a stream in the reply, in order."""
    row = next(line for line in README.read_text().splitlines()
               if line.startswith("| `stream.list` |"))
    fields = re.search(r"\[\{(.+?)\}\]", row)[1].split(", ")
    assert fields == list(shared.ok(op="stream.list")[0])


def test_shell_blocks_are_found_with_their_skip_marks():
    """The extraction sees sh and bash blocks only, and the mark on the line before one."""
    text = ("x\n<!-- not run by tests/test_readme.py: why -->\n```sh\na\n```\n"
            "```text\nb\n```\n```bash\nc\nd\n```\n```python\ne\n```\n")
    assert shell_blocks(text) == [(3, "a\n", "why"), (9, "c\nd\n", None)]
