"""`refusal-lab` commands for the tests, each in a fresh process forked from one that has imported torch
and transformers already.

A `python -m refusal_lab.cli` spends about 8 s of a 2-core machine importing them before it reads its
arguments, and the tests start about a hundred commands. A fork is still a process of its own: its own
globals, environment, working folder, exit code and output, and `os._exit` (fault injection) ends it
alone. The parent imports and does no tensor operation, so the child's environment still decides its
kernels and threads (read at the first one). A command whose environment differs from the parent's in
anything read at import time (HF_HOME and the like) runs as a plain subprocess instead, and so does one
with a timeout.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

CLI = [sys.executable, "-m", "refusal_lab.cli"]
BASE_ENV = dict(os.environ)  # as this test process started: no test's monkeypatching in it
# Read after import, if at all: settings, fault injection, kernels, pytest's test name, and the folder torch
# writes back into the environment once anything asks for its compile cache.
LAZY_ENV = (
    *("REFUSAL_LAB_", "RLAB_", "ATEN_CPU_CAPABILITY", "MKL_CBWR"),
    *("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"),
)


class _Server:
    """The forking parent: one per test process, started at its first command."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=BASE_ENV
        )
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def run(self, args: list[str], env: dict[str, str], cwd: str | None) -> subprocess.CompletedProcess[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "out"), Path(tmp, "err")
            request = {"args": args, "env": env, "cwd": cwd or os.getcwd(), "out": str(out), "err": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
            if not answer:
                raise RuntimeError(f"the forking parent ended (exit {self.proc.wait()})")
            code = json.loads(answer)["returncode"]
            text = [p.read_text(errors="replace") if p.exists() else "" for p in (out, err)]
        return subprocess.CompletedProcess([*CLI, *args], code, text[0], text[1])


def forkable(env: dict[str, str]) -> bool:
    """Whether a command's environment differs from the forking parent's only in what is read after import."""
    keys = set(env) | set(BASE_ENV)
    return all(env.get(k) == BASE_ENV.get(k) or k.startswith(LAZY_ENV) for k in keys)


_server: _Server | None = None
COUNTS: Counter[str] = Counter()  # how this process ran its commands: "forked" or "subprocess (why)"


def run_cli(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(cmd, capture_output=True, text=True, ...)` for `cmd` = [*CLI, args...], forked when it can be."""
    global _server
    cmd = [str(c) for c in cmd]
    env = dict(os.environ if env is None else env)
    where = None if cwd is None else str(cwd)
    why = (
        "another program" if cmd[: len(CLI)] != CLI
        else "a timeout" if timeout is not None
        else "no fork here" if not hasattr(os, "fork")
        else "its environment" if not forkable(env)
        else None
    )  # fmt: skip
    COUNTS["forked" if why is None else f"subprocess ({why})"] += 1
    if why is not None:
        return subprocess.run(cmd, env=env, cwd=where, capture_output=True, text=True, timeout=timeout)
    if _server is None or _server.proc.poll() is not None:  # started by the first command it forks
        _server = _Server()
    return _server.run(cmd[len(CLI) :], env, where)


def _exit_code(exc: SystemExit) -> int:
    """What the interpreter makes of a SystemExit: None is 0, a number itself, anything else printed and 1."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def _child(request: dict) -> None:
    """Become the command: its folder, environment, output files and arguments, then `main()` and exit."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    random.seed()  # a fresh process's state, not the parent's
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    import refusal_lab.cli

    sys.argv = [str(Path(refusal_lab.cli.__file__).with_name("__main__.py")), *request["args"]]  # as `-m` sets it
    code = 1
    try:
        from refusal_lab.cli.app import main

        main()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # what the interpreter prints for an uncaught exception
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _check_no_tensor_operation_yet() -> None:
    """A child told to use ATen's plain kernels must get them: an import that ran a tensor operation here
    would have fixed every child's kernels (and the organism's figures depend on them). Off x86-64 no
    kernels are pinned, so there is nothing to check."""
    from refusal_lab.core.kernels import pinned_kernels

    if not pinned_kernels():
        return
    pid = os.fork()
    if pid == 0:
        os.environ["ATEN_CPU_CAPABILITY"] = "default"
        import torch

        os._exit(0 if torch.backends.cpu.get_cpu_capability() == "DEFAULT" else 1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("cli_process: an import ran a tensor operation, so forked commands cannot choose their kernels")


def _serve() -> None:
    """Import what every command imports, then fork a child per request line and answer its exit code."""
    import peft  # noqa: F401

    import refusal_lab.cli.commands
    import refusal_lab.core.model  # noqa: F401 - torch and transformers' model classes

    _check_no_tensor_operation_yet()
    for line in sys.stdin:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(json.loads(line))
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
