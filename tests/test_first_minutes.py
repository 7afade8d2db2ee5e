"""The first ten minutes: what a new user meets, each through `sparkqctl` as they type it.

`sparkqctl start` (detached, its log in the state directory, the daemon's refusal when
it refuses), the refusals that need no data coming before the data directory is made,
"starting" while the daemon is not ready, empty claims at a terminal, keys that dedupe,
paused streams, human output without Python reprs, completion, config errors, and the
small usage messages.
"""

import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import sparkqd
from conftest import SPARKQCTL, Conn, wait_until

CTL = " ".join(map(shlex.quote, SPARKQCTL))
LONG = "d" * 110  #: a directory name that makes any socket path under it too long


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPARKQ_", "XDG_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
    return {**env, **extra}


def run(*args, env=None, cwd=None, stderr=subprocess.PIPE, timeout=30):
    """`sparkqctl ARGS` as typed, with ``env``."""
    return subprocess.run([*SPARKQCTL, *map(str, args)], env=env, cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=stderr, timeout=timeout)


def process_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def user(workdir):
    """A user's environment: a state directory and a socket of their own, nothing running;
    whatever `sparkqctl start` started is stopped at the end."""
    env = clean_env(XDG_STATE_HOME=str(workdir / "state"),
                    SPARKQ_SOCKET=str(workdir / "sparkqd.sock"))
    yield env
    for lock in (workdir / "state").glob("**/sparkqd.lock"):
        if lock.read_text().split():
            pid = int(lock.read_text().split()[0])
            with_pid_gone(pid)


def with_pid_gone(pid: int) -> None:
    """End a daemon a test started through `sparkqctl start`, by its pid."""
    if not process_gone(pid):
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: process_gone(pid), timeout=20, message=f"sparkqd {pid} to stop")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)


def fields(text: str) -> dict[str, str]:
    """The `key: value` lines of a human view."""
    return dict(re.match(r"(\S+):\s+(.*)", line).groups() for line in text.splitlines()
                if re.match(r"\S+:\s", line))


# -- sparkqctl start ------------------------------------------------------------------------


def test_start_runs_sparkqd_detached_with_its_log_in_the_state_directory(user, workdir):
    """`sparkqctl start` exits 0 once sparkqd answers, printing where it listens and logs;
    the daemon has a session of its own and /dev/null as stdin."""
    out = run("start", env=user, cwd=workdir)
    # (on a loaded machine recovery may pass a second: then start says it waits, and why)
    waited = re.fullmatch(r"(sparkqctl: sparkqd is starting \(.*\); waiting for it\n)?", out.stderr)
    assert out.returncode == 0 and waited, out.stderr
    shown, log = fields(out.stdout), workdir / "state" / "sparkq" / "sparkqd.log"
    assert (shown["socket"], shown["log"]) == (user["SPARKQ_SOCKET"], str(log))
    assert (shown["config"], shown["cwd"]) == ("built-in defaults", str(workdir))
    pid = int(shown["pid"])
    assert "ready" in log.read_text() and os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert json.loads(run("status", "--json", env=user).stdout)["pid"] == pid


def test_start_when_a_daemon_answers_says_so_and_exits_0(user, workdir):
    """A second `sparkqctl start` leaves the running daemon alone and says it runs."""
    started = run("start", env=user, cwd=workdir)
    assert started.returncode == 0, started.stderr
    first = fields(started.stdout)["pid"]
    again = run("start", env=user, cwd=workdir)
    assert again.returncode == 0 and again.stdout.startswith("sparkqd is already running")
    assert fields(again.stdout)["pid"] == first


def test_start_passes_data_dir_and_config_and_puts_the_log_in_that_data_dir(user, workdir):
    """`start --data-dir D --config F` runs sparkqd on them, with its log at D/sparkqd.log."""
    (workdir / "my.yml").write_text("project: {name: mine}\n")
    data = workdir / "state" / "elsewhere"
    out = run("start", "--data-dir", data, "--config", workdir / "my.yml", env=user)
    shown = fields(out.stdout)
    assert (shown["data_dir"], shown["log"]) == (str(data), str(data / "sparkqd.log"))
    assert shown["config"] == str(workdir / "my.yml")


@pytest.mark.parametrize("config, says", [
    ("databse: {}", "$.databse: unknown key; did you mean database?"),
    ("database: {fsync: sometimes}",
     "$.database.fsync: invalid value 'sometimes'; expected one of always, batch, never"),
])
def test_start_prints_the_daemons_refusal_and_exits_1(user, workdir, config, says):
    """A configuration sparkqd refuses makes `start` exit 1 with the daemon's own words."""
    (workdir / "bad.yml").write_text(config)
    out = run("start", "--config", workdir / "bad.yml", env=user, cwd=workdir)
    assert (out.returncode, out.stdout) == (1, "")
    assert "exited with status 2" in out.stderr and says in out.stderr


def test_start_on_a_data_dir_another_daemon_holds_prints_its_pid(make_daemon, user, workdir):
    """`start` on a data directory in use prints the holder's pid; its socket is not left."""
    first = make_daemon(subdir="first")
    out = run("start", "--data-dir", first.data_dir, env=user)
    assert out.returncode == 1 and f"in use by sparkqd pid {first.proc.pid} " in out.stderr
    assert not Path(user["SPARKQ_SOCKET"]).exists()


def test_socket_path_too_long_is_said_by_sparkqctl_and_start(user, workdir):
    """A too-long socket path: any command says it is too long (107 bytes) and does not ask
    whether the daemon runs; `start` refuses before it makes a data directory."""
    env = {**user, "SPARKQ_SOCKET": str(workdir / LONG / "sparkqd.sock")}
    status = run("status", env=env)
    assert status.returncode == 3 and "107" in status.stderr and "running?" not in status.stderr
    start = run("start", env=env)
    assert start.returncode == 1 and "more than the 107" in start.stderr
    assert not (workdir / "state").exists()


# -- refusals before the data, and "starting" ------------------------------------------------


@pytest.mark.parametrize("trouble", ["socket path too long", "live daemon on the socket"])
def test_refusals_that_need_no_data_come_before_the_data_dir_is_made(make_daemon, trouble):
    """sparkqd refuses a too-long socket path, or a socket a live daemon holds, without
    creating its data directory."""
    first = make_daemon()
    second = make_daemon(start=False, subdir="second")
    second.socket = (second.workdir / LONG / "s.sock" if trouble.startswith("socket")
                     else first.socket)
    second.start(wait=False)
    assert second.proc.wait(20) == 1
    assert not second.data_dir.exists()


class StoppingHolder:
    """A process holding a data directory's lock as a daemon that is stopping does."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
                "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242 stopping\\n');"
                "print('held', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(data_dir / "sparkqd.lock")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "held\n"

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def test_while_starting_clients_hear_starting_and_sparkqctl_waits(make_daemon, workdir):
    """Until the daemon can recover, a request gets `unavailable: starting (recovering N
    records)`; `sparkqctl status` meanwhile waits, says so once, and then answers."""
    daemon = make_daemon(start=False)
    holder = StoppingHolder(daemon.data_dir)
    try:
        daemon.start(wait=False)
        wait_until(daemon.socket.exists, message="sparkqd to listen")
        reply = Conn(daemon.socket).call(op="status", id=7)
        assert (reply["id"], reply["error"]["code"]) == (7, "unavailable")
        assert re.fullmatch(r"starting \(recovering \d+ records\)", reply["error"]["message"])
        waiting = subprocess.Popen([*SPARKQCTL, "status", "--json"], env=daemon.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert waiting.stderr.readline().startswith(
            "sparkqctl: sparkqd is starting (recovering 0 records); waiting")
        assert waiting.poll() is None
    finally:
        holder.release()
    out, err = waiting.communicate(timeout=20)
    assert (waiting.returncode, err) == (0, "") and json.loads(out)["pid"] == daemon.proc.pid


def ready_within(fd, seconds: float) -> bool:
    return bool(select.select([fd], [], [], seconds)[0])


def test_a_daemon_that_holds_the_data_dir_while_stopping_is_waited_for(make_daemon):
    """`sparkqctl stop; sparkqctl start`: a new daemon waits for one that is stopping to let
    go of the data directory, then starts; READY=1 comes only then."""
    daemon = make_daemon(start=False)
    holder = StoppingHolder(daemon.data_dir)
    daemon.start(wait=False)
    wait_until(lambda: "is stopping; waiting for it" in daemon.logs(), message="the wait")
    assert daemon.proc.poll() is None
    holder.release()
    daemon.wait_ready()
    assert daemon.ctl_json("status")["pid"] == daemon.proc.pid


def test_a_data_dir_held_by_a_running_daemon_is_refused_at_once(make_daemon):
    """A holder that is not stopping is refused without waiting, naming its pid."""
    first = make_daemon()
    second = make_daemon(start=False, subdir="second")
    second.data_dir = first.data_dir
    second.start(wait=False)
    assert second.proc.wait(5) == 1 and f"pid {first.proc.pid} " in second.logs()


# -- claim, peek and enqueue at the terminal --------------------------------------------------


def with_terminal_stderr(*args, env) -> tuple[int, str, str]:
    """Run sparkqctl with stderr on a pseudo-terminal: (exit status, stdout, stderr)."""
    main, side = pty.openpty()
    try:
        out = run(*args, env=env, stderr=side)
        os.close(side)
        side = None
        said = b""
        while ready_within(main, 0.2):
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal's other side is closed: all is read
                break
            if not chunk:
                break
            said += chunk
        return out.returncode, out.stdout, said.decode().replace("\r\n", "\n")
    finally:
        os.close(main)
        if side is not None:
            os.close(side)


@pytest.mark.parametrize("line, says", [
    (["claim"], "nothing to claim in default\n"),
    (["peek", "--tool", "llm-haiku", "--tool", "run-bash"],
     "nothing to peek in default for llm-haiku, run-bash\n")])
def test_empty_claim_or_peek_at_a_terminal_says_so_on_stderr(shared, line, says):
    """At a terminal, an empty claim or peek says so on stderr; stdout stays empty; exit 4."""
    assert with_terminal_stderr(*line, env=shared.env) == (4, "", says)
    piped = shared.ctl(*line)
    assert (piped.returncode, piped.stdout, piped.stderr) == (4, "", "")


def test_enqueue_with_a_key_that_exists_prints_its_id_and_says_existing(daemon):
    """A deduplicated `enqueue --key` prints the existing id and says "existing" on stderr."""
    first = daemon.ctl("enqueue", "--tool", "llm-haiku", "--key", "nightly")
    again = daemon.ctl("enqueue", "--tool", "llm-haiku", "--key", "nightly")
    assert (first.stdout, first.stderr) == ("1\n", "")
    assert again.stdout == "1\n" and "existing task 1 has key nightly" in again.stderr
    assert daemon.ctl_json("enqueue", "--tool", "llm-haiku", "--key", "nightly")["existing"]


# -- what the human views show --------------------------------------------------------------


def test_stream_list_shows_which_streams_are_paused(daemon):
    """`stream list` has a PAUSED column: yes for a paused stream, no for the others."""
    daemon.ok(op="stream.create", name="w1", session="default")
    daemon.ok(op="stream.pause", name="w1")
    lines = daemon.ctl_ok("stream", "list").splitlines()
    assert lines[0].split()[:4] == ["NAME", "SESSION", "STATUS", "PAUSED"]
    assert sorted(line.split()[:4] for line in lines[1:]) == [
        ["default", "default", "active", "no"], ["w1", "default", "active", "yes"]]


#: What a Python repr of a value looks like in text meant for people.
REPR = re.compile(r"\bNone\b|\bTrue\b|\bFalse\b|\['|\{'|': ")


def test_key_value_views_are_aligned_and_free_of_python_reprs(make_daemon, workdir):
    """status, task and reload print `key:` padded to one column, then the value as text."""
    (workdir / "scripts").mkdir()
    daemon = make_daemon(config=f"script_dirs: [{workdir / 'scripts'}]\n")
    first = daemon.ok(op="enqueue", tool="llm-haiku")["id"]
    task = daemon.ok(op="enqueue", tool="llm-haiku", after=[first], payload={"a": [1]})["id"]
    for view in (daemon.ctl_ok("status"), daemon.ctl_ok("task", task), daemon.ctl_ok("reload")):
        lines = [line for line in view.splitlines() if re.match(r"\S+:", line)]
        columns = {len(re.match(r"\S+:\s+", line)[0]) for line in lines}
        assert len(columns) == 1 and not REPR.search(view), view
    shown = fields(daemon.ctl_ok("task", task))
    assert (shown["after"], shown["waiting_for"]) == (str(first), "after")
    assert fields(daemon.ctl_ok("reload"))["task_classes"] == (
        "FAST_SCRIPT, LLM_HEAVY, LLM_LITE, MEDIUM_SCRIPT")


def test_table_views_are_free_of_python_reprs(make_daemon, workdir):
    """tools, scripts, workers, locks, tasks and sessions print text, never a repr."""
    (workdir / "scripts").mkdir()
    script = workdir / "scripts" / "deploy.sh"
    script.write_text("#!/bin/sh\n# description: ship it\n# args: ENV\n")
    script.chmod(0o755)
    daemon = make_daemon(config=f"script_dirs: [{workdir / 'scripts'}]\n", workers=1)
    daemon.ok(op="enqueue", tool="llm-haiku", lock="repo")
    daemon.ok(op="claim", worker="agent")
    for command in ("tools", "scripts", "workers", "locks", "tasks", "session list"):
        view = daemon.ctl_ok(*command.split())
        assert view.strip() and not REPR.search(view), (command, view)
    assert "deploy" in daemon.ctl_ok("scripts") and "repo" in daemon.ctl_ok("locks")


def test_schema_prints_json(shared):
    """`schema` prints the JSON Schema as JSON, in human form as with --json."""
    schema = json.loads(shared.ctl_ok("schema"))
    assert schema == shared.ctl_json("schema") and "$defs" in schema


def test_status_shows_where_runs_start(make_daemon, workdir):
    """`status` shows `cwd`: project.repo_path when set, else the daemon's own directory."""
    plain = make_daemon(subdir="plain")
    assert fields(plain.ctl_ok("status"))["cwd"] == str(plain.workdir)
    repo = make_daemon(config=f"project: {{repo_path: {workdir}}}\n", subdir="repo")
    assert fields(repo.ctl_ok("status"))["cwd"] == str(workdir)


# -- completion ----------------------------------------------------------------------------


def bash_offers(daemon, workdir: Path, *lines: str) -> list[str]:
    """What bash's _sparkqctl offers for each command line (its last word being completed),
    with a `sparkqctl` on PATH that runs this checkout."""
    bindir = workdir / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "sparkqctl").write_text(f'#!/bin/sh\nexec {CTL} "$@"\n')
    (bindir / "sparkqctl").chmod(0o755)
    script = (f"source <({CTL} completion bash)\n"
              'offer() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _sparkqctl; '
              'echo "${COMPREPLY[*]}"; }\n' + "".join(f"offer {line}\n" for line in lines))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                         env={**daemon.env, "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_bash_completes_options_global_options_ids_and_actions(daemon, workdir):
    """`enqueue --pay<TAB>`, `--json enq<TAB>`, `task <TAB>` (every id, by number) and
    `session <TAB>` (its actions: the daemon has no session pause or resume)."""
    ids = [daemon.ok(op="enqueue", tool="llm-haiku")["id"] for _ in range(11)]
    daemon.ok(op="claim")
    daemon.ok(op="complete", task=ids[0])
    payload, command, tasks, session = bash_offers(
        daemon, workdir, "sparkqctl enqueue --pay", "sparkqctl --json enq",
        'sparkqctl task ""', 'sparkqctl session ""')
    assert payload.split() == ["--payload", "--payload-json", "--payload-file"]
    assert command == "enqueue" and tasks.split() == [str(i) for i in range(1, 12)]
    assert session.split() == ["create", "list", "end"] and "session.pause" not in sparkqd.OPS


@pytest.mark.skipif(not os.path.exists("/usr/bin/fish"), reason="fish is not installed")
def test_fish_completes_options_after_a_global_option(workdir):
    """fish offers `enqueue` for `--json enq` and the payload options for `enqueue --pay`."""
    script = workdir / "sparkqctl.fish"
    script.write_text(run("completion", "fish").stdout)
    out = subprocess.run(["fish", "-c", f"source {script}; complete -C 'sparkqctl --json enq';"
                          "complete -C 'sparkqctl enqueue --pay'"], capture_output=True,
                         text=True, timeout=30)
    offered = [line.split("\t")[0] for line in out.stdout.splitlines()]
    assert offered == ["enqueue", "--payload", "--payload-file", "--payload-json"]


def test_usage_error_lists_the_commands_but_not_the_hidden_one():
    """An unknown command lists the valid ones; the internal `__complete` is not among them."""
    out = run("frobnicate")
    assert out.returncode == 2 and "'enqueue'" in out.stderr and "'start'" in out.stderr
    assert "__complete" not in out.stderr


# -- small messages --------------------------------------------------------------------------


def test_history_since_error_names_every_form():
    """A bad `history --since` names RFC 3339, local time and the `30m` form."""
    out = run("history", "--since", "yesterday")
    assert out.returncode == 2 and "30m" in out.stderr and "RFC 3339" in out.stderr


def test_reload_of_a_bad_config_lists_an_enums_values(make_daemon):
    """`sparkqctl reload` of a config with a bad enum value lists the values allowed."""
    daemon = make_daemon(config="")
    daemon.config_path.write_text("database: {fsync: sometimes}\n")
    out = daemon.ctl("reload")
    assert out.returncode == 1 and "expected one of always, batch, never" in out.stderr


def test_stop_then_start_at_once_brings_the_queue_back(user, workdir):
    """`sparkqctl stop && sparkqctl start`, typed together, restart the daemon with its tasks."""
    run("start", env=user, cwd=workdir)
    run("enqueue", "--tool", "llm-haiku", "--payload", "kept", env=user)
    out = subprocess.run(["bash", "-c", f"{CTL} stop && {CTL} start"], env=user, cwd=workdir,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(run("task", "1", "--json", env=user).stdout)["payload"] == "kept"


def test_start_waits_when_the_log_says_ready_on_its_own_socket_before_it_answers(make_daemon):
    """The daemon's "ready" line can reach the log before its socket answers `start`'s probe:
    that is a race to wait out, not a daemon on another socket."""
    import sparkqctl

    d = make_daemon(start=False)
    log = d.workdir / "start.log"
    log.write_text(f"sparkqd ready: socket {d.socket}, data {d.data_dir}, 0 tasks\n")
    d.start(wait=False)
    assert sparkqctl.await_daemon(d.proc, str(d.socket), str(log), 0) is None
    assert d.ok(op="hello")["protocol"]


def test_start_names_the_socket_a_daemon_is_ready_on_when_it_is_another(workdir):
    """A daemon ready on another socket (its configuration's server.socket) is named, with
    the export that reaches it."""
    import sparkqctl

    log, elsewhere = workdir / "start.log", workdir / "other.sock"
    log.write_text(f"sparkqd ready: socket {elsewhere}, data {workdir}, 0 tasks\n")
    proc = subprocess.Popen(["sleep", "30"])
    try:
        problem = sparkqctl.await_daemon(proc, str(workdir / "sparkqd.sock"), str(log), 0)
    finally:
        proc.kill()
        proc.wait()
    assert problem is not None and f"export SPARKQ_SOCKET={elsewhere}" in problem
