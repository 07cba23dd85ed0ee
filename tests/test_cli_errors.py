"""A database the command cannot use is one line naming the URL (password hidden), the cause and what
to do, exit 1, no traceback; `--debug` shows the traceback. Workers and the API server stop at once
when the URL itself is wrong (they wait only for a database that does not answer yet)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import PG_ADMIN_URL, flowdb_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE, AGENTS = str(EXAMPLES / "simple-report.yaml"), str(EXAMPLES / "agents.yaml")
PG_BASE = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql+psycopg://", "postgresql://")
HOST_PORT = PG_BASE.split("//", 1)[1]
HOST = HOST_PORT.split(":")[0]

# (URL, words of the cause, words of the advice)
BROKEN = {
    "wrong-port": (f"postgresql://{HOST}:1/test", "Connection refused", "is the database server running"),
    "unknown-database": (f"{PG_BASE}/flowdb_no_such_database", 'database "flowdb_no_such_database" does not exist',
                         "createdb"),
    "unknown-role": (f"postgresql://flowdb_nobody:s3cret@{HOST_PORT}/test", 'role "flowdb_nobody" does not exist',
                     "user name or password"),
    "missing-sqlite-folder": ("sqlite:///{tmp}/no/such/folder/flowdb.sqlite3", "folder", "create the folder"),
}


def _env(url: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDB_")}
    env["FLOWDB_DATABASE_URL"] = url
    return env


def _check_one_line(stderr: str, cause: str, advice: str, url: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: cannot use the database at "), stderr
    assert cause in lines[0] and advice in lines[0], stderr
    assert "s3cret" not in stderr  # the password never shows


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("command", [["status", "1"], ["db", "upgrade"], ["start", "p"]])
def test_short_commands_say_what_is_wrong_in_one_line(case: str, command: list[str], tmp_path: Path) -> None:
    url, cause, advice = BROKEN[case]
    url = url.format(tmp=tmp_path)
    result = flowdb_cli(*command, env=_env(url))
    assert result.returncode == 1, result.stdout + result.stderr
    _check_one_line(result.stderr, cause, advice, url)


@pytest.mark.parametrize("case", ["unknown-database", "unknown-role", "missing-sqlite-folder"])
@pytest.mark.parametrize("command", [["worker"], ["serve", "--port", "18999"]])
def test_long_running_commands_stop_at_once_on_a_wrong_url(case: str, command: list[str], tmp_path: Path) -> None:
    url, cause, advice = BROKEN[case]
    result = flowdb_cli(*command, env=_env(url.format(tmp=tmp_path)), timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    _check_one_line(result.stderr, cause, advice, url)


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    url, _, _ = BROKEN["wrong-port"]
    result = flowdb_cli("--debug", "status", "1", env=_env(url))
    assert result.returncode == 1 and "Traceback" in result.stderr
    env = {**_env(url), "FLOWDB_DEBUG": "1"}
    assert "Traceback" in flowdb_cli("status", "1", env=env).stderr


@pytest.mark.slow
def test_a_sqlite_file_that_does_not_exist_is_refused_not_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/flowdb.sqlite3"
    missing = tmp_path / "flowdb.sqlite3"
    for command in (["status", "1"], ["start", "p"], ["instances", "list"], ["definitions", "list"],
                    ["approvals", "list"], ["report", "v_step_runs"], ["tokens", "list"], ["db", "downgrade", "base"],
                    ["deploy", EXAMPLE], ["worker"]):
        result = flowdb_cli(*command, env=_env(url), timeout=60)
        assert result.returncode == 1, (command, result.stdout + result.stderr)
        _check_one_line(result.stderr, f"there is no file {missing}", "flowdb db upgrade", url)
        assert ("this command's --create" in result.stderr) == (command[0] in ("deploy", "worker")), result.stderr
        assert not missing.exists(), command  # nothing was created


@pytest.mark.slow
def test_db_upgrade_run_and_create_make_the_sqlite_file(tmp_path: Path) -> None:
    for command in (["db", "upgrade"], ["deploy", "--create", EXAMPLE],
                    ["tokens", "create", "--create", "--identity", "a@b.c", "--role", "admin"],
                    ["run", EXAMPLE, "--agents", AGENTS]):
        path = tmp_path / f"{command[0]}.sqlite3"
        result = flowdb_cli(*command, env=_env(f"sqlite:///{path}"), timeout=120)
        assert result.returncode == 0, (command, result.stdout + result.stderr)
        assert path.exists()
        listed = flowdb_cli("definitions", "list", env=_env(f"sqlite:///{path}"))
        assert listed.returncode == 0, listed.stderr  # created at the current schema


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("FLOWDB_REDIS_URL", "http://127.0.0.1:6379", "a Redis URL starts with redis://, rediss:// or unix://"),
    ("FLOWDB_LEASE_SECONDS", "abc", "Input should be a valid number"),
])
def test_a_bad_setting_is_one_line_and_nothing_is_written(tmp_path: Path, variable: str, value: str, said: str) -> None:
    url = f"sqlite:///{tmp_path}/flowdb.sqlite3"
    assert flowdb_cli("deploy", "--create", EXAMPLE, "--agents", AGENTS, env=_env(url)).returncode == 0
    env = {**_env(url), variable: value}
    for command in (["start", "simple-report"], ["status", "1"], ["worker"]):
        result = flowdb_cli(*command, env=env, timeout=60)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"error: bad setting: {variable}={value!r}: ") and said in result.stderr
    listed = flowdb_cli("instances", "list", "--json", env=_env(url))
    assert listed.stdout.strip() == "[]"  # the start wrote nothing
