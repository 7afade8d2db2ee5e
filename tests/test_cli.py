"""sparkqctl against a real sparkqd: every core command, what it prints and its exit status.

Each test runs the command under test through sparkqctl; the state it needs
beforehand is set up over the socket, which is quicker than a process per step.
"""

import json
import time

import pytest


BUILTIN_TOOLS = {"run-bash", "run-python", "llm-haiku", "llm-sonnet"}


def ctl_ok(daemon, *args, input=None) -> str:
    """Run sparkqctl, which must succeed with nothing on stderr; return its stdout."""
    out = daemon.ctl(*args, input=input)
    assert out.returncode == 0 and out.stderr == "", (out.returncode, out.stderr)
    return out.stdout


def ctl_json(daemon, *args, input=None):
    """Run sparkqctl with --json after the command and parse what it prints."""
    return json.loads(ctl_ok(daemon, *args, "--json", input=input))


def quiet_ids(daemon, *args) -> list[int]:
    """Run sparkqctl -q and read the ids it printed, one a line."""
    return [int(line) for line in ctl_ok(daemon, "-q", *args).split()]


def add_task(daemon, stream="default", payload=None) -> int:
    """Enqueue an agent task over the socket; return its id."""
    return daemon.ok(op="enqueue", stream=stream, tool="llm-haiku", payload=payload)["id"]


def running_task(daemon, worker=None) -> int:
    """Enqueue a task into an empty default stream and claim it over the socket."""
    task_id = add_task(daemon)
    assert daemon.ok(op="claim", worker=worker)["id"] == task_id
    return task_id


def add_stream(daemon, name, session="default"):
    """Create a stream (and its session, if new) over the socket."""
    if session not in {s["name"] for s in daemon.ok(op="session.list")}:
        daemon.ok(op="session.create", name=session)
    daemon.ok(op="stream.create", name=name, session=session)



# -- the lifecycle --------------------------------------------------------------


def test_session_and_stream_create_list_end(daemon):
    """Sessions and streams are created, listed, and ended together."""
    assert ctl_ok(daemon, "session", "create", "work") == "session work active\n"
    assert ctl_ok(daemon, "stream", "create", "w1", "--session", "work") == "stream w1 active\n"
    assert {s["name"] for s in ctl_json(daemon, "session", "list")} == {"default", "work"}
    assert ctl_ok(daemon, "session", "end", "work") == "session work ended\n"
    streams = ctl_json(daemon, "stream", "list", "--session", "work")
    assert [(s["name"], s["status"]) for s in streams] == [("w1", "ended")]


def test_session_list_shows_every_session(daemon):
    """`session list` prints a table with each session and its status."""
    add_stream(daemon, "w1", session="work")
    lines = ctl_ok(daemon, "session", "list").splitlines()
    assert lines[0].split()[:2] == ["NAME", "STATUS"]
    assert sorted(line.split()[:2] for line in lines[1:]) == [["default", "active"],
                                                              ["work", "active"]]


def test_stream_list_shows_every_stream(daemon):
    """`stream list` prints a table with each stream and its session."""
    add_stream(daemon, "w1", session="work")
    lines = ctl_ok(daemon, "stream", "list").splitlines()
    assert lines[0].split()[:3] == ["NAME", "SESSION", "STATUS"]
    assert sorted(line.split()[:3] for line in lines[1:]) == [["default", "default", "active"],
                                                              ["w1", "work", "active"]]


def test_stream_end_refuses_new_tasks(daemon):
    """`stream end` makes the stream refuse new tasks; enqueue then exits 1 with conflict."""
    add_stream(daemon, "w1")
    assert ctl_ok(daemon, "stream", "end", "w1") == "stream w1 ended\n"
    out = daemon.ctl("enqueue", "--stream", "w1", "--tool", "llm-haiku")
    assert out.returncode == 1 and "conflict" in out.stderr


def test_enqueue_prints_only_the_id(daemon):
    """`enqueue` prints the new task's id and nothing else."""
    assert ctl_ok(daemon, "enqueue", "--tool", "run-bash", "--payload", "make test") == "1\n"
    assert ctl_ok(daemon, "enqueue", "--tool", "llm-haiku") == "2\n"
    assert daemon.ok(op="task", task=1)["payload"] == "make test"


def test_peek_shows_next_task_without_claiming(daemon):
    """`peek` shows the next pending task and leaves it pending."""
    task_id = add_task(daemon, payload="make test")
    shown = ctl_ok(daemon, "peek")
    assert "make test" in shown and "pending" in shown
    assert ctl_json(daemon, "peek")["id"] == task_id
    assert daemon.ok(op="task", task=task_id)["status"] == "pending"


def test_claim_human_form(daemon):
    """`claim` prints the claimed task as `field: value` lines, payload included."""
    task_id = add_task(daemon, payload="review src/")
    lines = ctl_ok(daemon, "claim", "--worker", "agent-1").splitlines()
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in lines
                                         if not line.startswith(" "))}
    assert (fields["id"], fields["status"]) == (str(task_id), "running")
    assert (fields["worker"], fields["payload"]) == ("agent-1", "review src/")


def test_claim_json_parses(daemon):
    """`claim --json` prints the claimed task record as JSON."""
    task_id = add_task(daemon, payload="review src/")
    task = ctl_json(daemon, "claim", "--worker", "agent-1")
    assert (task["id"], task["status"], task["worker"]) == (task_id, "running", "agent-1")
    assert task["payload"] == "review src/"


def test_complete_with_summary_and_result(daemon):
    """`complete ID --summary --result-json` finishes the task and keeps both."""
    task_id = running_task(daemon)
    out = ctl_ok(daemon, "complete", task_id, "--summary", "all green",
                 "--result-json", '{"tests": 412}')
    assert out == f"task {task_id} completed\n"
    task = daemon.ok(op="task", task=task_id)
    assert (task["status"], task["summary"], task["result"]) == ("completed", "all green",
                                                                 {"tests": 412})


def test_fail_with_reason(daemon):
    """`fail ID --reason` fails the running task and records why."""
    task_id = running_task(daemon)
    out = ctl_ok(daemon, "fail", task_id, "--reason", "3 tests failed")
    assert out == f"task {task_id} failed\n"
    task = daemon.ok(op="task", task=task_id)
    assert (task["status"], task["reason"]) == ("failed", "3 tests failed")


def test_requeue_makes_failed_task_claimable(daemon):
    """`requeue ID` puts a failed task back to pending, to be claimed again."""
    task_id = running_task(daemon)
    daemon.ok(op="fail", task=task_id, reason="flaky")
    assert ctl_ok(daemon, "requeue", task_id) == f"task {task_id} pending\n"
    assert ctl_json(daemon, "claim")["id"] == task_id


def test_task_shows_history(daemon):
    """`task ID` shows the record and every transition from creation on."""
    task_id = running_task(daemon, worker="agent-1")
    daemon.ok(op="complete", task=task_id)
    assert [h["status"] for h in ctl_json(daemon, "task", task_id)["history"]] == [
        "pending", "running", "completed"]
    shown = ctl_ok(daemon, "task", task_id)
    history = [line.split()[1].rstrip(":") for line in shown.splitlines() if line.startswith("  ")]
    assert history == ["pending", "running", "completed"] and "agent-1" in shown


def test_tasks_filters(daemon):
    """`tasks` filters by --stream, --session, --status and --limit, oldest first."""
    add_stream(daemon, "w1", session="work")
    first, second, third = add_task(daemon), add_task(daemon), add_task(daemon, stream="w1")
    daemon.ok(op="claim")
    assert quiet_ids(daemon, "tasks") == [first, second, third]
    assert quiet_ids(daemon, "tasks", "--stream", "w1") == [third]
    assert quiet_ids(daemon, "tasks", "--session", "default") == [first, second]
    assert quiet_ids(daemon, "tasks", "--status", "running") == [first]
    assert quiet_ids(daemon, "tasks", "--limit", "2") == [first, second]


def test_tasks_human_table(daemon):
    """`tasks` prints a table with one row per task."""
    task_id = add_task(daemon, payload="make test")
    lines = ctl_ok(daemon, "tasks").splitlines()
    assert lines[0].split()[:4] == ["ID", "STREAM", "TOOL", "STATUS"]
    assert lines[1].split()[:4] == [str(task_id), "default", "llm-haiku", "pending"]


def test_purge_older_than_zero_removes_finished(daemon):
    """`purge --older-than 0` removes every finished task and leaves the others."""
    done = running_task(daemon)
    waiting = add_task(daemon)
    daemon.ok(op="complete", task=done)
    assert ctl_ok(daemon, "purge", "--older-than", "0") == "purged 1 tasks\n"
    assert [t["id"] for t in daemon.ok(op="tasks")] == [waiting]


def test_tools_lists_builtin_tools(shared):
    """`tools` lists the built-in tools, in human form and as JSON."""
    names = {line.split()[0] for line in ctl_ok(shared, "tools").splitlines() if line.strip()}
    assert BUILTIN_TOOLS <= names
    assert set(ctl_json(shared, "tools")["tools"]) == BUILTIN_TOOLS


def test_status_human_and_json(shared):
    """`status` shows the daemon's pid and socket, in human form and as JSON."""
    shown = ctl_ok(shared, "status")
    assert str(shared.proc.pid) in shown and str(shared.socket) in shown
    status = ctl_json(shared, "status")
    assert status["pid"] == shared.proc.pid and status["counts"]["pending"] == 0


def test_stop_makes_daemon_exit_zero(daemon):
    """`stop` asks the daemon to stop; it exits with status 0 and is gone."""
    ctl_ok(daemon, "stop")
    assert daemon.proc.wait(20) == 0
    assert daemon.ctl("status").returncode == 3


# -- arguments ------------------------------------------------------------------


def test_task_id_option_like_positional(daemon):
    """`--task-id ID` names a task just as the positional ID does."""
    task_id = running_task(daemon)
    assert ctl_json(daemon, "task", "--task-id", task_id)["id"] == task_id
    assert ctl_ok(daemon, "complete", "--task-id", task_id) == f"task {task_id} completed\n"


def test_payload_json_sent_as_value(daemon):
    """`--payload-json` sends the parsed JSON value as the payload."""
    ctl_ok(daemon, "enqueue", "--tool", "llm-haiku", "--payload-json", '{"files": [1, 2]}')
    ctl_ok(daemon, "enqueue", "--tool", "llm-haiku", "--payload-json", "10")
    assert [t["payload"] for t in daemon.ok(op="tasks")] == [{"files": [1, 2]}, 10]


def test_payload_file_read(daemon, workdir):
    """`--payload-file PATH` sends the file's text as the payload."""
    (workdir / "job.sh").write_text("make test\nmake lint\n")
    task_id = int(ctl_ok(daemon, "enqueue", "--tool", "llm-haiku", "--payload-file",
                         workdir / "job.sh"))
    assert daemon.ok(op="task", task=task_id)["payload"] == "make test\nmake lint\n"


def test_payload_file_dash_reads_stdin(daemon):
    """`--payload-file -` sends standard input as the payload."""
    out = ctl_ok(daemon, "enqueue", "--tool", "llm-haiku", "--payload-file", "-",
                 input="from stdin\n")
    assert daemon.ok(op="task", task=int(out))["payload"] == "from stdin\n"


def test_sparkq_stream_is_default_stream(make_daemon):
    """$SPARKQ_STREAM names the stream enqueue, peek and claim use without --stream."""
    daemon = make_daemon(env={"SPARKQ_STREAM": "work"})
    add_stream(daemon, "work")
    task_id = int(ctl_ok(daemon, "enqueue", "--tool", "llm-haiku"))
    assert ctl_json(daemon, "peek")["stream"] == "work"
    assert ctl_json(daemon, "claim")["id"] == task_id
    assert daemon.ok(op="tasks", stream="default") == []


def test_quiet_prints_ids_only(daemon):
    """-q prints only ids, whether given before or after the command."""
    first, second = add_task(daemon), add_task(daemon)
    assert ctl_ok(daemon, "-q", "tasks") == ctl_ok(daemon, "tasks", "-q") == f"{first}\n{second}\n"
    assert ctl_ok(daemon, "claim", "-q") == f"{first}\n"
    assert ctl_ok(daemon, "--quiet", "claim") == f"{second}\n"


def test_json_before_or_after_command(daemon):
    """--json works before the command and after it."""
    task_id = add_task(daemon)
    before = json.loads(ctl_ok(daemon, "--json", "peek"))
    after = json.loads(ctl_ok(daemon, "peek", "--json"))
    assert before == after and before["id"] == task_id


# -- exit status ----------------------------------------------------------------


def test_unknown_task_exits_1_with_code(shared):
    """A request the daemon refuses exits 1 with its error code and message on stderr."""
    out = shared.ctl("task", 999)
    assert (out.returncode, out.stdout) == (1, "")
    assert "not_found" in out.stderr and "999" in out.stderr


def test_illegal_transition_exits_1(daemon):
    """Completing a pending task exits 1 with conflict on stderr."""
    task_id = add_task(daemon)
    out = daemon.ctl("complete", task_id)
    assert (out.returncode, out.stdout) == (1, "") and "conflict" in out.stderr


USAGE_ERRORS = {
    "missing --tool": ["enqueue", "--payload", "x"],
    "bad --payload-json": ["enqueue", "--tool", "llm-haiku", "--payload-json", "{nope"],
    "bad --result-json": ["complete", "1", "--result-json", "[1,"],
    "ID and --task-id": ["task", "1", "--task-id", "1"],
    "no ID at all": ["requeue"],
    "unknown command": ["frobnicate"],
}


@pytest.mark.parametrize("args", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_error_exits_2(shared, args):
    """A usage error exits 2 with a message on stderr and sends nothing."""
    out = shared.ctl(*args)
    assert out.returncode == 2 and out.stderr and out.stdout == ""
    assert shared.ok(op="tasks") == []


def test_unreachable_daemon_exits_3(make_daemon):
    """With nothing listening on the socket, sparkqctl exits 3 and says how to start sparkqd."""
    out = make_daemon(start=False).ctl("status")
    assert out.returncode == 3 and out.stdout == ""
    assert "sparkqd" in out.stderr and "start" in out.stderr.lower()


@pytest.mark.parametrize("command", ["claim", "peek"])
def test_empty_stream_exits_4(shared, command):
    """claim and peek on an empty stream print nothing and exit 4."""
    out = shared.ctl(command)
    assert (out.returncode, out.stdout) == (4, "")


def test_claim_wait_runs_out_exits_4(shared):
    """`claim --wait 0.2` on an empty stream exits 4 once the wait runs out."""
    started = time.monotonic()
    out = shared.ctl("claim", "--wait", "0.2")
    assert (out.returncode, out.stdout) == (4, "")
    assert time.monotonic() - started >= 0.2


def subcommands(parser) -> list[str]:
    """The commands a parser has a parser for."""
    import argparse

    return next((list(a.choices) for a in parser._actions
                 if isinstance(a, argparse._SubParsersAction)), [])


def test_only_the_given_commands_parser_is_built():
    """sparkqctl builds the parser of the command given alone; for -h, every command by name
    but the hidden ones."""
    import sparkqctl

    assert subcommands(sparkqctl.build_parser("claim")) == ["claim"]
    assert subcommands(sparkqctl.build_parser("__complete")) == ["__complete"]
    assert subcommands(sparkqctl.build_parser()) == [c.name for c in sparkqctl.TABLE
                                                     if not c.hidden]
    assert subcommands(sparkqctl.build_parser(sparkqctl.command_given(["--version"]))) == []


@pytest.mark.parametrize("argv, given", [
    (["claim", "--json"], "claim"), (["--socket", "/s", "claim"], "claim"),
    (["--sock", "/s", "claim"], "claim"), (["--socket=/s", "-q", "claim"], "claim"),
    (["--", "claim"], "claim"), (["--version", "claim"], ""), (["-h", "claim"], None),
    (["-qh"], None), (["frobnicate"], None), ([], None)])
def test_command_given_finds_the_command_as_argparse_will(argv, given):
    """The command sparkqctl builds the parser of is the one argparse then parses, if any."""
    import sparkqctl

    assert sparkqctl.command_given(argv) == given
