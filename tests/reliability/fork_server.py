"""A fork server for the kill tests: ``python tests/reliability/fork_server.py``.

Python + torch start-up costs seconds; a kill test restarts a run a dozen times. This server imports
the stages once (and runs no torch op itself, so forking it is safe), then forks one child per
request; each child runs ``python -m <module> <argv>`` exactly (``runpy``) in its own session, with
stdout and stderr going to a log file. A ``kill -9`` of the child's process group is a kill of a
real run.

Protocol, one JSON object per line. Requests on stdin::

    {"module": "pretext.train", "argv": [...], "log": "/tmp/x.log", "cwd": "/repo", "env": {...},
     "pause": {"save": 2, "phase": "write" | "replace", "marker": "/tmp/m"}}   # pause optional

Replies on stdout: ``{"pid": 123}`` for each request, and ``{"exited": 123, "returncode": rc}``
when a child ends (rc < 0: killed by signal -rc, as ``subprocess`` reports it).

``pause`` is the testing hook that lets a kill land inside a checkpoint write: on the ``save``-th
``save_checkpoint`` of the child, either half of the file's bytes are written and flushed
(``write``) or the complete temp file waits for its ``os.replace`` (``replace``); the child then
writes ``marker`` and sleeps until it is killed.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import select
import signal
import sys
import time
import traceback
from pathlib import Path

# Imported once here so the children start warm (these imports run no torch op).
import orchestrate.pipeline  # noqa: F401
import pretext.train  # noqa: F401
import transfer.classify  # noqa: F401
import transfer.detect  # noqa: F401
import transfer.mm_resume  # noqa: F401
import transfer.segment  # noqa: F401


def _install_pause(save: int, phase: str, marker: str) -> None:
    import core.atomic_io as atomic_io
    import core.checkpoint as checkpoint

    calls = [0]
    real_replace = os.replace

    def hold(detail: dict) -> None:
        Path(marker).write_text(json.dumps({"pid": os.getpid(), **detail}))
        time.sleep(3600)  # until the test kills us

    def paused_save(path, writer) -> None:
        calls[0] += 1
        if calls[0] != save:
            return atomic_io.atomic_save(path, writer)

        def half_then_hold(fh) -> None:
            buf = io.BytesIO()
            writer(buf)
            data = buf.getvalue()
            if phase != "write":
                fh.write(data)
                return
            fh.write(data[: len(data) // 2])
            fh.flush()
            hold({"phase": "write", "save": save})
            fh.write(data[len(data) // 2 :])

        def replace_then_hold(src, dst) -> None:
            if phase == "replace" and Path(dst) == Path(path):
                hold({"phase": "replace", "save": save, "tmp": str(src)})
            real_replace(src, dst)

        os.replace = replace_then_hold
        try:
            atomic_io.atomic_save(path, half_then_hold)
        finally:
            os.replace = real_replace

    checkpoint.atomic_save = paused_save


def _child(request: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(request.get("cwd", os.getcwd()))
        os.environ.update(request.get("env", {}))
        if request.get("pause"):
            _install_pause(**request["pause"])
        sys.argv = [request["module"], *request["argv"]]
        sys.modules.pop(request["module"], None)  # run fresh as __main__, like python -m
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve() -> None:
    children: set[int] = set()
    stdin = sys.stdin.fileno()
    buffer = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.02)
        if ready:
            chunk = os.read(stdin, 65536)
            if not chunk:  # the test closed the pipe: stop (children are killed by the test)
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request)
                children.add(pid)
                _reply({"pid": pid})
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                _reply({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
