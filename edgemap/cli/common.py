"""Shared CLI pieces: option aliases, the error boundary, the console."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from edgemap.errors import EdgemapError, Interrupted
from edgemap.options import split_csv, split_runtimes  # noqa: F401 - the commands import them from here


def visible(text: str) -> str:
    """``text`` as :func:`edgemap.runtime.text.printable` shows it, newlines kept (they are edgemap's own layout)."""
    from edgemap.runtime.text import printable

    return printable(text, keep="\n")


class _Console(Console):
    def _render_buffer(self, buffer: Any) -> str:
        """Every printed character goes through :func:`visible`, except rich's own control sequences."""
        from rich.segment import Segment

        return super()._render_buffer(seg if seg.control else Segment(visible(seg.text), seg.style, seg.control)
                                      for seg in buffer)

    def on_broken_pipe(self) -> None:
        """The reader went away (``| head``): stop quietly with the shell's code for SIGPIPE (rich exits 1)."""
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141)


# emoji=False: a class, path or option value such as ":x:" is printed as it is (rich made it an emoji; escape() only
# covers [markup])
console = _Console(stderr=False, highlight=False, emoji=False)
err_console = _Console(stderr=True, highlight=False, emoji=False)

F = TypeVar("F", bound=Callable[..., Any])

RunDirArg = Annotated[Path, typer.Argument(help="Run directory (made by `edgemap finetune --out`).", show_default=False, metavar="RUN_DIR")]
DataArg = Annotated[Path, typer.Argument(help="Dataset folder: DATA/train/<class>/... + DATA/val/<class>/..., or DATA/<class>/...", show_default=False, metavar="DATA")]


def _json_target(value: Path | None) -> Path | None:
    """``--json /dev/stdout`` is ``--json -``: JSON alone on stdout, the tables go to stderr or are left out."""
    if value is not None and str(value) in ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"):
        return Path("-")
    owner = _run_file_owner(value) if value is not None and str(value) != "-" else None
    if owner:  # refused before any work is done
        raise typer.BadParameter(f"{value} is {owner}; the results would replace it. Give another file name")
    if value is not None and str(value) != "-":
        from edgemap.errors import OutputNotWritableError

        try:
            problem = json_target_problem(value)
        except OutputNotWritableError as e:  # the machine refused (permissions, read-only): exit 74, as at the end
            _say("error", str(e))
            raise typer.Exit(code=e.exit_code) from None
        if problem:  # before the work, not after it (an export of minutes, then only this line)
            raise typer.BadParameter(problem)
    return value


_STDERR_NAMES = ("/dev/stderr", "/dev/fd/2", "/proc/self/fd/2")


def json_target_problem(target: Path) -> str | None:
    """Why JSON cannot be written to ``target`` (None when it can, as far as can be known before writing):
    a folder, a path through a file, or (raised as OutputNotWritableError, exit 74) a folder this user cannot
    search or create files in (probed with a temp file), a read-only file system."""
    from edgemap.errors import OutputNotWritableError

    if str(target) in _STDERR_NAMES:
        return None
    try:
        return _json_target_problem(target)
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            return f"{target}: cannot write it ({e.strerror or e})"
        raise OutputNotWritableError(f"--json {target}: {e.strerror or e}; {_ENVIRONMENT_ERRNOS[e.errno]}") from None


def _json_target_problem(target: Path) -> str | None:
    from edgemap.fsutil import special_file, write_probe
    if target.is_dir():
        return f"{target} is a folder; give a file name (or '-' for stdout)"
    blocked = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        return f"{target}: {blocked} is a file, not a folder; give a path in a folder"
    if special_file(target):
        if not os.access(target, os.W_OK):
            raise OSError(errno.EACCES, f"cannot write {target} (permission denied)")
        return None
    folder = Path(os.path.realpath(target)).parent
    if not folder.is_dir():  # made when the results are written: the nearest folder that exists must allow it
        folder = next((p for p in folder.parents if p.is_dir()), Path("/"))
    e = write_probe(folder)
    if e is None:
        return None
    if e.errno in _ENVIRONMENT_ERRNOS:
        raise OSError(e.errno, f"cannot write in {folder} ({e.strerror})") from None
    return f"{target}: cannot write in {folder} ({e.strerror or e})"


JsonOpt = Annotated[Path | None, typer.Option("--json", callback=_json_target,
                                              help="Also write the results as JSON to this file ('-' for stdout).")]


#: OSErrors that are the machine's state, not a bug: one line with the fix, exit 74 (EX_IOERR).
_ENVIRONMENT_ERRNOS = {
    errno.EACCES: "make it writable (chmod u+w) or choose another folder (--out)",
    errno.EPERM: "make it writable (chmod u+w) or choose another folder (--out)",
    errno.EROFS: "the file system is read-only: choose a folder elsewhere (--out) or work on a copy",
    errno.ENOSPC: "the disk is full: free some space and run the command again (earlier files are untouched)",
    errno.EDQUOT: "the disk quota is exhausted: free some space and run the command again",
}


#: OSErrors of a path given as an option (``--out afile/x``): the user's to fix, exit 2 like any bad option.
_PATH_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR}


class _VisibleLog(logging.Handler):
    """edgemap's log warnings on stderr as Python's last-resort handler prints them, but with control characters
    escaped: they name files and folders from datasets and run directories of others (an escape sequence in a
    folder name drove the terminal, a newline forged an ``error:`` line)."""

    def emit(self, record: logging.LogRecord) -> None:
        if _other_handlers():  # as the last-resort handler: only where no handler of the caller's would print it
            return
        try:
            from edgemap.runtime.text import printable

            sys.stderr.write(printable(self.format(record)) + "\n")
        except Exception:  # noqa: BLE001 - logging must never take the command down
            self.handleError(record)


def _other_handlers() -> bool:
    """Whether a handler other than ours would get edgemap's records (an application's logging.basicConfig...)."""
    logger: logging.Logger | None = logging.getLogger("edgemap")
    while logger is not None:
        if any(not isinstance(h, _VisibleLog) for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


def _log_visibly() -> None:
    """Once per process, for the CLI only (a library caller's logging is theirs)."""
    log = logging.getLogger("edgemap")
    if not any(isinstance(h, _VisibleLog) for h in log.handlers):
        handler = _VisibleLog(logging.WARNING)
        log.addHandler(handler)


def handle_errors(fn: F) -> F:
    """Turn EdgemapError into one red line and a non-zero exit (EDGEMAP_DEBUG=1: traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _log_visibly()
        try:
            with _sigterm_as_interrupt():
                result = fn(*args, **kwargs)
                sys.stdout.flush()  # a reader that went away (| head) is found here, not in click's exit (exit 1)
                return result
        except EdgemapError as e:
            if os.environ.get("EDGEMAP_DEBUG"):
                raise
            _say("error", str(e))
            raise typer.Exit(code=e.exit_code) from None
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, or Interrupted (a stage that saved its state)
            _interrupted(e)
        except OSError as e:
            if e.errno == errno.EPIPE:  # the reader went away (| head): stop quietly, as the shell's tools do
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise typer.Exit(code=141) from None
            if e.errno in _PATH_ERRNOS and not os.environ.get("EDGEMAP_DEBUG"):  # a path option that cannot be one
                name = str(e.filename2 or e.filename or "")  # os.replace(tmp, dest): dest is the one in the way
                where = str(Path(name).parent / Path(name).name.split(".", 2)[1]) if ".edgemap-tmp" in name else name
                _say("error", f"{where}: {e.strerror}: a file is where a folder is needed (or the reverse); "
                              "choose another path")
                raise typer.Exit(code=2) from None
            if e.errno not in _ENVIRONMENT_ERRNOS or os.environ.get("EDGEMAP_DEBUG"):
                raise
            # copyfile(src, dest) failing on a full disk: dest (filename2) is where the space ran out, not src
            name = str(e.filename2 or e.filename or "") if e.errno in (errno.ENOSPC, errno.EDQUOT) else str(e.filename or "")
            where = f"{Path(name).parent if '.edgemap-tmp' in name else name}: " if name else ""  # the folder, not our temp
            if not name and e.errno in (errno.ENOSPC, errno.EDQUOT):  # a library's own temp files: say where they go
                where = f"the output's folder or the temp folder {tempfile.gettempdir()} (TMPDIR): "
            _say("error", f"{where}{e.strerror or e}; {_ENVIRONMENT_ERRNOS[e.errno]}")
            raise typer.Exit(code=74) from None  # EX_IOERR
        except Exception as e:
            # A signal inside a C extension's import (onnxruntime turns it into "ImportError:
            # initialization failed") is still an interrupt, not a crash.
            ki = _interrupt_in_chain(e)
            if ki is None:
                raise
            _interrupted(ki)

    return wrapper  # type: ignore[return-value]


def _say(kind: str, text: str) -> None:
    from edgemap import worker_messages

    if not worker_messages.leave(kind, text):  # under --nproc the launcher prints one rank's line
        show_message(kind, text)


def mark_worker_done() -> None:
    """A training process under `edgemap finetune --nproc` finished its run (see edgemap.worker_messages)."""
    from edgemap import worker_messages

    worker_messages.mark_done()


def show_message(kind: str, text: str) -> None:
    """Print an error line (``kind`` "error") or an interruption line (``text``: the signal's name)."""
    if kind == "interrupted":
        from edgemap.worker_messages import INTERRUPTED_TAIL

        err_console.print(f"[yellow]interrupted by {escape(text)}[/]: {INTERRUPTED_TAIL}", soft_wrap=True)
    else:
        err_console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)


def _said_interrupted(e: Interrupted) -> None:
    """Its message (how to continue) and its exit code (130, 143 for SIGTERM), also with EDGEMAP_DEBUG=1 (then with
    the traceback): a KeyboardInterrupt re-raised into click became a silent exit 130."""
    if os.environ.get("EDGEMAP_DEBUG"):
        import traceback

        traceback.print_exc()
    _say("error", str(e))
    raise typer.Exit(code=e.exit_code) from None


def _interrupted(e: KeyboardInterrupt) -> None:
    if isinstance(e, Interrupted):  # found inside another exception (a cleanup that failed after it)
        _said_interrupted(e)
    name = e.args[0] if e.args else "SIGINT"
    _say("interrupted", str(name))
    raise typer.Exit(code=143 if name == "SIGTERM" else 130) from None


def _interrupt_in_chain(e: BaseException) -> KeyboardInterrupt | None:
    from edgemap.runtime.sessions import interrupt_in_chain

    return interrupt_in_chain(e)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (``finally`` blocks remove temp files) instead of killing outright.

    Stages that save a resumable state (finetune) install their own handlers inside this one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def shq(path: Any) -> str:
    """A path as one shell word in the commands edgemap prints (quoted only when it needs it)."""
    return shlex.quote(str(path))


def next_step(cmd: str) -> None:
    """Print the exact next command to run."""
    console.print(f"\n[bold]next:[/] {escape(cmd)}", soft_wrap=True)  # one line: copy-pasteable


#: the legend under eval's and run's tables when a row's agreement with PyTorch left the tolerance
TOLERANCE_NOTE = "✗ outside the agreement tolerance (README: Eval tolerances)"


def agreement_cell(text: str, within: bool | None) -> str:
    """An agreement figure, red with ✗ when it left the tolerance (markup for a rich table cell)."""
    return f"[red]{text} ✗[/]" if within is False else text


def default_out(data: str | Path) -> Path:
    """``models/<data folder name>``; beside the dataset when the current folder is inside it (a run directory
    inside the dataset is refused)."""
    root = Path(data).resolve()
    name = root.name or "run"
    for out in (Path("models") / name, root.parent / "models" / name, root.parent / f"{name}-run"):
        if not out.resolve().is_relative_to(root):  # (a dataset called "models" takes the last one)
            return out
    return out


def _run_file_owner(target: Path) -> str | None:
    """What ``target`` is, when it is one of a run directory's own files (its manifest, metrics, or a recorded
    artifact): `--json edgemap.json` inside a run replaced the manifest with a list of rows, and the run broke."""
    try:
        return _run_file_owner_of(target.resolve())
    except (OSError, RuntimeError, ValueError):  # a folder we may not search: the write itself says so
        return None


def _run_file_owner_of(real: Path) -> str | None:
    import json

    for run_dir in list(real.parents)[:3]:
        manifest = run_dir / "edgemap.json"
        if not manifest.is_file():
            continue
        rel = real.relative_to(run_dir).as_posix()
        if rel in ("edgemap.json", "metrics.jsonl") or rel.startswith(("weights/", "state/")):
            return f"{run_dir}'s own {rel}"
        try:
            artifacts = json.loads(manifest.read_text(encoding="utf-8")).get("artifacts", {})
        except (ValueError, RecursionError, AttributeError):
            return None
        if isinstance(artifacts, dict) and any(isinstance(a, dict) and a.get("path") == rel for a in artifacts.values()):
            return f"an artifact of the run {run_dir} ({rel})"
        return None
    return None


def write_json_beside_error(target: Path | None, obj: Any) -> None:
    """write_json_out on the way out of a failed command: a JSON file that cannot be written is a warning, never
    the error the user sees in place of the command's own (a failed gate, a parity failure)."""
    try:
        write_json_out(target, obj)
    except EdgemapError as e:
        err_console.print(f"[yellow]warning:[/] {escape(str(e))}", soft_wrap=True)


def write_json_out(target: Path | None, obj: Any) -> None:
    """Write JSON results for scripts: to a file (atomically) or stdout ('-')."""
    if target is None:
        return

    from edgemap.fsutil import json_text, write_user_file

    if str(target) == "-":
        sys.stdout.write(json_text(obj))
        return
    if str(target) in _STDERR_NAMES:  # through our own stream: reopening the
        sys.stderr.flush()  # path would write over what stderr already wrote, when it is a file
        sys.stderr.write(json_text(obj))
        sys.stderr.flush()
        return
    problem = json_target_problem(target)  # as when the option was read (the place may have changed since)
    if problem:
        raise EdgemapError(f"--json {problem}")
    owner = _run_file_owner(target)
    if owner:
        raise EdgemapError(f"--json {target}: that is {owner}; the results would replace it. Give another file name")
    try:
        write_user_file(target, json_text(obj).encode("utf-8"))
    except OSError as e:
        from edgemap.errors import OutputNotWritableError

        cls = OutputNotWritableError if e.errno in _ENVIRONMENT_ERRNOS else EdgemapError
        raise cls(f"--json {target}: cannot write it ({e.strerror or e})") from e


def result_table(title: str, columns: list[str], wide: tuple[str, ...] = ("ran on",), text: tuple[str, ...] = ()) -> Any:
    """A results table that stays readable at 80 columns and in pipes (rich's width there is 80).

    Numbers and names never wrap or get cut ("90.…"); only the ``wide`` columns (free text such as
    the provider) fold. Reasons of rows that did not run go below the table (:func:`row_notes`).
    """
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_justify="left")
    for col in columns:
        if col in wide:
            table.add_column(col, overflow="fold", min_width=12, ratio=1)
        else:
            table.add_column(col, no_wrap=True, justify="left" if col in text else "right")
    return table


def note_cell(notes: list[tuple[str, str, str]], label: str, status: str, reason: str, short: bool = False) -> str:
    """Record why a row did not run (shown by :func:`row_notes`) and return its table cell, e.g. ``unavailable [1]``."""
    notes.append((label, status, reason))
    colour = "yellow" if status == "unavailable" else "red"
    shown = "n/a" if short and status == "unavailable" else status
    return f"[{colour}]{shown} \\[{len(notes)}][/]"


def row_notes(notes: list[tuple[str, str, str]]) -> Any:
    """Lines under a results table: ``[n] runtime precision status: reason`` for the rows that did not run."""
    from rich.console import Group
    from rich.text import Text

    lines = []
    for i, (label, status, reason) in enumerate(notes, 1):
        line = Text(f"[{i}] {label} {status}: ", style="yellow" if status == "unavailable" else "red")
        line.append(reason if all(n[2] != reason for n in notes[: i - 1]) else "the same", style="default")
        lines.append(line)
    return Group(*lines)


def short_provider(provider: str) -> str:
    """``CPUExecutionProvider`` → ``ORT CPU`` for tables (JSON and edgemap.json keep the full name)."""
    out = []
    for part in provider.split(", "):
        if part.endswith("ExecutionProvider"):
            part = "ORT " + part[: -len("ExecutionProvider")]
        if part.startswith("torch ") and " eager:" in part:  # "torch 2.13.0 eager:CPU" → "torch CPU"
            part = "torch " + part.split(" eager:", 1)[1]
        out.append(part.replace("OpenVINO:", "OV "))
    return ", ".join(out)
