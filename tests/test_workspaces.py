"""Repository workspaces (issue 14): a shared clone per repository, a git worktree per task.

Every test works on bare repositories it makes itself and reaches by file:// URL, with
real git and a real sparkqd: no network, no mocks. The daemon's git and the tests' own
share one environment (no system or user configuration, a fixed identity, file://
allowed for submodules), handed to the daemon as any user's would be.
"""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import sparkqd
from conftest import HTTP_ON, SPARKQCTL, Http, wait_until

ENDED = ("completed", "failed", "cancelled")
#: The tools of every test's daemon, on the repository URL: `agent` is claimed over the
#: socket (a worktree each), `shared` and `tree` are run by the daemon's own workers.
TOOLS = """
task_classes:
  quick: {{timeout: 30}}
tools:
  agent: {{task_class: quick, workspace: worktree, repo: "{url}"}}
  shared: {{task_class: quick, command: [bash, -c], workspace: shared, repo: "{url}"}}
  tree: {{task_class: quick, command: [bash, -c], workspace: worktree, repo: "{url}"}}
"""


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def git_env(workdir):
    """git as the tests and their daemon run it: this test's home, no system config."""
    return {"GIT_CONFIG_NOSYSTEM": "1", "HOME": str(workdir), "GIT_AUTHOR_NAME": "Tess",
            "GIT_AUTHOR_EMAIL": "tess@example.org", "GIT_COMMITTER_NAME": "Tess",
            "GIT_COMMITTER_EMAIL": "tess@example.org", "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "protocol.file.allow", "GIT_CONFIG_VALUE_0": "always"}


@pytest.fixture
def run_git(git_env):
    """``run_git(cwd, *args)``: git's output; it must succeed."""
    def run(cwd, *args):
        done = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **git_env},
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout.strip()
    return run


class Origin:
    """A bare repository made for the test, and a clone of it to commit and push from."""

    def __init__(self, workdir: Path, run_git, name: str, files: dict | None = None):
        self.git, self.bare, self.seed = run_git, workdir / f"{name}.git", workdir / f"{name}-seed"
        run_git(workdir, "init", "--quiet", "--bare", "-b", "main", str(self.bare))
        run_git(workdir, "clone", "--quiet", str(self.bare), str(self.seed))
        self.push(files or {"README": "hello\n"})

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def push(self, files: dict) -> str:
        """Commit these files on main and push them; the new commit."""
        for name, text in files.items():
            (self.seed / name).write_text(text)
        self.git(self.seed, "add", "--all")
        self.git(self.seed, "commit", "--quiet", "-m", f"add {', '.join(files)}")
        self.git(self.seed, "push", "--quiet", "origin", "HEAD:main")
        return self.git(self.seed, "rev-parse", "HEAD")


@pytest.fixture
def origin(workdir, run_git):
    return Origin(workdir, run_git, "origin")


@pytest.fixture
def start(make_daemon, git_env, origin):
    """``start(workers=0, extra="")``: a daemon with TOOLS on ``origin``, plus ``extra``
    config (in which {url} is the repository's URL)."""
    def make(workers=0, extra="", url=None, start=True):
        text = (TOOLS + extra).format(url=url or origin.url)
        return make_daemon(config=text, env=git_env, workers=workers, start=start)
    return make


def enqueue(daemon, tool, payload=None, **fields) -> int:
    return daemon.ok(op="enqueue", tool=tool, payload=payload, **fields)["id"]


def ended(daemon, task_id, timeout=15.0) -> dict:
    """Wait until the task has ended; its record."""
    return wait_until(lambda: (t := daemon.ok(op="task", task=task_id))["status"] in ENDED and t,
                      timeout, message=f"task {task_id} to end")


def claim(daemon, tool="agent") -> dict:
    task = daemon.ok(op="claim", tool=tool, worker="agent-1")
    assert task is not None
    return task


def workspaces(daemon) -> dict:
    """The workspace records, by id."""
    return {w["id"]: w for w in daemon.ok(op="workspace.list")}


def shared_clone(daemon) -> dict:
    return next(w for w in workspaces(daemon).values() if w["kind"] == "shared")


def gc(daemon, dry_run=False) -> dict:
    """Run the collector now: ({id: reason removed}, {id: why kept})."""
    report = daemon.ok(op="workspace.gc", dry_run=dry_run)
    return ({w["id"]: w["reason"] for w in report["removed"]},
            {w["id"]: w["why"] for w in report["kept"]})


def claimed_worktree(daemon) -> tuple[int, str, Path]:
    """Enqueue and claim an `agent` task: (its id, lease, worktree)."""
    enqueue(daemon, "agent", "work")
    task = claim(daemon)
    return task["id"], task["lease"], Path(task["workspace"]["path"])


# -- the shared clone -----------------------------------------------------------------------


def test_first_use_clones_and_the_next_fetches_and_resets(start, origin):
    """The first shared task clones the repository; the next one sees what was pushed since."""
    d = start(workers=1)
    first = ended(d, enqueue(d, "shared", "git rev-parse HEAD"))
    assert first["summary"] == origin.git(origin.seed, "rev-parse", "HEAD"), first
    newer = origin.push({"NEWS": "more\n"})
    second = ended(d, enqueue(d, "shared", "cat NEWS"))
    assert (second["summary"], second["workspace"]["commit"]) == ("more", newer), second
    assert [w["kind"] for w in workspaces(d).values()] == ["shared"]


def test_changes_a_task_leaves_in_the_shared_tree_are_stashed_not_lost(start, run_git):
    """What task 1 left is stashed under its name, and task 2 starts on a clean tree."""
    d = start(workers=1)
    ended(d, enqueue(d, "shared", "echo junk > left.txt; echo edit >> README; git commit -qam mine"
                                  "; echo again >> README"))
    second = ended(d, enqueue(d, "shared", "git status --porcelain | wc -l"))
    assert second["summary"] == "0", second
    main = shared_clone(d)["path"]
    assert run_git(main, "stash", "list") == "stash@{0}: On main: sparkq: left by task 1 before task 2"
    stashed = run_git(main, "stash", "show", "--include-untracked", "--name-only", "stash@{0}")
    assert set(stashed.split()) == {"README", "left.txt"}
    assert run_git(main, "log", "-1", "--format=%s", "sparkq/kept-1-before-2") == "mine"
    assert "1 commits kept on branch sparkq/kept-1-before-2" in shared_clone(d)["stash"]


def test_two_shared_tasks_never_run_at_once_but_two_worktree_tasks_do(start, workdir):
    """Shared tasks of one repository take its lock in turn; worktree tasks run side by side."""
    d = start(workers=2)
    trace = workdir / "trace"
    step = f'echo "start $SPARKQ_TASK_ID" >> {trace}; sleep 0.3; echo "end $SPARKQ_TASK_ID" >> {trace}'
    first, second = enqueue(d, "shared", step), enqueue(d, "shared", step)
    assert [ended(d, i)["status"] for i in (first, second)] == ["completed", "completed"]
    assert trace.read_text().split() == f"start {first} end {first} start {second} end {second}".split()
    marks = workdir / "marks"
    marks.mkdir()
    meet = (f"touch {marks}/$SPARKQ_TASK_ID; for i in $(seq 200); do "
            f"[ $(ls {marks} | wc -l) -ge 2 ] && exit 0; sleep 0.05; done; exit 1")
    both = [enqueue(d, "tree", meet) for _ in range(2)]
    assert [ended(d, i)["status"] for i in both] == ["completed", "completed"]


def test_a_shared_task_takes_its_repositorys_lock_and_no_other(start, origin):
    """A shared task's lock is its repository's key; asking for another lock is refused."""
    d = start()
    assert d.ok(op="enqueue", tool="shared", payload="true")["lock"] == str(origin.bare)
    reply = d.call(op="enqueue", tool="shared", payload="true", lock="deploy")
    assert reply["error"]["code"] == "bad_request" and "lock" in reply["error"]["message"]


# -- worktrees ------------------------------------------------------------------------------


def test_a_claim_over_the_socket_returns_the_prepared_worktree(start, run_git):
    """The claim reply names the worktree: branch sparkq/ID under tasks/ID, checked out."""
    d = start()
    watcher = d.connect()
    watcher.ok(op="watch", events=["workspace.created", "workspace.updated", "workspace.released"])
    task_id, lease, path = claimed_worktree(d)
    record = d.ok(op="task", task=task_id)["workspace"]
    assert (record["branch"], record["ref"], record["state"]) == (f"sparkq/{task_id}", "main", "active")
    assert path == d.data_dir / "workspaces" / str(d.workdir)[1:] / "origin.git" / "tasks" / str(task_id)
    assert run_git(path, "rev-parse", "--abbrev-ref", "HEAD") == f"sparkq/{task_id}"
    assert (path / "README").read_text() == "hello\n"
    d.ok(op="complete", task=task_id, lease=lease)
    seen = [(e["event"], e["workspace"]["kind"]) for e in (watcher.recv() for _ in range(4))]
    assert seen == [("workspace.created", "shared"), ("workspace.created", "worktree"),
                    ("workspace.updated", "worktree"), ("workspace.released", "worktree")]


def test_a_run_gets_its_workspace_as_cwd_and_in_its_environment(start):
    """A run starts in its worktree with SPARKQ_WORKSPACE, _REF, _BRANCH and _REPO set."""
    d = start(workers=1)
    task_id = enqueue(d, "tree", 'echo "$PWD|$SPARKQ_WORKSPACE|$SPARKQ_REF|$SPARKQ_BRANCH|$SPARKQ_REPO"')
    task = ended(d, task_id)
    here, where, ref, branch, repo = task["summary"].split("|")
    assert here == where and where.endswith(f"/tasks/{task_id}")
    assert (ref, branch, repo) == ("main", f"sparkq/{task_id}", task["repo"])


def test_setup_runs_in_a_new_worktree_and_its_failure_fails_the_attempt(start):
    """The setup runs first, logged in a section of its own; one that fails, or outlasts
    workspaces.setup_timeout, fails the attempt."""
    d = start(workers=1, extra="""
  setup-ok: {{task_class: quick, command: [bash, -c], workspace: worktree, repo: "{url}",
             setup: [bash, -c, 'echo installing; touch .deps']}}
  setup-broken: {{task_class: quick, command: [bash, -c], workspace: worktree, repo: "{url}",
                 setup: [bash, -c, 'echo no network >&2; exit 3']}}
  setup-slow: {{task_class: quick, command: [bash, -c], workspace: worktree, repo: "{url}",
               setup: [sleep, "10"]}}
workspaces: {{setup_timeout: 1}}
""")
    good = ended(d, enqueue(d, "setup-ok", "test -f .deps && echo ready"))
    assert (good["status"], good["summary"]) == ("completed", "ready"), good
    log = d.ok(op="logs", task=good["id"])["log"]
    assert "--- sparkqd: setup: bash -c 'echo installing; touch .deps'" in log
    assert "installing\n--- sparkqd: setup exited 0" in log
    bad = ended(d, enqueue(d, "setup-broken", "echo never"))
    assert bad["status"] == "failed" and "exited 3: no network" in bad["reason"], bad
    assert "never" not in d.ok(op="logs", task=bad["id"])["log"]
    slow = ended(d, enqueue(d, "setup-slow", "echo never"))
    assert "setup `sleep 10` timed out after 1 s" in slow["reason"], slow


def test_a_retry_gets_the_worktree_its_earlier_attempt_left(start):
    """A retried task runs again in its own worktree, as its failed attempt left it."""
    d = start(workers=1, extra="""
  twice: {{task_class: quick, command: [bash, -c], workspace: worktree, repo: "{url}",
          max_attempts: 2, retry_backoff: 0}}
""")
    task = ended(d, enqueue(d, "twice", "if [ -f mark ]; then echo again in $PWD; "
                                       "else touch mark; exit 1; fi"))
    assert (task["status"], task["attempts"]) == ("completed", 2), task
    assert task["summary"].startswith("again in /") and task["summary"].endswith(
        f"/origin.git/tasks/{task['id']}")  # (the collector may have removed it since)


def test_a_script_header_names_its_repository_workspace_and_setup(start, workdir, origin):
    """A script's `# workspace:`, `# repo:` and `# setup:` lines are its tasks' defaults."""
    scripts = workdir / "scripts"
    scripts.mkdir()
    (scripts / "build.sh").write_text(f"""# workspace: worktree
# repo: {origin.url}
# setup: touch .set-up
test -f .set-up && echo "built on $SPARKQ_BRANCH"
""")
    d = start(workers=1, extra=f"script_dirs: [{scripts}]\n")
    task = ended(d, d.ok(op="enqueue", script="build")["id"])
    assert task["summary"] == f"built on sparkq/{task['id']}", task


def test_sparkqctl_work_runs_each_command_in_its_tasks_workspace(start, workdir):
    """`sparkqctl work` runs COMMAND in the claimed task's worktree, with its variables."""
    d = start()
    out = workdir / "where"
    worker = subprocess.Popen([*SPARKQCTL, "--socket", str(d.socket), "work", "--tool", "agent",
                               "--", "bash", "-c", f'echo "$PWD $SPARKQ_BRANCH" > {out}'],
                              env=d.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        task = ended(d, enqueue(d, "agent"))
    finally:
        worker.terminate()
        worker.wait(10)
    assert task["status"] == "completed", task
    where, branch = out.read_text().split()
    assert where.endswith(f"/origin.git/tasks/{task['id']}") and branch == f"sparkq/{task['id']}"


def test_submodules_are_initialised_in_a_worktree(start, workdir, run_git):
    """A worktree of a repository with a submodule has the submodule checked out."""
    library = Origin(workdir, run_git, "library", {"lib.txt": "from the library\n"})
    app = Origin(workdir, run_git, "app")
    run_git(app.seed, "submodule", "--quiet", "add", library.url, "vendor/library")
    run_git(app.seed, "commit", "--quiet", "-m", "vendor the library")
    run_git(app.seed, "push", "--quiet", "origin", "HEAD:main")
    d = start(url=app.url)
    _, _, path = claimed_worktree(d)
    assert (path / "vendor" / "library" / "lib.txt").read_text() == "from the library\n"


# -- restarts -------------------------------------------------------------------------------


def test_restart_and_kill_9_during_a_task_keep_its_workspace_bound_to_it(start):
    """A stop and a crash while a task works in its worktree leave the worktree its own."""
    d = start()
    task_id, lease, path = claimed_worktree(d)
    (path / "notes.txt").write_text("half done\n")
    d.restart()
    d.kill()
    d.start()
    record = workspaces(d)[str(task_id)]
    assert (record["task"], record["state"], record["path"]) == (task_id, "active", str(path))
    assert d.ok(op="task", task=task_id)["workspace"]["path"] == str(path)
    assert (path / "notes.txt").read_text() == "half done\n"
    d.ok(op="complete", task=task_id, lease=lease)
    assert workspaces(d)[str(task_id)]["state"] == "idle"


def test_a_crash_while_a_worktree_is_prepared_fails_that_attempt_at_start(start):
    """A claim whose worktree was still being set up when the daemon died (so its claimer
    never heard of it) has that attempt failed at the next start, and is retried."""
    d = start(extra="""
  slow-agent: {{task_class: quick, workspace: worktree, repo: "{url}", setup: [sleep, "3"]}}
""")
    task_id = enqueue(d, "slow-agent", "work", max_attempts=2)
    d.connect().send(op="claim", tool="slow-agent")
    wait_until(lambda: workspaces(d).get(str(task_id)), message="the worktree being set up")
    d.kill()
    d.start()
    task = d.ok(op="task", task=task_id)
    assert (task["status"], task["waiting_for"]) == ("waiting", "retry"), task
    assert "daemon stopped while its workspace was prepared" in task["reason"]
    assert workspaces(d)[str(task_id)]["state"] == "idle"


def test_workspace_records_are_in_the_snapshot(start, origin):
    """After a stop the SQLite snapshot holds each workspace in its `workspaces` table."""
    d = start()
    task_id, _, path = claimed_worktree(d)
    d.stop()
    db = sqlite3.connect(f"file:{d.data_dir / 'sparkq.db'}?mode=ro", uri=True)
    rows = db.execute("SELECT id, kind, task, branch, state, path FROM workspaces ORDER BY kind")
    assert list(rows) == [
        (str(origin.bare), "shared", None, None, "idle", str(path.parent.parent / "main")),
        (str(task_id), "worktree", task_id, f"sparkq/{task_id}", "active", str(path))]
    assert db.execute("SELECT workspace FROM tasks WHERE id = ?", (task_id,)).fetchone() == (
        "worktree",)


def test_a_checkout_without_a_record_is_reported_and_never_removed(start):
    """A directory under workspaces/ that no record names is in the log and status, untouched."""
    d = start(start=False)
    stray = d.data_dir / "workspaces" / "example.org" / "x" / "main"
    (stray / ".git").mkdir(parents=True)
    d.start()
    assert d.ok(op="status")["workspaces"]["unrecorded"] == [str(stray)]
    assert "has no record" in d.logs()
    gc(d)
    assert (stray / ".git").is_dir()


def slow_fetches(daemon, run_git, seconds=2) -> None:
    """Make every later fetch of the shared clone take ``seconds`` first (a slow network)."""
    run_git(shared_clone(daemon)["path"], "config", "remote.origin.uploadpack",
            f"sleep {seconds}; git-upload-pack")


def test_a_task_cancelled_while_git_prepares_its_worktree_leaves_it_collectable(start, run_git):
    """A task cancelled during its fetch: the worktree made after that is released, not left
    preparing for ever, so the collector removes it (clean, at its base)."""
    d = start()
    claimed_worktree(d)  # the shared clone exists from now on
    slow_fetches(d, run_git)
    task_id = enqueue(d, "agent", "work")
    claimer = d.connect()
    claimer.send(op="claim", tool="agent")
    wait_until(lambda: d.ok(op="task", task=task_id)["status"] == "running", message="claimed")
    d.ok(op="cancel", task=task_id)
    assert "moved on while its workspace was prepared" in claimer.recv()["error"]["message"]
    wait_until(lambda: str(task_id) not in workspaces(d), message="the worktree collected")


def test_a_workspace_left_preparing_by_a_crash_is_released_at_start(start, run_git):
    """A worktree still being set up for a task cancelled meanwhile when the daemon was
    killed is released at the next start, and `workspace rm --force` removes it (its setup,
    which outlived the daemon, may still be in it)."""
    d = start(extra="""
  slow-agent: {{task_class: quick, workspace: worktree, repo: "{url}", setup: [sleep, "5"]}}
""")
    claimed_worktree(d)
    slow_fetches(d, run_git)
    task_id = enqueue(d, "slow-agent", "work")
    d.connect().send(op="claim", tool="slow-agent")
    wait_until(lambda: d.ok(op="task", task=task_id)["status"] == "running", message="claimed")
    d.ok(op="cancel", task=task_id)
    wait_until(lambda: workspaces(d).get(str(task_id)), message="the worktree being set up")
    d.kill()
    d.start()
    assert workspaces(d)[str(task_id)]["state"] == "idle"
    assert d.ctl_json("workspace", "rm", task_id, "--force")["removed"] == str(task_id)


# -- the collector --------------------------------------------------------------------------


def test_the_collector_keeps_dirty_unmerged_and_in_use_worktrees(start, run_git):
    """Dirty, unmerged and in-use worktrees stay; merged clean ones go, with their branch."""
    d = start()
    dirty, unmerged, busy, clean = (claimed_worktree(d) for _ in range(4))
    (dirty[2] / "new.txt").write_text("draft\n")
    (unmerged[2] / "feature.txt").write_text("done\n")
    run_git(unmerged[2], "add", "feature.txt")
    run_git(unmerged[2], "commit", "--quiet", "-m", "feature")
    sleeper = subprocess.Popen(["sleep", "30"], cwd=busy[2])
    try:
        for task_id, lease, _ in (dirty, unmerged, busy, clean):
            d.ok(op="complete", task=task_id, lease=lease)
        wait_until(lambda: str(clean[0]) not in workspaces(d), message="the clean one collected")
        removed, kept = gc(d)
        assert kept[str(dirty[0])] == "uncommitted changes"
        assert kept[str(unmerged[0])] == f"1 commits on sparkq/{unmerged[0]} not in main nor pushed"
        assert kept[str(busy[0])] == f"in use: process {sleeper.pid} works inside it"
        main = shared_clone(d)["path"]
        assert not clean[2].exists() and f"sparkq/{clean[0]}" not in run_git(main, "branch")
        run_git(unmerged[2], "push", "--quiet", "origin", f"sparkq/{unmerged[0]}")
    finally:
        sleeper.kill()
        sleeper.wait()
    removed, kept = gc(d)
    assert set(removed) == {str(unmerged[0]), str(busy[0])} and set(kept) == {str(dirty[0]),
                                                                           shared_clone(d)["id"]}


def test_an_idle_dirty_worktree_is_saved_as_a_patch_then_removed(start, run_git, origin):
    """Past keep_days the timer's collector saves a dirty worktree's changes, then removes it."""
    d = start(extra="workspaces: {{keep_days: 0.00003}}\n")  # 2.6 s
    task_id, lease, path = claimed_worktree(d)
    (path / "README").write_text("hello, edited\n")
    (path / "new.txt").write_text("brand new\n")
    d.ok(op="complete", task=task_id, lease=lease)
    assert gc(d)[1][str(task_id)] == "uncommitted changes"
    wait_until(lambda: str(task_id) not in workspaces(d), timeout=10, message="the idle one collected")
    saved = d.ok(op="workspace.show", workspace=shared_clone(d)["repo"])["saved"]
    assert [Path(p).name for p in saved] == [f"{task_id}.patch"]
    patch = Path(saved[0]).read_text()
    assert "+brand new" in patch and "+hello, edited" in patch
    assert f"sparkq/{task_id}" not in run_git(shared_clone(d)["path"], "branch")
    run_git(origin.seed, "apply", "--check", saved[0])  # it applies onto the base it names


def test_the_disk_budget_refuses_new_worktrees(start):
    """Under workspaces.max_bytes a new worktree is refused: unavailable, the attempt failed."""
    d = start(extra="workspaces: {{max_bytes: 1}}\n")
    task_id = enqueue(d, "agent", "work")
    reply = d.call(op="claim", tool="agent")
    assert reply["error"]["code"] == "unavailable", reply
    assert "workspaces.max_bytes 1" in reply["error"]["message"]
    task = d.ok(op="task", task=task_id)
    assert task["status"] == "failed" and "max_bytes" in task["reason"]


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, says", [
    ({"repo": "src/app"}, "relative path"),
    ({"repo": "-oProxyCommand=x"}, "not a repository"),
    ({"repo": "https://github.com"}, "names no repository"),
    ({"repo": "/srv/app", "ref": "--upload-pack=x"}, "not a branch, tag or commit name"),
    ({"repo": "/srv/app", "ref": "a..b"}, "not a branch, tag or commit name"),
    ({"workspace": "worktree"}, "needs a repo"),
    ({"repo": "/srv/app", "workspace": "elsewhere"}, "$.workspace: Invalid enum value"),
])
def test_bad_repo_ref_or_workspace_is_refused_at_enqueue(shared, fields, says):
    """A repo, ref or workspace that cannot be used is refused with bad_request saying why."""
    reply = shared.call(op="enqueue", tool="llm-haiku", payload="x", **fields)
    assert reply["error"]["code"] == "bad_request" and says in reply["error"]["message"], reply


def test_a_repo_or_ref_git_cannot_find_fails_the_attempt_with_gits_words(start, workdir):
    """A missing repository or ref fails the claimed attempt, and the claim says git's reason."""
    d = start()
    enqueue(d, "agent", "x", repo=str(workdir / "nowhere.git"))
    missing = d.call(op="claim", tool="agent")["error"]
    assert missing["code"] == "unavailable" and "does not exist" in missing["message"], missing
    enqueue(d, "agent", "x", ref="no-such-branch")
    bad_ref = d.call(op="claim", tool="agent")["error"]
    assert "ref 'no-such-branch' is not a branch, tag or commit of" in bad_ref["message"]
    assert [t["status"] for t in d.ok(op="tasks")] == ["failed", "failed"]


# -- by hand: sparkqctl -------------------------------------------------------------------------


def test_workspace_rm_is_refused_while_its_task_runs_and_force_saves_a_patch(start):
    """`workspace rm` refuses a running task's worktree, and a dirty one unless --force."""
    d = start()
    task_id, lease, path = claimed_worktree(d)
    refused = d.ctl("workspace", "rm", task_id)
    assert refused.returncode == 1 and f"belongs to task {task_id}, which is running" in refused.stderr
    (path / "wip.txt").write_text("keep me\n")
    d.ctl_ok("complete", task_id, "--lease", lease)
    kept = d.ctl("workspace", "rm", task_id)
    assert kept.returncode == 1 and "uncommitted changes" in kept.stderr and path.exists()
    removed = d.ctl_json("workspace", "rm", task_id, "--force")
    assert removed["removed"] == str(task_id) and "+keep me" in Path(removed["patch"]).read_text()
    assert not path.exists()


def test_sparkqctl_lists_and_shows_workspaces(start):
    """`workspaces` is a table of repository, kind, task, branch, size, state, idle time."""
    d = start()
    task_id, _, path = claimed_worktree(d)
    wait_until(lambda: all(w["bytes"] for w in workspaces(d).values()), message="sizes measured")
    lines = d.ctl_ok("workspaces").splitlines()
    assert lines[0].split() == ["REPO", "KIND", "TASK", "BRANCH", "SIZE", "STATE", "IDLE"]
    assert lines[2].split()[1:4] == ["worktree", str(task_id), f"sparkq/{task_id}"]
    shown = d.ctl_ok("workspace", "show", task_id)
    assert f"path:        {path}" in shown and "task_status: running" in shown
    assert "kept worktree" in d.ctl_ok("workspace", "gc", "--dry-run")
    metrics = d.ok(op="metrics")
    assert 'sparkq_workspaces{kind="worktree",state="active"} 1' in metrics


def test_a_claim_over_http_is_answered_with_its_prepared_worktree(start):
    """An HTTP claim, like a socket one, is answered once the task's worktree is ready."""
    d = start(extra=HTTP_ON)
    task_id = enqueue(d, "agent", "work")
    task = Http(d).ok("claim", tool="agent", worker="web-agent")
    path = Path(task["workspace"]["path"])
    assert (task["id"], task["workspace"]["branch"]) == (task_id, f"sparkq/{task_id}")
    assert (path / ".git").exists() and task["workspace"]["state"] == "active"


def test_the_dashboard_lists_workspaces_and_a_task_page_shows_its_own(start, workdir, run_git):
    """The overview's workspaces panel has what `sparkqctl workspaces` has, every value
    escaped; a task's page shows its workspace field by field, not as JSON."""
    markup = Origin(workdir, run_git, "x<i>y")
    d = start(url=markup.url, extra=HTTP_ON)
    task_id, _, path = claimed_worktree(d)
    http = Http(d)
    overview = http.request("GET", "/ui/", headers=http.auth)[2].decode()
    panel = overview.partition('<section id="workspaces"')[2].partition("</section>")[0]
    assert "x&lt;i&gt;y.git" in panel and "<i>" not in panel
    assert f'<a href="/ui/tasks/{task_id}">#{task_id}</a>' in panel
    assert f"sparkq/{task_id}" in panel and ">worktree<" in panel and ">active<" in panel
    page = http.request("GET", f"/ui/tasks/{task_id}", headers=http.auth)[2].decode()
    shown = page.partition('id="task-workspace"')[2].partition("</dl>")[0]
    assert f"<dt>path</dt><dd>{path}</dd>" in shown and "<dt>state</dt><dd>active</dd>" in shown
    assert f"<dt>branch</dt><dd>sparkq/{task_id}</dd>" in shown and '{&quot;kind&quot;' not in page


def test_the_dashboards_live_stream_hears_a_change_that_is_only_a_workspaces(start):
    """The overview's `watch coalesce=true` is told of the collector removing a worktree
    (no task changed), so its workspaces panel is fetched again."""
    d = start()
    task_id, lease, _ = claimed_worktree(d)
    d.ok(op="complete", task=task_id, lease=lease)
    watcher = d.connect()
    watcher.ok(op="watch", coalesce=True)
    assert watcher.recv()["event"] == "changed"
    assert str(task_id) not in workspaces(d)


def test_sparkqctl_enqueue_makes_a_local_repo_path_absolute(start, origin):
    """`enqueue --repo ./x` sends the absolute path, which the daemon clones like a URL."""
    d = start()
    out = subprocess.run([*SPARKQCTL, "--socket", str(d.socket), "enqueue", "--tool", "agent",
                          "--repo", origin.bare.name, "--workspace", "shared", "--payload", "x",
                          "--json"], cwd=origin.bare.parent, env=d.env, capture_output=True,
                         text=True, check=True)
    task = json.loads(out.stdout)
    assert (task["repo"], task["lock"]) == (str(origin.bare), str(origin.bare))


# -- the core alone ---------------------------------------------------------------------------


def test_a_workspace_of_an_ended_task_is_held_by_nobody_whatever_its_state():
    """A record made for an attempt that ended first is no task's (holder None), and
    ``abandoned`` releases it; a running task's own is released only with its attempt."""
    queue = sparkqd.Queue(sparkqd.parse_config(TOOLS.format(url="/srv/app.git")))
    queue.record = lambda event: None
    queue.bootstrap(1.0)
    book, ids = queue.workspaces, []
    for now in (2.0, 3.0):
        ids.append(queue.enqueue(sparkqd.Enqueue(tool="agent", payload="x"), now).task.id)
        queue.claim(sparkqd.Claim(tool="agent"), now)
    queue.cancel(sparkqd.Cancel(task=ids[0]), 4.0)
    for task_id in ids:
        book.created(str(task_id), "/srv/app.git", "worktree", f"/w/tasks/{task_id}",
                     "/srv/app.git", 5.0, task=task_id, branch=f"sparkq/{task_id}")
        book.abandoned(str(task_id), task_id, 6.0)
    book.created("/srv/app.git", "/srv/app.git", "shared", "/w/main", "/srv/app.git", 5.0,
                 task=ids[0])  # a first clone, for a shared task that ended during it
    book.abandoned("/srv/app.git", ids[0], 6.0)
    gone, running = (book.records[str(i)] for i in ids)
    assert (gone.state, book.holder(gone)) == ("idle", None)
    assert book.records["/srv/app.git"].state == "idle"
    assert running.state == "preparing" and book.holder(running).id == ids[1]
    assert book.holder(msgspec.structs.replace(gone, state="active")) is None


def test_replaying_the_journal_gives_the_same_workspace_records():
    """Workspace events replayed into a fresh queue give exactly the live records."""
    queue, events = sparkqd.Queue(sparkqd.parse_config(TOOLS.format(url="/srv/app.git"))), []
    queue.record = events.append
    queue.bootstrap(1.0)
    task = queue.enqueue(sparkqd.Enqueue(tool="agent", payload="x"), 2.0).task
    claimed = queue.claim(sparkqd.Claim(tool="agent"), 3.0)
    book = queue.workspaces
    book.created("/srv/app", "/srv/app", "shared", "/w/main", "/srv/app.git", 4.0)
    book.created(str(task.id), "/srv/app", "worktree", "/w/tasks/1", "/srv/app.git", 4.0,
                 task=task.id, branch="sparkq/1", ref="main", commit="c0ffee")
    assert book.ready(str(task.id), task.id, claimed.lease, 5.0, ref="main", commit="c0ffee",
                      branch="sparkq/1")
    queue.complete(sparkqd.Complete(task=task.id), 6.0)
    assert book.records["1"].state == "idle" and book.records["1"].released_at == 6.0
    replayed = sparkqd.Queue(queue.config)
    decode = msgspec.msgpack.Decoder(sparkqd.AnyEvent).decode
    for event in events:
        replayed.apply(decode(msgspec.msgpack.encode(event)))
    assert replayed.workspaces.records == book.records


def test_a_saved_patch_is_written_whole_or_not_at_all(workdir):
    """durable_write keeps writing what a write left over; where the file cannot grow (here
    RLIMIT_FSIZE) it fails naming the step, and no partial file is left in place."""
    target = workdir / "big.patch"
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(sparkqd.__file__.rsplit('/', 1)[0])!r})
import sparkqd
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
sparkqd.durable_write({str(workdir / 'small.patch')!r}, b"x" * 100_000)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    sparkqd.durable_write({str(target)!r}, b"y" * (3 << 20))
except OSError as exc:
    print(exc.strerror)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"write {target}.") and "File too large" in done.stdout
    assert not target.exists() and os.listdir(workdir) == ["small.patch"]
    assert (workdir / "small.patch").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("repo, key", [
    ("/srv/app", "/srv/app"), ("/srv/app.git", "/srv/app.git"), ("/srv//app.git/", "/srv/app.git"),
    ("file:///srv/app.git", "/srv/app.git"), ("file://localhost/srv/app", "/srv/app"),
    ("https://github.com/u/r.git", "github.com/u/r"), ("git@github.com:u/r", "github.com/u/r"),
    ("ssh://git@GitHub.com/u/r.git/", "github.com/u/r"),
])
def test_a_local_repository_keeps_its_git_suffix_a_hosted_one_drops_it(repo, key):
    """/srv/app and /srv/app.git are two repositories (two clones, two locks); a host's URLs
    of one repository, with .git or without, are one."""
    assert sparkqd.repo_key(repo) == key


def test_a_shared_task_on_a_local_path_locks_that_path_git_suffix_and_all(shared, workdir):
    """Shared tasks on /x/app and /x/app.git take two locks; a `lock` of the file:// URL of
    /x/app.git is the same lock as its shared task's."""
    app, bare = str(workdir / "app"), str(workdir / "app.git")
    locks = [shared.ok(op="enqueue", tool="llm-haiku", payload="x", repo=repo,
                       workspace="shared")["lock"] for repo in (app, bare)]
    plain = shared.ok(op="enqueue", tool="llm-haiku", payload="x", lock=f"file://{bare}")
    assert locks == [app, bare] and plain["lock"] == bare


def test_watching_a_task_sees_its_worktree_removed(start):
    """`watch tasks=ID` follows the task's worktree to its end: workspace.removed names it."""
    d = start()
    task_id, lease, _ = claimed_worktree(d)
    watcher = d.connect()
    watcher.ok(op="watch", tasks=[task_id])
    d.ok(op="complete", task=task_id, lease=lease)
    seen = [watcher.recv() for _ in range(3)]
    assert [e["event"] for e in seen] == ["task.completed", "workspace.released",
                                          "workspace.removed"]
    removed = seen[2]
    assert removed["workspace"]["id"] == str(task_id) and removed["workspace"]["task"] == task_id
    assert removed["workspace"]["state"] == "removed" and "clean" in removed["workspace"]["reason"]


def test_showing_a_repository_whose_name_has_no_usable_part_is_not_found(start):
    """A name that reduces to no directory (`/`, stray punctuation) is simply not found."""
    d = start()
    for name in ("/", "=\x8d\xe5\xe5\xc8\x07\xa9\xbe\U000f9456\xe2", "file:///"):
        reply = d.call(op="workspace.show", workspace=name)
        assert reply["error"]["code"] == "not_found", (name, reply)
