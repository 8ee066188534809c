"""Distributed fine-tuning on torchrun (DDP): the process group, collectives, the launcher.

edgemap does not launch its own workers: ``torchrun`` (``python -m torch.distributed.run``)
does, and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR. ``edgemap finetune --nproc N``
is only a shortcut that re-executes the same command under torchrun on one node.

Backends: gloo on CPU, nccl on CUDA. Only rank 0 writes the run directory and draws progress
bars. If one rank dies, torchrun stops the others, and every collective has a timeout, so a
job never hangs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgemap.errors import TrainingError


def collective_timeout_s() -> int:
    """How long a collective may wait for a rank (``EDGEMAP_DIST_TIMEOUT``, seconds; default 300): a dead peer, not a
    slow one. Read when a job starts, so a bad value is the command's error, not an import failure."""
    raw = os.environ.get("EDGEMAP_DIST_TIMEOUT", "300")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 7 * 24 * 3600:
        raise TrainingError(f"EDGEMAP_DIST_TIMEOUT={raw!r}: must be a whole number of seconds from 1 to 604800 (a week)")
    return value


@dataclass
class Dist:
    """This process's place in the job (world 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device_type: str) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as tdist

        backend = "nccl" if device_type == "cuda" else "gloo"
        # torchrun killed with SIGKILL cannot stop its workers, and they trained on to the end, re-parented (or sat in
        # the rendezvous for good): each stops as on SIGTERM, its state saved at the next step, once its parent is
        # gone. Watched from before the rendezvous, against the parent torchrun named (it may be gone already).
        watch_parent(_stop_as_on_sigterm, expected=env_pid(AGENT_PID_ENV))
        if not tdist.is_initialized():
            timeout = _dt.timedelta(seconds=collective_timeout_s())
            try:
                tdist.init_process_group(backend, timeout=timeout)
            except Exception as e:  # rendezvous failures come as RuntimeError/DistNetworkError/...
                raise TrainingError(f"could not join the torchrun job ({backend}): {e}") from e
        return cls(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   backend=backend)

    # ---- collectives (no-ops in a single process) -------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """All-reduce a few numbers by sum (float64)."""
        if not self.active:
            return list(values)
        import torch.distributed as tdist

        t = torch.tensor(values, dtype=torch.float64)
        tdist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([1.0 if flag else 0.0])[0] > 0 if self.active else flag

    def gather_rows(self, local: torch.Tensor, n_total: int) -> torch.Tensor:
        """Rows computed for indices ``rank::world`` on each rank → all rows in index order."""
        if not self.active:
            return local
        import torch.distributed as tdist

        per = -(-n_total // self.world)
        padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        tdist.all_gather(parts, padded)
        out = torch.empty((n_total, *local.shape[1:]), dtype=local.dtype)
        for r, part in enumerate(parts):
            n_r = len(range(r, n_total, self.world))
            out[r::self.world] = part[:n_r]
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as tdist

            tdist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


#: the pid of `edgemap finetune --nproc` (set for its torchrun) and of torchrun's agent (set for the workers)
LAUNCHER_PID_ENV = "EDGEMAP_LAUNCHER_PID"
AGENT_PID_ENV = "EDGEMAP_AGENT_PID"


def env_pid(name: str) -> int | None:
    """A pid a parent process passed down in the environment (None when absent or not a number)."""
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def signal_name(signum: int) -> str:
    """"SIGKILL" for 9; "signal 99" for a number without a name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def watch_parent(on_gone: Any, interval: float = 0.5, expected: int | None = None) -> None:
    """Call ``on_gone()`` once, from a daemon thread, when this process's parent has exited (it is re-parented): a
    parent killed with SIGKILL passes nothing on, and its children would run on unseen. ``expected``: the parent's
    pid as the parent said it (a parent that died before this was called is then seen at once)."""
    parent = expected if expected is not None else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        on_gone()

    threading.Thread(target=watch, name="edgemap-parent-watch", daemon=True).start()


def _stop_as_on_sigterm() -> None:
    """A training process whose torchrun is gone: the training loop's stop (state saved at the next step), asked for
    without a signal, so that a Ctrl-C the launcher forwarded just before is not taken for a second one (which stops
    without saving). Before training has its handler, a SIGTERM (nothing to save yet)."""
    handler = signal.getsignal(signal.SIGTERM)
    if callable(getattr(handler, "request", None)):
        handler.request(signal.SIGTERM)
    else:
        os.kill(os.getpid(), signal.SIGTERM)


def stop_children(signum: int = signal.SIGTERM, done: set[int] | None = None) -> list[int]:
    """Send ``signum`` once to each child process of this one (the training processes of torchrun's agent) not in
    ``done``, and add them to it (a second SIGTERM would stop a training process without saving)."""
    done = set() if done is None else done
    children = [pid for pid in _children(os.getpid()) if pid not in done]
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        done.add(pid)
    return children


def exit_worker(code: int) -> None:
    """End a torchrun worker process now, skipping interpreter finalization.

    Under load, a gloo worker that returned normally sometimes aborted during interpreter
    finalization ("terminate called without an active exception", SIGABRT, no Python frame;
    ~1 run in 10 here, see pytorch/pytorch#179291): torchrun then fails the whole job after the
    run directory was complete. Everything edgemap writes is already fsynced (atomic writes),
    so the worker flushes its streams and leaves with ``os._exit``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch_torchrun(nproc: int, argv: list[str] | None = None) -> int:
    """Re-run this ``edgemap finetune`` command under torchrun with ``nproc`` local processes.

    Ctrl-C / SIGTERM sent to this process (a terminal, ``kill``, ``docker stop``) go to the
    training processes only, once: each saves its state at the next step and exits 130 (143 for SIGTERM),
    as a single-process run does. torchrun runs in its own session so a terminal's Ctrl-C
    does not also hit it (its agent would turn the signal into a traceback and a second
    signal for the workers). Nothing is left running when this returns.

    Returns 130 after such an interrupt, else the first failed rank's exit code (0 when all
    succeeded); a failure the worker reported is not reported again (``edgemap.train._torchrun``).
    """
    if nproc < 1:
        raise TrainingError(f"--nproc {nproc}: must be >= 1")
    argv = list(sys.argv[1:] if argv is None else argv)
    cleaned: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    messages = tempfile.mkdtemp(prefix="edgemap-nproc-")
    # torchrun's own log folder goes in there too: by default it is a /tmp/torchelastic_* folder left behind by every run
    cmd = [sys.executable, "-m", "edgemap.train._torchrun", "--standalone", f"--nproc-per-node={nproc}",
           f"--log-dir={Path(messages) / 'torchelastic'}", "-m", "edgemap", *cleaned]
    try:
        return _launch(cmd, nproc, messages)
    finally:
        shutil.rmtree(messages, ignore_errors=True)


def _launch(cmd: list[str], nproc: int, messages: str) -> int:
    from edgemap.worker_messages import ENV as WORKER_MESSAGES_ENV

    # the ranks leave their error line in `messages`; one is printed (report_worker_messages)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
           WORKER_MESSAGES_ENV: messages, LAUNCHER_PID_ENV: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    workers: list[int] = []
    got: list[int] = []

    def forward(signum: int, frame: Any) -> None:  # noqa: ARG001
        if got:
            return  # once: a second signal would make the workers stop without saving
        got.append(signum)
        workers.extend(dict.fromkeys(p for p in [*_children(proc.pid), *_launched_by(messages)] if p != proc.pid))
        for pid in workers:  # a hang-up or Ctrl-\ stops them like a SIGTERM: state saved
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum if signum in (signal.SIGINT, signal.SIGTERM) else signal.SIGTERM)
        # torchrun's agent would report the workers' exit 130 as a failure with a long traceback;
        # the workers do not need it any more (their process group is already set up)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)

    main = threading.current_thread() is threading.main_thread()
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    old = {s: signal.signal(s, forward) for s in caught} if main else {}
    try:
        rc = proc.wait()
        if rc < 0 and not got:  # torchrun itself was killed (kill -9): its workers stop on their own (watch_parent)
            workers.extend(p for p in _launched_by(messages) if p != proc.pid)  # by this launch's folder in their env
        deadline = time.monotonic() + 300
        while workers and any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)  # saving their state
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got or proc.poll() is None:  # interrupted, or unwinding for another reason: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun's group (its workers have their own sessions: one
                # started after the signal stops on its own, when it sees torchrun gone: watch_parent)
            proc.wait()
    if got and not report_worker_messages(messages):
        if len(list(Path(messages).glob("rank*.done"))) >= nproc:  # the signal came as the run finished: done
            return 0
        name = signal.Signals(got[0]).name
        sys.stderr.write(f"interrupted by {name} before training started; nothing was trained: run the command again\n")
    if rc < 0 and not got:
        name = signal_name(-rc)
        report_worker_messages(messages)  # their "interrupted; state saved … resume with" line
        sys.stderr.write(f"error: torchrun (pid {proc.pid}), which ran the training processes, was killed by {name}; "
                         "they stopped\n")
        return 128 - rc
    return (143 if got[0] == signal.SIGTERM else 130) if got else rc  # as a single process exits


def report_worker_messages(folder: str | Path, first: int | None = None) -> bool:
    """Print the error line the training processes left in ``folder``: rank ``first``'s, else the lowest rank's.

    Every rank that fails leaves one (``edgemap.worker_messages``); they are usually the same error
    (each rank checks the same data), so one is printed. Returns whether there was one.
    """
    from edgemap import worker_messages

    msg = worker_messages.read(folder, first)
    if msg is None:
        return False
    sys.stderr.write(worker_messages.as_line(*msg) + "\n")
    sys.stderr.flush()
    return True


def _launched_by(messages: str) -> list[int]:
    """The processes (Linux /proc) whose environment names this launch's messages folder: its training processes,
    wherever they were re-parented (empty where /proc is not available)."""
    from edgemap.worker_messages import ENV as WORKER_MESSAGES_ENV

    needle = f"{WORKER_MESSAGES_ENV}={messages}".encode() + b"\0"
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (d / "environ").read_bytes() and int(d.name) != os.getpid():
                found.append(int(d.name))
        except (OSError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc); empty where that is not available."""
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in f.read_text().split()]
    return out
