"""sparkqd as a systemd user service: the units, sd_notify, socket activation, journald, install.

The real systemd tools check the units (`systemd-analyze verify`) and pass the
socket (`systemd-socket-activate`); a datagram socket of the test's own plays the
manager's end of `NOTIFY_SOCKET`. No user manager is ever reached: `service install`
runs with a temp `HOME`, `XDG_CONFIG_HOME` and an empty `XDG_RUNTIME_DIR`, so it
prints the `systemctl --user` steps instead of running them.
"""

import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

import sparkqctl
import sparkqd
from conftest import NO_HTTP, ROOT, SPARKQCTL, SPARKQD, Conn, wait_until

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
#: The console script pip installed for this Python (not a PATH shim such as pyenv's,
#: which would exec it from elsewhere), or None when sparkq is not installed.
INSTALLED_SPARKQCTL = shutil.which("sparkqctl", path=sysconfig.get_path("scripts"))
REPO_UNITS = [ROOT / "systemd" / "sparkqd.service", ROOT / "systemd" / "sparkqd.socket"]

needs_analyze = pytest.mark.skipif(not SYSTEMD_ANALYZE, reason="no systemd-analyze")
needs_activate = pytest.mark.skipif(not SOCKET_ACTIVATE, reason="no systemd-socket-activate")


def clean_env(**extra) -> dict[str, str]:
    """This environment without anything a service manager or SparkQ would set, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPARKQ_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_",
                                "JOURNAL_STREAM", "DBUS_SESSION_BUS_ADDRESS"))}
    return {**env, **extra}


def settings(unit_text: str) -> dict[str, str]:
    """A unit file's ``Key=value`` settings, comments left out."""
    lines = [line for line in unit_text.splitlines() if "=" in line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


# -- unit files and `sparkqctl service` --------------------------------------


@pytest.fixture
def user(workdir):
    """A user's temp HOME, XDG_CONFIG_HOME and XDG_RUNTIME_DIR (0700, no manager behind it)."""
    dirs = {name: workdir / name for name in ("home", "config", "run")}
    for path in dirs.values():
        path.mkdir(mode=0o700)
    return clean_env(HOME=str(dirs["home"]), XDG_CONFIG_HOME=str(dirs["config"]),
                     XDG_RUNTIME_DIR=str(dirs["run"]))


def unit_dir(user) -> str:
    return os.path.join(user["XDG_CONFIG_HOME"], "systemd", "user")


def verify(user, *units) -> str:
    """Everything `systemd-analyze --user verify` says; it exits 0 even for unknown keys."""
    out = subprocess.run([SYSTEMD_ANALYZE, "--user", "--man=no", "verify", *map(str, units)],
                         env=user, capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def service(user, *args, ctl=SPARKQCTL) -> subprocess.CompletedProcess:
    """Run `sparkqctl service ...` as ``user``; it must succeed with nothing on stderr."""
    out = subprocess.run([*ctl, "service", *args], env=user, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stderr == "", (out.returncode, out.stdout, out.stderr)
    return out


def installed_units(user) -> list[str]:
    return [os.path.join(unit_dir(user), name) for name in sparkqctl.UNITS]


def installed_exec_start(user) -> list[str]:
    """The installed service's ExecStart, split into words as systemd splits it."""
    service_unit = open(os.path.join(unit_dir(user), "sparkqd.service")).read()
    return shlex.split(settings(service_unit)["ExecStart"])


def fake_systemctl(user, workdir, failing: str = "") -> Path:
    """Put on ``user``'s PATH a systemctl that reaches a user manager: it logs each call and
    succeeds, except for calls containing ``failing``. Returns the log."""
    calls, script = workdir / "systemctl.calls", workdir / "bin" / "systemctl"
    script.parent.mkdir()
    fail = f'case "$*" in *"{failing}"*) exit 1;; esac\n' if failing else ""
    script.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n{fail}')
    script.chmod(0o755)
    user["PATH"] = f"{script.parent}:{user['PATH']}"
    return calls


@needs_analyze
def test_repository_units_pass_systemd_verify_silently(user):
    """Both units in systemd/ pass `systemd-analyze --user verify` with no output at all."""
    bin_dir = os.path.join(user["HOME"], ".local", "bin")
    os.makedirs(bin_dir)
    os.symlink(shutil.which("sparkqd") or sys.executable, os.path.join(bin_dir, "sparkqd"))
    assert verify(user, *REPO_UNITS) == ""


@needs_analyze
def test_repository_units_fail_verify_without_sparkqd_installed(user):
    """verify is a real check: with no %h/.local/bin/sparkqd it complains about ExecStart."""
    assert "sparkqd" in verify(user, *REPO_UNITS)


def test_service_unit_has_the_settings_the_issue_requires():
    """Type=notify, HUP reload, a watchdog, restart on failure, a mixed stop beyond kill_grace."""
    unit = settings(REPO_UNITS[0].read_text())
    assert unit["Type"] == "notify" and re.fullmatch(r"(/bin/|/usr/bin/)?kill -HUP \$MAINPID",
                                                     unit["ExecReload"])
    assert int(unit["WatchdogSec"]) > 0 and unit["Restart"] == "on-failure"
    assert unit["KillMode"] == "mixed" and unit["UMask"] == "0077"
    kill_grace = sparkqd.parse_config("").workers.kill_grace
    assert kill_grace == 10 and int(unit["TimeoutStopSec"]) > kill_grace
    assert "RuntimeDirectory" not in unit


def test_socket_unit_listens_privately_in_the_runtime_dir():
    """The socket is %t/sparkq/sparkqd.sock, 0600 in a 0700 directory, with no RuntimeDirectory."""
    unit = settings(REPO_UNITS[1].read_text())
    assert unit["ListenStream"] == "%t/sparkq/sparkqd.sock"
    assert unit["SocketMode"] == "0600" and unit["DirectoryMode"] == "0700"
    assert "RuntimeDirectory" not in unit


def test_repository_units_are_the_installer_units():
    """systemd/ holds exactly what the installer writes for ExecStart=%h/.local/bin/sparkqd."""
    expected = sparkqctl.unit_texts("%h/.local/bin/sparkqd")
    assert {path.name: path.read_text() for path in REPO_UNITS} == expected


@pytest.mark.skipif(not INSTALLED_SPARKQCTL, reason="sparkq is not pip-installed")
def test_service_install_from_console_script_points_at_sparkqd_beside_it(user):
    """The installed sparkqctl writes ExecStart= the absolute path of the sparkqd beside it."""
    service(user, "install", ctl=[INSTALLED_SPARKQCTL])
    beside = os.path.join(os.path.dirname(os.path.realpath(INSTALLED_SPARKQCTL)), "sparkqd")
    assert installed_exec_start(user) == [beside]


def test_service_install_from_checkout_runs_sparkqd_py_with_this_python(user):
    """`python3 sparkqctl.py service install` writes ExecStart=<python> <repo>/sparkqd.py."""
    service(user, "install")
    assert installed_exec_start(user) == [sys.executable, str(ROOT / "sparkqd.py")]


@needs_analyze
@pytest.mark.parametrize("ctl", [
    pytest.param([INSTALLED_SPARKQCTL], id="console-script",
                 marks=pytest.mark.skipif(not INSTALLED_SPARKQCTL, reason="not pip-installed")),
    pytest.param(SPARKQCTL, id="checkout")])
def test_service_install_writes_units_that_pass_verify(user, ctl):
    """Both units land in $XDG_CONFIG_HOME/systemd/user/ and verify prints nothing about them."""
    service(user, "install", ctl=ctl)
    assert sorted(os.listdir(unit_dir(user))) == sorted(sparkqctl.UNITS)
    assert verify(user, *installed_units(user)) == ""


@needs_analyze
def test_service_install_from_a_directory_with_a_space_writes_a_runnable_exec_start(user, workdir):
    """A sparkqd under a path with a space (a venv in "My Projects") is quoted: verify finds it."""
    scripts = workdir / "My Projects" / "bin"
    scripts.mkdir(parents=True)
    shutil.copy(ROOT / "sparkqctl.py", scripts / "sparkqctl")
    os.symlink(shutil.which("sparkqd") or sys.executable, scripts / "sparkqd")
    service(user, "install", ctl=[sys.executable, str(scripts / "sparkqctl")])
    assert verify(user, *installed_units(user)) == ""


def test_service_install_prints_systemctl_steps_when_no_user_manager(user):
    """With no user manager reachable it prints daemon-reload and enable to run, and linger."""
    out = service(user, "install").stdout
    assert "systemctl --user daemon-reload" in out
    enable = next(line for line in out.splitlines() if "systemctl --user enable" in line)
    assert "--now" not in enable and "sparkqd.socket" in enable
    assert "loginctl enable-linger" in out


def test_service_install_now_starts_in_the_enable_step(user):
    """`service install --now` prints `systemctl --user enable --now` for the units."""
    out = service(user, "install", "--now").stdout
    assert re.search(r"systemctl --user enable --now .*sparkqd\.socket", out)


def test_service_uninstall_removes_both_units(user):
    """Without a user manager, uninstall disables offline, removes the units, prints the stop."""
    service(user, "install")
    out = service(user, "uninstall").stdout
    assert f"$ systemctl --user disable {' '.join(sparkqctl.UNITS)}" in out
    assert "systemctl --user stop" in out
    assert os.listdir(unit_dir(user)) == []


def test_service_install_runs_each_step_printing_it_with_a_user_manager(user, workdir):
    """With a user manager reachable it runs daemon-reload, then enable --now, printing each."""
    calls = fake_systemctl(user, workdir)
    out = service(user, "install", "--now").stdout
    steps = ["--user daemon-reload", f"--user enable --now {' '.join(sparkqctl.UNITS)}"]
    assert [line for line in out.splitlines() if line.startswith("$ ")] == \
        [f"$ systemctl {step}" for step in steps]
    assert [c for c in calls.read_text().splitlines() if "show-environment" not in c] == steps


def test_service_install_fails_when_a_systemctl_step_fails(user, workdir):
    """A failing `systemctl --user enable` makes `service install` exit non-zero."""
    fake_systemctl(user, workdir, failing="enable")
    out = subprocess.run([*SPARKQCTL, "service", "install"], env=user, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode != 0 and "$ systemctl --user enable" in out.stdout


def test_service_uninstall_disables_then_reloads_with_a_user_manager(user, workdir):
    """With a user manager reachable, uninstall runs disable --now, then daemon-reload."""
    service(user, "install")
    calls = fake_systemctl(user, workdir)
    service(user, "uninstall")
    assert [c for c in calls.read_text().splitlines() if "show-environment" not in c] == \
        [f"--user disable --now {' '.join(sparkqctl.UNITS)}", "--user daemon-reload"]


def test_service_show_exec_prints_the_units_for_that_path(user):
    """`service show --exec PATH` prints both units with ExecStart=PATH and writes nothing."""
    out = service(user, "show", "--exec", "/opt/sparkq/bin/sparkqd").stdout
    assert "ExecStart=/opt/sparkq/bin/sparkqd\n" in out and sparkqctl.SOCKET_UNIT in out
    assert not os.path.exists(unit_dir(user))


# -- the service manager's side: a notify socket, a passed socket ------------


class ServiceManager:
    """The manager's end of NOTIFY_SOCKET: a datagram socket that collects sparkqd's messages."""

    def __init__(self, notify_socket: str):
        #: what the daemon gets as NOTIFY_SOCKET: a path, or @name in the abstract namespace
        self.notify_socket = notify_socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket)

    def receive(self, timeout: float) -> list[str] | None:
        """The lines of the next message, or None if none comes within ``timeout``."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            return self.sock.recv(4096).decode().split("\n")
        except TimeoutError:
            return None

    def expect(self, pattern: str, timeout=10.0) -> list[str]:
        """Skip messages until one has a line matching ``pattern``; return that message."""
        deadline = time.monotonic() + timeout
        while (lines := self.receive(deadline - time.monotonic())) is not None:
            if any(re.fullmatch(pattern, line) for line in lines):
                return lines
        raise AssertionError(f"no {pattern!r} from sparkqd within {timeout}s")

    def count(self, line: str, seconds: float) -> int:
        """How many messages with ``line`` arrive in the next ``seconds``."""
        deadline, seen = time.monotonic() + seconds, 0
        while (lines := self.receive(deadline - time.monotonic())) is not None:
            seen += line in lines
            if time.monotonic() >= deadline:
                break
        return seen


@pytest.fixture
def manager(workdir):
    manager = ServiceManager(str(workdir / "notify.sock"))
    yield manager
    manager.sock.close()


@pytest.fixture
def notified(make_daemon, manager):
    """Start a daemon that reports to ``manager``, with extra environment; don't wait for it."""
    def start(**env):
        daemon = make_daemon(env={"NOTIFY_SOCKET": manager.notify_socket, **env}, start=False)
        return daemon.start(wait=False)
    return start


@pytest.fixture
def activate(workdir):
    """Start sparkqd as a .socket unit would: `systemd-socket-activate -l SOCK sparkqd ...`."""
    started = []

    def start(config=None, env=None):
        sock, log = workdir / "activated.sock", open(workdir / "activated.log", "ab")
        if config is None:  # defaults, but no HTTP listener: other tests' daemons run too
            config = workdir / "activated.yml"
            config.write_text(NO_HTTP)
        proc = subprocess.Popen(
            [SOCKET_ACTIVATE, "-l", str(sock), *SPARKQD, "--data-dir", str(workdir / "data"),
             "--config", str(config)],
            env=clean_env(**(env or {})), stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        started.append((proc, log))
        wait_until(sock.exists, message="systemd-socket-activate to listen")
        return proc, sock

    yield start
    for proc, log in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


# -- socket activation -------------------------------------------------------


@needs_activate
def test_socket_activation_serves_first_client_on_inherited_socket(activate):
    """The first connection starts sparkqd, which answers it on the socket it was passed."""
    proc, sock = activate()
    status = Conn(sock).ok(op="status")
    assert status["socket"] == str(sock) and status["pid"] == proc.pid


@needs_activate
@pytest.mark.parametrize("stop", ["shutdown-op", "sigterm"])
def test_socket_activation_stop_leaves_socket_file(activate, stop):
    """An activated sparkqd stops cleanly and never removes the socket file it did not create."""
    proc, sock = activate()
    conn = Conn(sock)
    conn.ok(op="status")
    if stop == "shutdown-op":
        conn.ok(op="shutdown")
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert sock.is_socket()


@needs_activate
def test_socket_activation_tasks_do_not_inherit_service_variables(activate, manager, workdir):
    """A task the pool runs sees no LISTEN_PID, LISTEN_FDS, NOTIFY_SOCKET or WATCHDOG_USEC."""
    (workdir / "sparkq.yml").write_text("workers:\n  count: 1\n" + NO_HTTP)
    _, sock = activate(workdir / "sparkq.yml", {"NOTIFY_SOCKET": manager.notify_socket,
                                                "WATCHDOG_USEC": "30000000"})
    conn = Conn(sock)
    task = conn.ok(op="enqueue", tool="run-bash", payload="env")["id"]
    wait_until(lambda: conn.ok(op="task", task=task)["status"] == "completed", message="env to run")
    env = conn.ok(op="logs", task=task)["log"]
    assert "SPARKQ_TASK_ID=" in env
    assert not re.search(r"^(LISTEN_PID|LISTEN_FDS|NOTIFY_SOCKET|WATCHDOG_USEC)=", env, re.M)


def test_socket_activation_ignored_when_listen_pid_is_another_process(make_daemon):
    """LISTEN_FDS for another process (LISTEN_PID not ours) is ignored: sparkqd binds its own."""
    daemon = make_daemon(env={"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"})
    assert daemon.ok(op="status")["socket"] == str(daemon.socket)


# -- sd_notify ---------------------------------------------------------------


def test_notify_ready_only_once_daemon_answers(notified, manager):
    """READY=1 is the first message, and when it arrives sparkqd already answers on its socket."""
    daemon = notified()
    assert "READY=1" in manager.receive(timeout=20)
    assert Conn(daemon.socket, timeout=2).ok(op="hello")["protocol"] >= 1


def test_notify_ready_reports_recovered_queue(make_daemon, manager):
    """After a restart, READY=1 comes with a STATUS that already counts the recovered tasks."""
    daemon = make_daemon()
    for _ in range(2):
        daemon.ok(op="enqueue", tool="llm-haiku")
    daemon.stop()
    daemon.extra_env["NOTIFY_SOCKET"] = manager.notify_socket
    daemon.start(wait=False)
    assert any(line.startswith("STATUS=2 pending,") for line in manager.expect("READY=1", 20))


def test_notify_status_shows_queue_counts_in_one_line(notified, manager):
    """A change to the queue is reported as one STATUS= line of pending, running, failed counts."""
    daemon = notified()
    manager.expect("READY=1", 20)
    daemon.ok(op="enqueue", tool="llm-haiku")
    manager.expect(r"STATUS=1 pending, 0 waiting, 0 running, 0 failed; workers 0/0 busy")


def test_notify_watchdog_pings_at_half_the_timeout(notified, manager):
    """With WATCHDOG_USEC=400000, WATCHDOG=1 arrives about every 0.2 s (6 to 14 in 2 s)."""
    notified(WATCHDOG_USEC="400000")
    manager.expect("READY=1", 20)
    assert 6 <= manager.count("WATCHDOG=1", seconds=2.0) <= 14


def test_notify_watchdog_silent_when_watchdog_pid_is_another_process(notified, manager):
    """With WATCHDOG_PID naming another process, sparkqd never sends WATCHDOG=1."""
    notified(WATCHDOG_USEC="400000", WATCHDOG_PID=str(os.getpid()))
    manager.expect("READY=1", 20)
    assert manager.count("WATCHDOG=1", seconds=1.0) == 0


def test_notify_sighup_sends_reloading_then_ready(notified, manager):
    """SIGHUP reports RELOADING=1 with MONOTONIC_USEC of now, then READY=1 again."""
    daemon = notified()
    manager.expect("READY=1", 20)
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = manager.expect("RELOADING=1")
    usec = next(int(line[15:]) for line in reloading if re.fullmatch(r"MONOTONIC_USEC=\d+", line))
    assert abs(usec / 1e6 - time.monotonic()) < 5
    manager.expect("READY=1")


def test_notify_refused_reload_still_ends_with_ready(notified, manager):
    """A reload refused for a bad config still reports READY=1 after RELOADING=1."""
    daemon = notified()
    manager.expect("READY=1", 20)
    daemon.config_path.write_text("workers: [not, a, mapping]\n")
    daemon.proc.send_signal(signal.SIGHUP)
    manager.expect("RELOADING=1")
    manager.expect("READY=1")


def test_notify_sigterm_sends_stopping(notified, manager):
    """SIGTERM reports STOPPING=1, and the daemon then exits 0."""
    daemon = notified()
    manager.expect("READY=1", 20)
    daemon.proc.send_signal(signal.SIGTERM)
    manager.expect("STOPPING=1")
    assert daemon.proc.wait(20) == 0


def test_notify_abstract_socket_receives_ready(make_daemon, workdir):
    """NOTIFY_SOCKET=@name reaches a socket bound to the abstract address \\0name."""
    manager = ServiceManager(f"@sparkq-test-{workdir.name}")
    make_daemon(env={"NOTIFY_SOCKET": manager.notify_socket}, start=False).start(wait=False)
    manager.expect("READY=1", 20)
    manager.sock.close()


# -- journald log formatting -------------------------------------------------


def journal_daemon(make_daemon, workdir, same_file: bool):
    """Run and stop a daemon whose stderr is a file, with JOURNAL_STREAM naming it or not."""
    log_path = workdir / "sparkqd.log"  # the file Daemon.start sends stdout and stderr to
    log_path.touch()
    st = os.stat(log_path)
    stream = f"{st.st_dev}:{st.st_ino if same_file else st.st_ino + 1}"
    daemon = make_daemon(env={"JOURNAL_STREAM": stream})
    daemon.stop()
    return daemon.logs().splitlines()


def test_journal_stream_matching_stderr_gives_priority_prefixes(make_daemon, workdir):
    """When JOURNAL_STREAM is stderr's dev:inode, every line starts <N> and has no timestamp."""
    lines = journal_daemon(make_daemon, workdir, same_file=True)
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines)
    assert any(line.startswith("<6>") and "ready" in line for line in lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines)


def test_journal_stream_of_another_file_gives_timestamped_lines(make_daemon, workdir):
    """When JOURNAL_STREAM names some other file, lines are timestamped with no <N> prefix."""
    lines = journal_daemon(make_daemon, workdir, same_file=False)
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in lines)
    assert not any(line.startswith("<") for line in lines)


def test_journal_formatter_prefixes_every_line_of_a_traceback():
    """An error with a traceback is <3> on every line, so journald keeps it one priority."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("sparkqd", logging.ERROR, __file__, 1, "failed", None,
                                   sys.exc_info())
    lines = sparkqd.JournalFormatter("%(message)s").format(record).splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
