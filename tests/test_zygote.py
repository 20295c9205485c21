"""The test zygote (tests/zygote.py) ends a run as the interpreter would: the same exit status,
stdout and stderr as a real ``python`` process for the same command."""
from __future__ import annotations

import subprocess

import pytest

from helpers import PY, REPO, env
from zygote import Zygote

SCRIPT = """\
import atexit, sys, threading, time
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined")), daemon=False).start()
print("argv", sys.argv[1:], "path0", sys.path[0].endswith("scripts"), "name", __name__)
how = sys.argv[1]
if how == "raise":
    raise ValueError("boom")
if how == "message":
    sys.exit("stopped: fix the thing")
if how == "code":
    sys.exit(3)
"""


@pytest.fixture(scope="module")
def zygote():
    z = Zygote(PY, REPO, env())
    yield z
    z.close()


def real(argv: list[str], module: bool) -> subprocess.CompletedProcess:
    command = [PY, *(["-m", "fedmpi"] if module else []), *argv]
    return subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("how", ["ok", "raise", "message", "code"])
def test_a_script_ends_as_in_a_real_interpreter(zygote, tmp_path, how):
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "end.py"
    script.write_text(SCRIPT)
    forked = zygote.run([str(script), how], module=False, timeout=60, env=env())
    expected = real([str(script), how], module=False)
    assert (forked.returncode, forked.stdout) == (expected.returncode, expected.stdout)
    # the traceback's first lines name <frozen runpy> frames in the fork: compare its last line
    assert forked.stderr.strip().splitlines()[-1:] == expected.stderr.strip().splitlines()[-1:]
    assert "atexit ran" in forked.stdout and "thread joined" in forked.stdout


def test_fedmpi_refusing_a_config_ends_as_in_a_real_interpreter(zygote, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("rounds: 0\n")
    argv = ["run", str(config), "--out", str(tmp_path / "r.h5")]
    forked, expected = zygote.run(argv, module=True, timeout=60, env=env()), real(argv, module=True)
    assert forked.returncode == expected.returncode == 2
    assert forked.stderr == expected.stderr and forked.stdout == expected.stdout


def test_a_run_past_its_timeout_is_killed_and_reported_like_subprocess_run(zygote, tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time; print('started', flush=True); time.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        zygote.run([str(script)], module=False, timeout=1, env=env())
    assert "started" in stopped.value.output
    missing = zygote.run([str(script.with_name("none.py"))], module=False, timeout=30, env=env())
    assert missing.returncode == 2 and "can't open file" in missing.stderr   # the zygote still serves
