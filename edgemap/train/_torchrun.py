"""torchrun for ``edgemap finetune --nproc``: the same launcher, with a one-line failure report.

When a training process fails, torchrun's own ``main`` logs each failed rank and raises
``ChildFailedError``, whose traceback and box of ranks follow the worker's own error line
and bury it. Here the launch is the same (``torch.distributed.run``'s argument parser and ``run``),
but on a failure the error line the failed rank left (``edgemap.worker_messages``) is printed once,
and the job exits with that rank's code; a crash with no line (a signal) gets one line of its own.

    python -m edgemap.train._torchrun --standalone --nproc-per-node=2 -m edgemap finetune ...
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from typing import Any

from edgemap.train.distributed import (
    AGENT_PID_ENV,
    LAUNCHER_PID_ENV,
    env_pid,
    report_worker_messages,
    signal_name,
    stop_children,
    watch_parent,
)
from edgemap.worker_messages import ENV as WORKER_MESSAGES_ENV

#: Exit codes after which a worker printed its own message: 1 an uncaught exception (its
#: traceback), 2 a usage error (typer's box).
REPORTED = frozenset({1, 2})


def cause(e: Any) -> tuple[int, Any]:
    """The failed rank that explains a ChildFailedError: one killed by a signal (the others then failed on a lost
    connection), but not by SIGTERM, which torchrun's agent sends the others once one has failed; else one that exited
    with its own error (each may have hit the same one, a moment apart); else torchrun's first."""
    failures = sorted((getattr(e, "failures", None) or {}).items())
    killed = [(r, f) for r, f in failures if int(f.exitcode) < 0 and -int(f.exitcode) != signal.SIGTERM]
    errored = [(r, f) for r, f in failures if int(f.exitcode) > 0]
    return (killed or errored)[0] if killed or errored else e.get_first_failure()


def main(argv: list[str]) -> int:
    # "failed (exitcode: 2) local_rank: 0 ..." and "Sending process ... closing signal": said below, once
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    # `edgemap finetune --nproc` killed with SIGKILL cannot pass a signal on: the training processes then ran to the
    # end unseen. They stop as on SIGTERM (state saved), and this process with them; its launcher is no longer there
    # to remove the messages folder, so this process does. The workers watch this process in turn.
    orphaned: list[bool] = []

    def orphan() -> None:  # also the workers started after: this thread keeps at it until the process ends
        orphaned.append(True)
        done: set[int] = set()
        while True:
            stop_children(done=done)
            time.sleep(0.2)

    os.environ[AGENT_PID_ENV] = str(os.getpid())
    watch_parent(orphan, expected=env_pid(LAUNCHER_PID_ENV))
    try:
        return _run(argv)
    finally:
        folder = os.environ.get(WORKER_MESSAGES_ENV)
        if orphaned and folder:
            shutil.rmtree(folder, ignore_errors=True)


def _run(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = cause(e)
        code = int(failure.exitcode)
        folder = os.environ.get(WORKER_MESSAGES_ENV)
        if code < 0:  # said first; then what the ranks still running said (their resume command)
            name = signal_name(-code)
            hint = " (out of memory? lower --batch-size or --nproc)" if name == "SIGKILL" else ""
            sys.stderr.write(f"error: training process rank {rank} (pid {failure.pid}) was killed by {name}{hint}\n")
            if folder:
                report_worker_messages(folder)
            return 128 - code
        if folder and report_worker_messages(folder, first=rank):
            return code if code > 0 else 1
        if code not in REPORTED:
            sys.stderr.write(f"error: training process rank {rank} (pid {failure.pid}) failed with exit code {code}\n")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
