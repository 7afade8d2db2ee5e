"""Configuration: validated into Structs, errors name the key path and the reason."""

from pathlib import Path

import pytest

import sparkqd

ROOT = Path(__file__).resolve().parent.parent


def refused(text):
    with pytest.raises(sparkqd.ConfigError) as info:
        sparkqd.parse_config(text, "sparkq.yml")
    return str(info.value)


def test_example_file_is_the_built_in_defaults():
    """The shipped sparkq.yml documents exactly the built-in defaults."""
    assert sparkqd.load_config(str(ROOT / "sparkq.yml")) == sparkqd.Config()


def test_empty_file_gives_defaults():
    """An empty file is the built-in defaults."""
    assert sparkqd.parse_config("") == sparkqd.Config()


def test_left_out_keys_keep_their_defaults():
    """Setting one key changes only that key."""
    config = sparkqd.parse_config("database: {fsync: batch}")
    assert config.database.fsync == "batch"
    assert config.database.snapshot_interval == 60
    assert set(config.tools) == {"run-bash", "run-python", "llm-haiku", "llm-sonnet"}


def test_tools_section_replaces_the_builtin_tools():
    """A `tools:` key holds exactly the tools it lists."""
    config = sparkqd.parse_config("tools: {lint: {task_class: FAST_SCRIPT}}")
    assert list(config.tools) == ["lint"]


@pytest.mark.parametrize("text, path", [
    ("tools: {x: {task_class: NOPE}}", "$.tools.x.task_class"),
    ("tools: {x: {description: d}}", "$.tools.x"),
    ("database: {fsync: sometimes}", "$.database.fsync"),
    ("database: {snapshot_interval: -1}", "$.database.snapshot_interval"),
    ("stale: {factor: two}", "$.stale.factor"),
    ("bogus: 1", "$"),
    ("task_classes: {A: {timeout: 0}}", "$.task_classes.A.timeout"),
])
def test_invalid_values_name_the_key_path(text, path):
    """Each mistake is refused with the path of the offending key."""
    assert f"sparkq.yml: {path}" in refused(text)


def test_unknown_key_is_named():
    """An unknown key is an error that names it."""
    assert "bogus" in refused("server: {bogus: 1}")


def test_replaced_key_says_what_replaced_it():
    """server.port from the original SparkQ format points to server.socket."""
    assert "use server.socket" in refused("server: {port: 8420}")


def test_yaml_syntax_error_is_refused():
    """Broken YAML is refused with the parser's reason."""
    assert "not valid YAML" in refused("tools: [unclosed")


def test_non_mapping_document_is_refused():
    """A document that is not a mapping of sections is refused."""
    assert "expected a mapping" in refused("- a\n- b\n")
