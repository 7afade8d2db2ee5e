"""A fresh daemon answers the core ops over both framings and through sparkqctl."""


def test_fresh_daemon_has_default_session_and_stream(daemon):
    """A new data directory starts with session `default` holding stream `default`."""
    streams = daemon.ok(op="stream.list")
    assert [(s["name"], s["session"]) for s in streams] == [("default", "default")]


def test_enqueue_through_cli_prints_only_the_id(daemon):
    """`sparkqctl enqueue` prints the new id and nothing else."""
    out = daemon.ctl("enqueue", "--tool", "run-bash", "--payload", "make test")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "1\n"
