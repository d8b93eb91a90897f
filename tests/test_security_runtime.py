"""Who may reach the bus, attacked on real processes (issue 14, items 1, 3 and 15).

- Another local user (`nobody`, through runuser, with the system Python) claims the shared `/tmp`
  fallback first and puts a fake broker in it: every participant and `voxpipe run` refuse with the fix,
  and the fake broker is never connected to.
- A runtime dir opened to others, or a socket file in it that another user owns, is refused by a
  participant while the real bus runs.
- An authorised CURVE key another user controls (writes, owns, or links to) keeps the bus from starting.
- Every config-time refusal makes `voxpipe run` exit 2 with the fix, before any process starts.
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import PYTHON, ROOT, base_env, connect, start_stage, stop_process
from tests.test_bus_security import free_ports, generate_keys, participant, start_bus, tcp_env, voxpipe
from voxpipe.runtime import BusUnavailable
from voxpipe.runtime.broker import SOCKET_NAMES, private_dir_problem, runtime_dir

NOBODY = pwd.getpwnam("nobody").pw_uid
SYSTEM_PYTHON = "/usr/bin/python3"
"""nobody cannot enter /root, where the venv lives: its programs use the system Python, stdlib only."""
HANG_S = 60
"""Bounds on commands that must end by themselves: they only catch a hang."""

FAKE_BROKER = """
import os, select, socket, sys
directory, mode, names = sys.argv[1], int(sys.argv[2], 8), sys.argv[3:]
os.mkdir(directory)
os.chmod(directory, mode)
listeners = {}
for name in names:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(directory, name))
    os.chmod(os.path.join(directory, name), 0o777)
    sock.listen(16)
    listeners[sock] = name
print("READY", flush=True)
accepted = []
while True:
    for sock in select.select(list(listeners), [], [])[0]:
        accepted.append(sock.accept()[0])
        sys.stdout.write("CONNECT " + listeners[sock] + "\\n")
        sys.stdout.flush()
"""
"""nobody's broker: claims the directory, binds the broker's socket names, and reports every connection."""

WRITE_STDIN = "import sys; open(sys.argv[1], 'w').write(sys.stdin.read())"


def as_nobody(script: str, *args: str, **popen: object) -> subprocess.Popen[str]:
    """`script` run by another local user: runuser -u nobody, system python3."""
    return subprocess.Popen(["runuser", "-u", "nobody", "--", SYSTEM_PYTHON, "-c", script, *args], cwd="/",
                            text=True, start_new_session=True, **popen)  # type: ignore[call-overload]


@pytest.fixture()
def sticky_tmp() -> Iterator[Path]:
    """A fresh world-writable sticky directory, like /tmp, to be $TMPDIR."""
    directory = Path(tempfile.mkdtemp(prefix="vp-sticky-"))
    os.chmod(directory, 0o1777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def fallback_env(tmpdir: Path) -> dict[str, str]:
    """No XDG_RUNTIME_DIR and no bus.runtime_dir: the runtime dir is the fallback $TMPDIR/voxpipe-UID."""
    env = base_env({"TMPDIR": str(tmpdir), "XDG_CONFIG_HOME": str(tmpdir / "no-config")})
    env.pop("XDG_RUNTIME_DIR", None)
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PYTHON, "-m", "launcher", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# --- item 1: the runtime directory -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["777", "755"])
def test_a_fallback_dir_claimed_by_another_user_is_never_connected_to(sticky_tmp: Path, mode: str) -> None:
    claimed = sticky_tmp / f"voxpipe-{os.getuid()}"
    fake = as_nobody(FAKE_BROKER, str(claimed), mode, *SOCKET_NAMES, stdout=subprocess.PIPE)
    commands: dict[str, subprocess.Popen[str]] = {}
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "READY"
        assert claimed.stat().st_uid == NOBODY
        env = fallback_env(sticky_tmp)
        started = time.monotonic()
        commands |= {"say": cli(env, "say", "hello", "--timeout", "5"), "status": cli(env, "status"),
                    "tap": cli(env, "tap"), "stage": cli(env, "stage", "chunker"), "run": cli(env, "run")}
        results = {name: (process.communicate(timeout=HANG_S), process.returncode)
                   for name, process in commands.items()}
        assert time.monotonic() - started < HANG_S
        for name, ((out, err), code) in results.items():
            assert code == 2, f"{name}: exit {code}\n{out}{err}"
            assert f"runtime dir {claimed} belongs to uid {NOBODY}" in err, f"{name}: {err}"
            assert "another user created it first" in err and "set XDG_RUNTIME_DIR (or bus.runtime_dir)" in err
            assert "hello" not in out and "started bus" not in err, f"{name}: {out}{err}"
        # The fake broker does record a connection: ours, now. Had a participant connected, its line would
        # come first.
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(claimed / "in.sock"))
            assert select.select([fake.stdout], [], [], HANG_S)[0], "the fake broker reported no connection"
            assert fake.stdout.readline() == "CONNECT in.sock\n", "a participant connected to the fake broker"
    finally:
        for process in commands.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
        os.killpg(fake.pid, signal.SIGKILL)
        fake.communicate(timeout=HANG_S)


def test_a_dir_open_to_others_or_a_socket_file_of_another_user_is_refused(tmp_path: Path) -> None:
    """The real bus runs in a good dir; a participant refuses it once it is opened to others, or once
    a socket file in it belongs to someone else, and uses it again once it is put right."""
    runtime = tmp_path / "run"
    bus = start_stage("bus", runtime)
    env = {"VOXPIPE_BUS__RUNTIME_DIR": str(runtime), "XDG_CONFIG_HOME": str(tmp_path)}
    try:
        connect(runtime, "probe").close()
        assert voxpipe(env, "status").returncode == 0

        os.chmod(runtime, 0o755)
        refused = voxpipe(env, "status")
        assert refused.returncode == 2, refused.stderr
        assert f"runtime dir {runtime} has mode 755" in refused.stderr and f"chmod 700 {runtime}" in refused.stderr
        os.chmod(runtime, 0o700)

        os.chown(runtime / "out.sock", NOBODY, -1)
        refused = voxpipe(env, "status")
        assert refused.returncode == 2, refused.stderr
        assert f"holds {runtime / 'out.sock'}, which belongs to uid {NOBODY}" in refused.stderr
        assert f"rm {runtime / 'out.sock'}" in refused.stderr
        os.chown(runtime / "out.sock", os.getuid(), -1)

        status = voxpipe(env, "status")
        assert status.returncode == 0 and "bus" in status.stdout, status.stderr
    finally:
        code, err = stop_process(bus)
        assert code == 0, err


def test_each_unsafe_runtime_dir_is_named_with_its_fix(tmp_path: Path, sticky_tmp: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The one rule, case by case, in this process (the attacks above show it is applied everywhere)."""
    run = tmp_path / "run"
    assert private_dir_problem(run) is None  # missing: the daemon makes it, a participant says no bus runs
    run.mkdir(mode=0o700)
    assert private_dir_problem(run) is None
    os.chmod(run, 0o750)
    assert private_dir_problem(run) == ("has mode 750; other users could reach the bus", f"chmod 700 {run}")
    os.chmod(run, 0o700)
    (tmp_path / "link").symlink_to(run)
    problem = private_dir_problem(tmp_path / "link")
    assert problem is not None and "symbolic link" in problem[0] and f"rm {tmp_path / 'link'}" in problem[1]
    (tmp_path / "file").write_text("")
    assert private_dir_problem(tmp_path / "file") == ("is not a directory",
                                                      f"remove it (rm {tmp_path / 'file'}), or set bus.runtime_dir "
                                                      f"elsewhere")
    for name in SOCKET_NAMES:
        (run / name).symlink_to(tmp_path / "file")
        problem = private_dir_problem(run)
        assert problem is not None and f"holds {run / name}, which is a symbolic link" in problem[0]
        (run / name).unlink()
        (run / name).write_text("")
        os.chown(run / name, NOBODY, -1)
        problem = private_dir_problem(run)
        assert problem is not None and f"holds {run / name}, which belongs to uid {NOBODY}" in problem[0]
        (run / name).unlink()
    os.chown(run, NOBODY, -1)
    problem = private_dir_problem(run)
    assert problem is not None and f"belongs to uid {NOBODY}" in problem[0] and "XDG_RUNTIME_DIR" in problem[1]
    assert "shared fallback" not in problem[0]  # a configured dir: no guess about who made it

    monkeypatch.setattr(tempfile, "tempdir", str(sticky_tmp))
    claimed = sticky_tmp / f"voxpipe-{os.getuid()}"
    assert runtime_dir("", env={}) == claimed
    claimed.mkdir(mode=0o700)
    os.chown(claimed, NOBODY, -1)
    problem = private_dir_problem(claimed)
    assert problem is not None and "shared fallback" in problem[0] and "another user created it first" in problem[0]


def test_a_missing_runtime_dir_means_no_daemon_and_is_not_created(sticky_tmp: Path) -> None:
    env = fallback_env(sticky_tmp)
    process = cli(env, "status")
    _, err = process.communicate(timeout=HANG_S)
    assert process.returncode == 1 and "no voxpipe bus is running" in err and "voxpipe run" in err
    assert not (sticky_tmp / f"voxpipe-{os.getuid()}").exists()


# --- item 3: authorised CURVE keys ---------------------------------------------------------------

def _rewritten_by_nobody(authorized: Path, attacker_key: Path, scratch: Path) -> Path:
    """A key file left writable by others: nobody replaces its key with the attacker's."""
    target = authorized / "local.key"
    os.chmod(target, 0o666)
    writer = as_nobody(WRITE_STDIN, str(target), stdin=subprocess.PIPE)
    writer.communicate(attacker_key.read_text(), timeout=HANG_S)
    assert writer.returncode == 0 and target.read_text() == attacker_key.read_text()
    return target


def _owned_by_nobody(authorized: Path, attacker_key: Path, scratch: Path) -> Path:
    target = authorized / "evil.key"
    shutil.copy(attacker_key, target)
    os.chown(target, NOBODY, -1)
    return target


def _link_to_nobodys_file(authorized: Path, attacker_key: Path, scratch: Path) -> Path:
    """nobody writes the key in a place of its own; a link to it is put among the authorised keys."""
    theirs = scratch / "theirs.key"
    writer = as_nobody(WRITE_STDIN, str(theirs), stdin=subprocess.PIPE)
    writer.communicate(attacker_key.read_text(), timeout=HANG_S)
    assert writer.returncode == 0 and theirs.stat().st_uid == NOBODY
    (authorized / "evil.key").symlink_to(theirs)
    return authorized / "evil.key"


def _directory_owned_by_nobody(authorized: Path, attacker_key: Path, scratch: Path) -> Path:
    os.chown(authorized, NOBODY, -1)
    return authorized


@pytest.mark.parametrize("attack, expected", [
    (_rewritten_by_nobody, "has mode 666"),
    (_owned_by_nobody, f"belongs to uid {NOBODY}"),
    (_link_to_nobodys_file, f"belongs to uid {NOBODY}"),
    (_directory_owned_by_nobody, f"belongs to uid {NOBODY}"),
])
def test_an_authorised_key_another_user_controls_keeps_the_bus_from_starting(
        sticky_tmp: Path, attack: Callable[[Path, Path, Path], Path], expected: str) -> None:
    home = Path(tempfile.mkdtemp(prefix="vp-keys-"))
    try:
        keys = generate_keys(home)
        attacker = voxpipe({"XDG_CONFIG_HOME": str(home / "config")}, "keys", "generate", "--dir",
                           str(home / "attacker"), "--client", "attacker")
        assert attacker.returncode == 0, attacker.stderr
        shutil.copy(keys / "server.key", home / "attacker" / "server.key")
        for directory in (home, keys, keys / "authorized"):
            os.chmod(directory, 0o711)  # others may pass through, not list or write: the modes the rule allows
        target = attack(keys / "authorized", home / "attacker" / "client.key", sticky_tmp)

        env = tcp_env(home, free_ports(), curve=True, keys=keys)
        bus = start_bus(env)
        _, err = bus.communicate(timeout=HANG_S)
        assert bus.returncode == 2, err
        assert str(target) in err and expected in err, err
        assert ("chown" if "uid" in expected else "chmod 644") in err, err
        with pytest.raises(BusUnavailable):
            participant({**env, "VOXPIPE_BUS__KEYS_DIR": str(home / "attacker")}, "attacker", "", timeout=2)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# --- item 15: `voxpipe run` refuses a bad config with exit 2, before anything starts ------------------

def _off_loopback(home: Path) -> tuple[dict[str, str], str]:
    return tcp_env(home, free_ports(), bind="0.0.0.0"), "Set bus.curve = true"


def _symlinked_runtime_dir(home: Path) -> tuple[dict[str, str], str]:
    real = home / "real-run"
    real.mkdir(mode=0o700)
    (home / "run").symlink_to(real)
    return {"VOXPIPE_BUS__RUNTIME_DIR": str(home / "run")}, f"rm {home / 'run'}"


def _authorised_key_writable(home: Path) -> tuple[dict[str, str], str]:
    keys = generate_keys(home)
    os.chmod(keys / "authorized" / "local.key", 0o666)
    return tcp_env(home, free_ports(), curve=True, keys=keys), f"chmod 644 {keys / 'authorized' / 'local.key'}"


def _client_secret_key_readable(home: Path) -> tuple[dict[str, str], str]:
    keys = generate_keys(home)
    os.chmod(keys / "client.key_secret", 0o644)
    return tcp_env(home, free_ports(), curve=True, keys=keys), f"chmod 600 {keys / 'client.key_secret'}"


def _llm_key_file_readable(home: Path) -> tuple[dict[str, str], str]:
    key = home / "openai.key"
    key.write_text("sk-test-not-a-real-key\n")
    os.chmod(key, 0o644)
    return {"VOXPIPE_LLM__PROFILE": "openai", "VOXPIPE_LLM__PROFILES__OPENAI__API_KEY_FILE": str(key)}, \
        f"chmod 600 {key}"


def _tts_key_file_readable(home: Path) -> tuple[dict[str, str], str]:
    key = home / "speech.key"
    key.write_text("sk-test-not-a-real-key\n")
    os.chmod(key, 0o640)
    return {"VOXPIPE_TTS__ENGINE": "openai-speech", "VOXPIPE_TTS__OPENAI_SPEECH__API_KEY_FILE": str(key)}, \
        f"chmod 600 {key}"


def _history_database_readable(home: Path) -> tuple[dict[str, str], str]:
    (home / "data").mkdir(mode=0o700)
    database = home / "data" / "history.db"
    database.write_bytes(b"")
    os.chmod(database, 0o644)
    return {"VOXPIPE_HISTORY__DB_PATH": str(database)}, f"chmod 600 {database}"


@pytest.mark.parametrize("bad_config", [_off_loopback, _symlinked_runtime_dir, _authorised_key_writable,
                                        _client_secret_key_readable, _llm_key_file_readable,
                                        _tts_key_file_readable, _history_database_readable])
def test_run_refuses_a_bad_config_with_exit_2_before_any_stage_starts(
        tmp_path: Path, bad_config: Callable[[Path], tuple[dict[str, str], str]]) -> None:
    env, fix = bad_config(tmp_path)
    env = {"VOXPIPE_BUS__RUNTIME_DIR": str(tmp_path / "run"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "VOXPIPE_LOG__LEVEL": "info", **env}
    started = time.monotonic()
    run = voxpipe(env, "run", timeout=HANG_S)
    assert time.monotonic() - started < HANG_S
    assert run.returncode == 2, run.stdout + run.stderr
    assert fix in run.stderr, run.stderr
    assert "started " not in run.stdout + run.stderr, "a process was started before the refusal"


def test_run_stops_with_exit_2_when_a_stage_refuses_its_configuration_instead_of_restarting_it(
        tmp_path: Path) -> None:
    """A stage that exits 2 found a config problem that preflight cannot see (here a persona file that
    cannot be read, which only the llm stage reads): restarting it six times would fix nothing."""
    env = {"VOXPIPE_BUS__RUNTIME_DIR": str(tmp_path / "run"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "VOXPIPE_LOG__LEVEL": "info", "VOXPIPE_RUN__STAGES": "llm", "VOXPIPE_LLM__PROFILE": "openai",
           "VOXPIPE_LLM__PROFILES__OPENAI__BASE_URL": "http://127.0.0.1:9/v1",
           "VOXPIPE_LLM__PERSONA_FILE": str(tmp_path / "missing-persona.txt")}
    run = voxpipe(env, "run", timeout=HANG_S)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    assert "missing-persona.txt" in output and "no restart can fix it" in output, output
    assert output.count("started llm") == 1, output
