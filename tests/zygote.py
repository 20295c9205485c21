"""A preloaded interpreter that forks one child per single-rank ``python -m fedmpi`` run of the tests.

A tiny run takes about 1.4 s here, of which 1.2 s is importing torch, h5py and fedmpi; the suite
makes about a hundred such runs on one rank. This process imports them once (but never
``mpi4py.MPI``: an initialised MPI cannot be forked) and forks a child per run, which sets its
argv, working directory and output files and then runs ``fedmpi``'s ``__main__`` (or a test's
script) exactly as the interpreter would, ending with the interpreter's exit status. Runs on
several ranks, runs that are sent signals (``Streaming``), runs in an environment other than the
one the zygote imported under, and the installed-wheel test still start real processes
(helpers.fedmpi decides).

Protocol, one JSON object per line: the tests write a request on stdin
(``argv``, ``module``, ``cwd``, ``env``, ``stdout``, ``stderr``); the zygote answers ``{"pid": …}`` at once
and ``{"rc": …}`` when the child has ended. It exits when its stdin closes.
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import traceback


def preload():
    import h5py  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import yaml  # noqa: F401

    import fedmpi.algorithms.hypernetworks  # noqa: F401
    import fedmpi.algorithms.prunefl_initial_pruning  # noqa: F401
    import fedmpi.campaigns  # noqa: F401
    import fedmpi.engine  # noqa: F401
    import fedmpi.engine.out_decision  # noqa: F401
    import fedmpi.results  # noqa: F401
    import fedmpi.sparse_kernels  # noqa: F401

    assert "mpi4py.MPI" not in sys.modules, "the zygote must not initialise MPI"


def exit_status(code) -> int:
    """What the interpreter makes of ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def child(request: dict):
    """Runs in the forked process; never returns."""
    status = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        argv = request["argv"]
        try:
            if request["module"]:
                sys.argv = ["-m", *argv]
                sys.path[0] = request["cwd"]          # what ``python -m`` puts first
                runpy.run_module("fedmpi", run_name="__main__", alter_sys=True)
                status = 0
            elif not os.path.isfile(argv[0]):
                print(f"{sys.executable}: can't open file {os.path.abspath(argv[0])!r}: [Errno 2] "
                      "No such file or directory", file=sys.stderr)
                status = 2
            else:
                sys.argv = list(argv)
                sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))   # ``python script.py``
                runpy.run_path(argv[0], run_name="__main__")
                status = 0
        except SystemExit as stop:
            status = exit_status(stop.code)
        except BaseException:                         # noqa: BLE001 — the interpreter prints it too
            traceback.print_exc()
            status = 1
        threading._shutdown()                         # as the interpreter does before atexit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:                         # noqa: BLE001
                pass
        os._exit(status)


def main():
    preload()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, wait_status = os.waitpid(pid, 0)
        replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(wait_status)}) + "\n")


class Zygote:
    """The tests' end: ``run`` is ``subprocess.run(..., capture_output=True, text=True)`` of
    ``python -m fedmpi ARGV`` (or ``python ARGV``) on one rank, forked from the preloaded process."""

    def __init__(self, python: str, cwd: str, env: dict):
        self.cwd, self.env = str(cwd), env
        self.proc = subprocess.Popen([python, __file__], cwd=self.cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.lock = threading.Lock()
        self.pending = b""          # read from the pipe ourselves: a buffered readline would hide lines from select

    def _reply(self, timeout: float | None) -> dict | None:
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the test zygote ended (status {self.proc.wait()}); see its stderr above")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def can_run_with(self, env: dict) -> bool:
        """Whether a fork gives a run ``env``: imports happened under the zygote's environment;
        only pytest's per-test variable may differ (it is set in the child)."""
        def settled(e):
            return {k: v for k, v in e.items() if k != "PYTEST_CURRENT_TEST"}
        return settled(env) == settled(self.env)

    def run(self, argv: list[str], module: bool, timeout: float, env: dict) -> subprocess.CompletedProcess:
        command = [sys.executable, *(["-m", "fedmpi"] if module else []), *argv]
        with self.lock, tempfile.TemporaryDirectory(prefix="zygote-") as scratch:
            out, err = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
            request = {"argv": argv, "module": module, "cwd": self.cwd, "env": env, "stdout": out, "stderr": err}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._reply(None)["pid"]
            reply = self._reply(timeout)
            if reply is None:
                os.kill(pid, signal.SIGKILL)
                self._reply(None)
            stdout, stderr = (open(path, errors="replace").read() for path in (out, err))
            if reply is None:
                raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
            return subprocess.CompletedProcess(command, reply["rc"], stdout, stderr)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    main()
