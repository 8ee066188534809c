"""The CLI's shared edges: user text printed as it is, --json targets, interrupts inside imports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgemap.cli import app
from edgemap.cli.common import handle_errors, write_json_out
from edgemap.data.digits import write_digits
from edgemap.errors import EdgemapError


@pytest.fixture(scope="module")
def bracket_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset whose folder and class names look like rich markup."""
    root = tmp_path_factory.mktemp("cli") / "data [bold]x[/]"
    write_digits(root, val_fraction=0.2, seed=0)
    (root / "train" / "0").rename(root / "train" / "[cat]")
    (root / "val" / "0").rename(root / "val" / "[cat]")
    return root


def test_markup_like_names_are_printed_as_they_are(bracket_data: Path) -> None:
    r = CliRunner().invoke(app, ["datasets", "scan", str(bracket_data)])
    assert r.exit_code == 0, r.output
    assert "[cat]" in r.output and "data [bold]x[/]" in " ".join(r.output.split())
    (bracket_data / "train" / "[cat]" / "broken.png").write_bytes(b"not a png")
    try:
        r = CliRunner().invoke(app, ["datasets", "scan", str(bracket_data)])
        assert r.exit_code == 2 and "[cat]/broken.png" in " ".join(r.output.split()), r.output
        assert "Traceback" not in r.output
    finally:
        (bracket_data / "train" / "[cat]" / "broken.png").unlink()


def test_scan_json_to_stdout_is_only_json(bracket_data: Path) -> None:
    r = CliRunner().invoke(app, ["datasets", "scan", str(bracket_data), "--json", "-"])
    assert r.exit_code == 0
    data = json.loads(r.stdout)  # the table and the next step went to stderr
    assert "[cat]" in data["classes"]


def test_json_target_that_is_a_folder_or_unwritable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EdgemapError, match="is a folder"):
        write_json_out(tmp_path, {"a": 1})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EdgemapError, match="afile is a file, not a folder"):  # was "cannot write it (File exists)"
        write_json_out(tmp_path / "afile" / "out.json", {"a": 1})
    with pytest.raises(EdgemapError, match="afile is a file, not a folder"):
        write_json_out(tmp_path / "afile" / "deeper" / "out.json", {"a": 1})


def test_a_bad_json_target_is_refused_before_any_work(tmp_path: Path, bracket_data: Path) -> None:
    """`export RUN --int8 --json /tmp` worked for minutes, wrote its models, then printed only "--json /tmp is a
    folder" (hiding a failed gate's table and error too): the target is checked when the options are read."""
    (tmp_path / "afile").write_text("x")
    for target, message in ((tmp_path, "is a folder"), (tmp_path / "afile" / "o.json", "is a file, not a folder"),
                            (Path("/proc/no-such/o.json"), "cannot"), (Path("/proc/o.json"), "cannot write in /proc")):
        r = CliRunner().invoke(app, ["datasets", "scan", str(bracket_data), "--json", str(target)])
        said = " ".join(r.output.replace("│", " ").split())  # click's box wraps long lines
        assert r.exit_code == 2 and message in said, (target, r.output)
        assert "classes" not in r.output and "fingerprint" not in r.output, r.output  # nothing was scanned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe left nothing behind
    r = CliRunner().invoke(app, ["datasets", "scan", str(bracket_data), "--json", str(tmp_path / "new" / "o.json")])
    assert r.exit_code == 0 and json.loads((tmp_path / "new" / "o.json").read_text())["classes"]


def test_a_json_target_the_machine_refuses_is_one_line_exit_74(tmp_path: Path, bracket_data: Path) -> None:
    """A folder the user may not enter crashed the option check with a PermissionError traceback (exit 1); a
    read-only folder is a refused write (exit 74, as when the results are written), not an option mistake."""
    import subprocess
    import sys

    from test_eval import _as_unprivileged

    prefix = _as_unprivileged()
    (tmp_path / "locked").mkdir(mode=0o000)
    (tmp_path / "ro").mkdir(mode=0o555)
    try:
        for target in ("locked/x.json", "locked/sub/x.json", "ro/x.json"):
            r = subprocess.run([*prefix, sys.executable, "-m", "edgemap", "datasets", "scan", str(bracket_data),
                                "--json", str(tmp_path / target)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 74 and "Traceback" not in r.stderr, (target, r.stderr)
            assert r.stderr.count("error:") == 1 and "Permission denied" in r.stderr, r.stderr
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_json_into_a_pipe_a_device_or_a_symlink_writes_through_it(tmp_path: Path, bracket_data: Path, capsys) -> None:  # noqa: ANN001
    """A FIFO, /dev/full or a symlink is written into, never replaced by a plain file (an atomic rename did that)."""
    import os
    import threading

    from edgemap.errors import OutputNotWritableError

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_json_out(fifo, {"a": 1})
    reader.join(10)
    assert json.loads(got[0]) == {"a": 1} and fifo.is_fifo()

    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    write_json_out(tmp_path / "link.json", {"b": 2})
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "real.json").read_text()) == {"b": 2}

    if Path("/dev/full").is_char_device():
        with pytest.raises(OutputNotWritableError, match="No space left on device"):  # exit 74, as any refused write
            write_json_out(Path("/dev/full"), {"c": 3})
        assert Path("/dev/full").is_char_device()

    write_json_out(Path("/dev/stderr"), {"d": 4})  # through sys.stderr: reopening it wrote over a redirected file
    assert json.loads(capsys.readouterr().err) == {"d": 4}

    r = CliRunner().invoke(app, ["datasets", "scan", str(bracket_data), "--json", "/dev/stdout"])
    assert r.exit_code == 0
    assert "[cat]" in json.loads(r.stdout)["classes"]  # /dev/stdout is '-': the JSON alone on stdout


def test_default_out_is_beside_a_dataset_the_shell_is_inside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cd data && edgemap datasets scan .` printed `--out models/data`, which finetune refuses (inside the dataset)."""
    from edgemap.cli.common import default_out

    data = tmp_path / "photos"
    write_digits(data, val_fraction=0.2, seed=0)
    monkeypatch.chdir(tmp_path)
    assert default_out("photos") == Path("models/photos")
    monkeypatch.chdir(data)
    assert default_out(".") == tmp_path / "models" / "photos"
    r = CliRunner().invoke(app, ["datasets", "scan", "."])
    assert r.exit_code == 0 and f"--out {tmp_path / 'models' / 'photos'}" in " ".join(r.output.split()), r.output
    models = tmp_path / "models"  # a dataset called "models": models/models would be inside it too
    models.mkdir(exist_ok=True)
    monkeypatch.chdir(models)
    assert default_out(".") == tmp_path / "models-run"


def test_undecodable_file_names_still_give_valid_json(tmp_path: Path) -> None:
    name = b"\xfe bad.jpg".decode("utf-8", "surrogateescape")  # how Python sees a non-UTF-8 name
    write_json_out(tmp_path / "o.json", {"skipped": [[name, "cannot decode"]]})
    assert json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))["skipped"][0][0] == name


@pytest.mark.parametrize(("signame", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_a_c_extension_import_is_an_interrupt_not_a_crash(signame: str, code: int, capsys) -> None:  # noqa: ANN001
    @handle_errors
    def cmd() -> None:
        try:
            raise KeyboardInterrupt(signame)
        except KeyboardInterrupt as e:  # what onnxruntime's module init does with it
            raise ImportError("initialization failed") from e

    with pytest.raises(typer.Exit) as e:
        cmd()
    assert e.value.exit_code == code
    assert f"interrupted by {signame}" in capsys.readouterr().err


def test_other_exceptions_still_propagate() -> None:
    @handle_errors
    def cmd() -> None:
        raise ImportError("a real missing module")

    with pytest.raises(ImportError, match="a real missing module"):
        cmd()


def test_a_closed_pipe_ends_the_command_quietly_with_141() -> None:
    """`edgemap backbones | head -1`: no traceback, and the shell's SIGPIPE code, not a failure code 1."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # closed before the command writes (a reader that closes after one line raced the command's output)
    proc = subprocess.Popen([sys.executable, "-m", "edgemap", "backbones"], stdout=write, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "100"})
    os.close(write)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == "", err


def test_a_file_in_the_way_of_an_output_folder_is_one_line(tmp_path: Path) -> None:
    """`package --out afile`, `datasets digits afile/out`, `demo --out afile/out` were tracebacks with exit 1."""
    (tmp_path / "afile").write_text("x")
    for args in (["datasets", "digits", str(tmp_path / "afile" / "out")], ["demo", "--out", str(tmp_path / "afile" / "o")],
                 ["package", "--runtime-only", "--out", str(tmp_path / "afile")]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "a file is where a folder is needed" in " ".join(r.output.split()), (args, r.output)
        assert "Traceback" not in r.output


def test_json_never_replaces_a_runs_own_files(tmp_path: Path, bracket_data: Path) -> None:
    """`eval RUN --json RUN/edgemap.json` (or a model) replaced the manifest with a list of rows: the run broke."""
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    manifest = '{"artifacts": {"onnx_fp32": {"path": "model.onnx"}}}'
    (run / "edgemap.json").write_text(manifest)
    (run / "model.onnx").write_bytes(b"model")
    for name in ("edgemap.json", "model.onnx", "metrics.jsonl", "weights/best.safetensors"):
        r = CliRunner().invoke(app, ["datasets", "scan", str(bracket_data), "--json", str(run / name)])
        assert r.exit_code == 2 and "the results would replace it" in " ".join(r.output.split()), (name, r.output)
    assert (run / "edgemap.json").read_text() == manifest and (run / "model.onnx").read_bytes() == b"model"
    with pytest.raises(EdgemapError, match="the results would replace it"):
        write_json_out(run / "model.onnx", [])
    write_json_out(run / "results.json", [])  # any other name in the run directory is fine


def test_a_path_error_names_the_path_in_the_way_not_a_temp_file(capsys) -> None:  # noqa: ANN001
    """os.replace(tmp, dest) onto a folder: the message named the vanished temp file, not the folder in the way."""

    @handle_errors
    def cmd() -> None:
        raise IsADirectoryError(21, "Is a directory", "/w/.a.whl.0123456789ab.edgemap-tmp", None, "/w/a.whl")

    with pytest.raises(typer.Exit) as e:
        cmd()
    assert e.value.exit_code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "/w/a.whl: Is a directory: a file is where a folder is needed" in err and "edgemap-tmp" not in err


def test_a_full_disk_names_where_the_space_ran_out(capsys) -> None:  # noqa: ANN001
    """copyfile(temp wheel, dist/x.whl) on a full run disk named the source in /tmp (which had room); a library's own
    temp file on a full TMPDIR named no place at all."""
    import errno
    import tempfile

    @handle_errors
    def copy() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/edgemap-package-x/wheel/a.whl", None,
                      "/runs/r/dist/a.whl")

    @handle_errors
    def library() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    for cmd, said in ((copy, "/runs/r/dist/a.whl: No space left on device"),
                      (library, f"the temp folder {tempfile.gettempdir()} (TMPDIR): No space left on device")):
        with pytest.raises(typer.Exit) as e:
            cmd()
        err = " ".join(capsys.readouterr().err.split())
        assert e.value.exit_code == 74 and said in err, err


def test_names_never_drive_the_terminal(tmp_path: Path) -> None:
    """A file or folder name with ESC sequences (\\x1b]0;TITLE, \\x1b[2J) was printed raw by finetune and eval."""
    import io

    from rich.console import Console

    from edgemap.cli.common import _Console, visible

    buf = io.StringIO()
    con = _Console(file=buf, force_terminal=True, color_system="standard", width=200, highlight=False)
    con.print("[red]warning:[/] ", "bad\x1b]0;PWNED\x07\x1b[31mRED.png", "\u2028x", markup=True)
    out = buf.getvalue()
    assert "\x1b]0;" not in out and "\\x1b]0;PWNED" in out and "\\u2028x" in out
    assert "\x1b[31m" in out  # edgemap's own colour (a control segment) still works
    assert visible("é 日本 [x]") == "é 日本 [x]" and isinstance(con, Console)


def test_an_interrupt_says_how_to_continue_also_in_debug_mode_and_inside_another_error(capsys, monkeypatch) -> None:  # noqa: ANN001
    """Interrupted became a KeyboardInterrupt: with EDGEMAP_DEBUG=1 click turned it into a silent exit 130 (no
    traceback, no resume command, 130 for a SIGTERM); found inside a failing cleanup it printed "interrupted by
    interrupted by SIGTERM; ..." and 130."""
    import typer

    from edgemap.errors import Interrupted

    @handle_errors
    def stopped() -> None:
        raise Interrupted("interrupted by SIGTERM; state saved. Resume with: edgemap finetune d --out r --resume", 15)

    @handle_errors
    def stopped_then_cleanup_failed() -> None:
        try:
            raise Interrupted("interrupted by SIGTERM; state saved. Resume with: X --resume", 15)
        finally:
            raise RuntimeError("closing the process group failed")

    for debug in ("", "1"):
        monkeypatch.setenv("EDGEMAP_DEBUG", debug)
        with pytest.raises(typer.Exit) as e:
            stopped()
        err = capsys.readouterr().err
        assert e.value.exit_code == 143 and err.count("error: interrupted by SIGTERM; state saved. Resume with: "
                                                      "edgemap finetune d --out r --resume") == 1, err
        assert ("Traceback" in err) == bool(debug), err
    monkeypatch.setenv("EDGEMAP_DEBUG", "")
    with pytest.raises(typer.Exit) as e:
        stopped_then_cleanup_failed()
    err = capsys.readouterr().err
    assert e.value.exit_code == 143 and "Resume with: X --resume" in err and "interrupted by interrupted" not in err


def test_log_warnings_naming_files_never_drive_the_terminal(tmp_path: Path, bracket_data: Path) -> None:
    """edgemap's log warnings went out through Python's last-resort handler as they were: a folder named with an
    escape sequence (or a newline and "error: ...") drove the terminal or forged a line."""
    import shutil
    import subprocess
    import sys

    data = tmp_path / "d"
    shutil.copytree(bracket_data, data)
    (data / "x\x1b]0;PWNED\x07\nerror: forged").mkdir()  # beside train/ and val/: warned about, then ignored
    r = subprocess.run([sys.executable, "-m", "edgemap", "datasets", "scan", str(data)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "\nerror: forged" not in r.stderr, r.stderr
    assert "ignoring folders x\\x1b]0;PWNED\\x07\\x0aerror: forged" in r.stderr, r.stderr


def test_an_applications_own_logging_gets_each_warning_once(tmp_path: Path, bracket_data: Path) -> None:
    """The CLI's escaping log handler printed every edgemap warning a second time in a program that configured its
    own logging and ran a command in-process (and in every later library call)."""
    import shutil
    import subprocess
    import sys

    data = tmp_path / "d"
    shutil.copytree(bracket_data, data)
    (data / "extra").mkdir()  # beside train/ and val/: "ignoring folders extra"
    code = ("import logging, sys; logging.basicConfig(format='APP %(message)s')\n"
            "from typer.testing import CliRunner; from edgemap.cli import app\n"
            "CliRunner().invoke(app, ['datasets', 'scan', sys.argv[1]])\n"
            "from edgemap.data.scan import scan_dataset; scan_dataset(sys.argv[1])\n")
    r = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if "ignoring folders extra" in line]
    assert lines and all(line.startswith("APP ") for line in lines) and len(lines) == 2, r.stderr  # one per call


def test_an_openvino_device_list_stays_one_runtime() -> None:
    """`--runtime openvino:AUTO:GPU,CPU` was split at its comma: its "CPU" became an ONNX Runtime row."""
    from edgemap.bench import BenchOptions
    from edgemap.evaluate import EvalOptions
    from edgemap.options import split_runtimes

    assert split_runtimes("openvino:AUTO:GPU,CPU, cpu,torch") == ["openvino:AUTO:GPU,CPU", "cpu", "torch"]
    assert split_runtimes("openvino:HETERO:GPU.1,CPU,openvino:MULTI:GPU,NPU") == ["openvino:HETERO:GPU.1,CPU",
                                                                                    "openvino:MULTI:GPU,NPU"]
    assert split_runtimes("openvino:GPU,CPU") == ["openvino:GPU", "CPU"]  # not a device list: CPU is ORT's cpu
    assert split_runtimes("openvino:AUTO,CPU") == ["openvino:AUTO", "CPU"]  # AUTO alone is no list either
    assert EvalOptions(runtimes="openvino:AUTO:GPU,CPU,cpu").runtimes == ("openvino:AUTO:GPU,CPU", "cpu")
    assert BenchOptions(runtimes="openvino:AUTO:CPU").runtimes == ("openvino:AUTO:CPU",)


def test_every_default_the_help_names_is_the_options_default() -> None:
    """The CLI's help texts spell their defaults by hand ("[default: 12]"); the options classes hold the real ones."""
    import re

    import typer.main

    from edgemap.cli import app
    from edgemap.evaluate import EvalOptions
    from edgemap.export import ExportOptions
    from edgemap.package import PackageOptions
    from edgemap.report import ReportOptions
    from edgemap.train.finetune import FinetuneOptions

    owners = {"finetune": [FinetuneOptions], "export": [ExportOptions], "eval": [EvalOptions],
              "package": [PackageOptions], "report": [ReportOptions], "run": [FinetuneOptions, ExportOptions]}
    cmd = typer.main.get_command(app)
    checked = 0
    for name, classes in owners.items():
        for p in cmd.commands[name].params:
            said = re.search(r"\[default: ([^\];]+)", (getattr(p, "help", None) or "").replace("\\[", "["))
            owner = next((c for c in classes if p.name in c.__dataclass_fields__), None)
            if not said or owner is None:
                continue
            real = owner.__dataclass_fields__[p.name].default
            if isinstance(real, bool | type(None)) or not isinstance(real, int | float | str):
                continue  # "yes", "the backbone's": said in words
            text = said.group(1).strip()
            if isinstance(real, int | float) and not re.fullmatch(r"[-+0-9.e]+", text):
                continue  # "Pillow's, ~89 M": said in words
            assert (float(text) == real) if isinstance(real, int | float) else (text == real), (name, p.name, text, real)
            checked += 1
    assert checked >= 20, checked


def test_flags_are_not_shown_as_taking_a_value() -> None:
    """`--skip-bad <bool>` in --help: `--skip-bad true` then failed with "unexpected extra argument"."""
    from edgemap.cli import _COMMANDS, app

    for name in [*_COMMANDS, "datasets scan", "demo"]:
        r = CliRunner().invoke(app, [*name.split(), "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "<bool>" not in r.output, (name, r.output)
    assert "<int>" in CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"}).output  # values still say so
