"""DDP on torchrun with gloo: a real 2-process job, equivalence with one process, failure handling.

Tolerance (documented in the README): a head-only step on 2 ranks with per-rank batch B equals one
process with batch 2B to float rounding (1e-6); a full step to 1e-5, because BatchNorm statistics
stay frozen while fine-tuning (with `freeze_bn=False` they would be per-rank batch statistics).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from edgemap.data.digits import write_digits
from edgemap.manifest import RunDir
from edgemap.model import load_classifier
from edgemap.runtime.preprocess import preprocess

pytestmark = pytest.mark.slow
RUNNER = str(Path(__file__).with_name("_ddp_runner.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "EDGEMAP_DIST_TIMEOUT": "60"}


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp digits") / "d"
    write_digits(root, seed=0)
    return root


@pytest.fixture(scope="module")
def sixteen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training images (so batch 16 = one step) and 4 validation images per class, 2 classes."""
    root = tmp_path_factory.mktemp("sixteen")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in ("dark", "light"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                base = 60 if c == "dark" else 190
                arr = np.clip(rng.normal(base, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def test_two_gloo_processes_make_a_valid_run(digits: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "ddp run"
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    (data / "train" / "notes.txt").write_text("a stray file: its scan warning is printed once, not once per process")
    cmd = [sys.executable, "-m", "edgemap", "finetune", str(data), "--out", str(out), "--backbone", "tiny",
           "--img-size", "32", "--epochs", "3", "--freeze-epochs", "1", "--no-flip", "--nproc", "2", "--threads", "1",
           "--lr", "1e-2"]
    tmp = tmp_path / "TMPDIR"
    tmp.mkdir()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**ENV, "TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("ignored 1 file(s)") == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert not list(tmp.glob("torchelastic_*")), list(tmp.iterdir())  # torchrun's log folder is not left behind
    run = RunDir.load(out)
    assert run.stage_done("finetune")
    assert run.data["metrics"]["finetune"]["world_size"] == 2
    net = load_classifier(run)  # weights_best
    val = sorted((digits / "val").rglob("*.png"))
    x = torch.from_numpy(np.stack([preprocess(p, run.contract) for p in val]))
    labels = torch.tensor([int(p.parent.name) for p in val])
    with torch.inference_mode():
        acc = (net(x).argmax(1) == labels).float().mean().item()
    reported = run.data["metrics"]["finetune"]["best"]["val_accuracy"]
    assert acc > 0.15, (acc, reported)  # trained, not random (10 classes)
    # the metric reduced over both ranks covers the whole val set; near-ties of this barely trained
    # model may flip between channels_last batches and this plain pass
    assert abs(acc - reported) <= 0.01
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # only rank 0 wrote: one manifest, no stray temp files
    assert not list(out.rglob("*.edgemap-tmp"))


def _one_step(data: Path, out: Path, nproc: int, batch: int, freeze: int) -> dict[str, torch.Tensor]:
    opts = {"backbone": "tiny", "img_size": 32, "epochs": 1, "freeze_epochs": freeze, "batch_size": batch,
            "augment": False, "flip": False, "dropout": 0.0, "threads": 1, "seed": 3}
    if nproc == 1:
        r = subprocess.run([sys.executable, RUNNER, str(data), str(out), json.dumps(opts)], capture_output=True,
                           text=True, timeout=300, env={k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK")})
    else:
        r = torchrun(nproc, RUNNER, str(data), str(out), json.dumps(opts))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return load_file(str(out / "weights" / "last.safetensors"))


def test_head_step_two_ranks_b_equals_one_rank_2b(sixteen: Path, tmp_path: Path) -> None:
    one = _one_step(sixteen, tmp_path / "one", 1, 16, freeze=1)
    two = _one_step(sixteen, tmp_path / "two", 2, 8, freeze=1)
    for k in one:
        assert torch.allclose(one[k].float(), two[k].float(), atol=1e-6), k
    assert not torch.equal(one["head.weight"], _fresh_head())  # the step really moved the head


def _fresh_head() -> torch.Tensor:
    from edgemap.model import build_classifier
    from edgemap.runtime.preprocess import PreprocessContract

    return build_classifier("tiny", 2, PreprocessContract(32, 32), pretrained=False, seed=3).head.weight.detach()


def test_full_step_close(sixteen: Path, tmp_path: Path) -> None:
    one = _one_step(sixteen, tmp_path / "one", 1, 16, freeze=0)
    two = _one_step(sixteen, tmp_path / "two", 2, 8, freeze=0)
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    # BatchNorm statistics are frozen while fine-tuning (FinetuneOptions.freeze_bn), so each
    # sample's forward is independent of its batch: only float summation order differs.
    assert worst < 1e-5, worst


def test_killed_rank_fails_the_whole_job(digits: Path, tmp_path: Path) -> None:
    piddir = tmp_path / "pids"
    piddir.mkdir()
    opts = {"backbone": "tiny", "img_size": 32, "epochs": 200, "freeze_epochs": 0, "threads": 1, "batch_size": 8}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", RUNNER,
           str(digits), str(tmp_path / "out"), json.dumps(opts), str(piddir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    t0 = time.monotonic()
    while not (piddir / "rank1.pid").exists() or not (tmp_path / "out" / "metrics.jsonl").exists() and time.monotonic() - t0 < 30:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - t0 < 180
        time.sleep(0.1)
    os.kill(int((piddir / "rank1.pid").read_text()), signal.SIGKILL)
    t_kill = time.monotonic()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after a rank was killed")
    assert proc.returncode != 0
    assert time.monotonic() - t_kill < 120


def _long_nproc_run(digits: Path, out: Path) -> tuple[subprocess.Popen, int]:
    """`edgemap finetune --nproc 2` for 200 epochs, once its first epoch is logged; and its torchrun's pid."""
    cmd = [sys.executable, "-m", "edgemap", "finetune", str(digits), "--out", str(out), "--backbone", "tiny",
           "--img-size", "32", "--epochs", "200", "--freeze-epochs", "0", "--batch-size", "8", "--threads", "1",
           "--nproc", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    t0 = time.monotonic()
    while not (out / "metrics.jsonl").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - t0 < 180
        time.sleep(0.1)
    return proc, int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])


def test_sigterm_to_the_nproc_launcher_stops_the_workers_cleanly(digits: Path, tmp_path: Path) -> None:
    """`kill PID` / `docker stop` reach `edgemap finetune --nproc 2` only: the workers must save their state
    and stop (exit 143, one error line, no torchrun traceback, nothing left running), and --resume works."""
    out = tmp_path / "run"
    proc, _ = _long_nproc_run(digits, out)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, output  # as a single process exits on SIGTERM
    assert output.count("interrupted by SIGTERM; state saved") == 1 and "--nproc 2" in output, output
    assert "Traceback" not in output and "ChildFailedError" not in output, output
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes still running: {left}"
    assert RunDir.load(out).data["stages"]["finetune"]["status"] == "interrupted"
    r = subprocess.run([sys.executable, "-m", "edgemap", "finetune", str(digits), "--out", str(out), "--resume",
                        "--epochs", "2", "--nproc", "2"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert RunDir.load(out).stage_done("finetune")
    # every rank opens the run to resume it; the closing block is still printed once (rank 0's)
    assert r.stdout.count("run directory:") == 1 and r.stdout.count("best val accuracy") == 1, r.stdout


@pytest.mark.parametrize("victim", ["launcher", "torchrun"])
def test_training_stops_with_its_state_saved_when_its_launcher_is_killed(digits: Path, tmp_path: Path, victim: str) -> None:
    """kill -9 of `edgemap finetune --nproc 2` (or of its torchrun) passed no signal on: the training processes ran on,
    re-parented, to the end of the run (or torchrun's death was a silent exit 247). They stop now as on SIGTERM."""
    out = tmp_path / "run"
    proc, torchrun_pid = _long_nproc_run(digits, out)
    os.kill(proc.pid if victim == "launcher" else torchrun_pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=180)
    t0 = time.monotonic()
    while subprocess.run(["pgrep", "-f", str(out)], capture_output=True).stdout and time.monotonic() - t0 < 60:
        time.sleep(0.2)  # saving their state
    assert not subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout, "still training"
    assert RunDir.load(out).data["stages"]["finetune"]["status"] == "interrupted"
    if victim == "torchrun":  # the launcher waited for them and says what happened, once
        assert proc.returncode == 137, output
        # rank 0 says SIGTERM, or "another rank" when rank 1's flag reached the shared check first
        assert len(re.findall(r"interrupted by (SIGTERM|another rank); state saved\. Resume with:", output)) == 1, output
        assert "torchrun (pid" in output and "was killed by SIGKILL; they stopped" in output, output


def test_a_worker_error_under_nproc_is_one_line_with_its_exit_code(sixteen: Path, tmp_path: Path) -> None:
    """Each rank hits the same dataset error; the user sees it once, not torchrun's ChildFailedError report."""
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    for f in sorted((sixteen / "train" / "dark").iterdir())[:3]:
        (one / "only" / f.name).write_bytes(f.read_bytes())
    r = subprocess.run([sys.executable, "-m", "edgemap", "finetune", str(one), "--out", str(tmp_path / "run"),
                        "--backbone", "tiny", "--epochs", "1", "--freeze-epochs", "0", "--nproc", "2"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and r.stderr.count("error:") == 1 and "only one class found" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr and "exitcode" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "edgemap", "finetune", str(one), "--out", str(tmp_path / "run"),
                        "--epochs", "1", "--freeze-epochs", "3", "--nproc", "2"], capture_output=True, text=True,
                       env=ENV, timeout=60)  # an option error is found before any process starts
    assert r.returncode == 2 and "--freeze-epochs 3 exceeds --epochs 1" in r.stderr and "Traceback" not in r.stderr


def test_a_launcher_killed_before_its_workers_start_leaves_nothing_running(digits: Path, tmp_path: Path) -> None:
    """kill -9 of the launcher before torchrun had started its watch (or its workers): the workers trained to the end."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgemap", "finetune", str(digits), "--out", str(out), "--backbone", "tiny",
           "--img-size", "32", "--epochs", "300", "--freeze-epochs", "0", "--batch-size", "8", "--threads", "1",
           "--nproc", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    t0 = time.monotonic()
    while not children.read_text().split():
        assert proc.poll() is None, f"the launcher exited ({proc.returncode}) before it started torchrun"
        assert time.monotonic() - t0 < 60, "torchrun not started within 60 s"
        time.sleep(0.005)
    proc.kill()  # torchrun has just started: no torch imported yet, no worker
    proc.wait()
    t0 = time.monotonic()
    while subprocess.run(["pgrep", "-f", str(out)], capture_output=True).stdout and time.monotonic() - t0 < 90:
        time.sleep(0.2)
    left = subprocess.run(["pgrep", "-a", "-f", str(out)], capture_output=True, text=True).stdout
    assert not left, f"still running after 90 s: {left}"
    assert not (out / "edgemap.json").exists() or not RunDir.load(out).stage_done("finetune")  # not trained to the end


def test_a_stop_asked_for_by_a_lost_parent_never_counts_as_a_second_ctrl_c() -> None:
    """The launcher forwards Ctrl-C, then kills torchrun; the worker's parent watch then asked for a stop with a
    SIGTERM, taken for a second Ctrl-C (stop without saving: up to a minute of training lost, 4 runs in 9)."""
    from edgemap.train.distributed import _stop_as_on_sigterm
    from edgemap.train.finetune import _catch_signals

    with _catch_signals() as flag:
        os.kill(os.getpid(), signal.SIGINT)  # the forwarded Ctrl-C (handled at once: this is the main thread)
        _stop_as_on_sigterm()  # the parent watch, after it: no KeyboardInterrupt
        assert flag.signum == signal.SIGINT and flag.pending and flag.name == "SIGINT"
    with _catch_signals() as flag:
        _stop_as_on_sigterm()  # the parent watch first
        os.kill(os.getpid(), signal.SIGINT)  # then the forwarded Ctrl-C: still the first
        assert flag.signum == signal.SIGINT and flag.requested == signal.SIGTERM


def test_a_killed_rank_is_named_and_the_survivor_says_how_to_resume(digits: Path, tmp_path: Path) -> None:
    """The surviving rank printed a ~45-line gloo traceback and no resume command (the README promises one line)."""
    out = tmp_path / "run"
    proc, torchrun_pid = _long_nproc_run(digits, out)
    ranks = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    rank1 = next(p for p in ranks if "LOCAL_RANK=1" in Path(f"/proc/{p}/environ").read_text().split("\0"))
    os.kill(int(rank1), signal.SIGKILL)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 137 and "Traceback" not in output, output
    assert f"error: training process rank 1 (pid {rank1}) was killed by SIGKILL" in output, output
    assert output.count("another training process of this job stopped (") == 1, output
    assert f"the last saved state is kept. Resume with: edgemap finetune {shlex.quote(str(digits))} --out {out} --resume --nproc 2" in output


def test_more_processes_than_images_is_one_line_before_anything_is_written(sixteen: Path, tmp_path: Path) -> None:
    """--nproc 3 on 2 training images: a rank with none failed inside torch.cat, then gloo tracebacks, exit 1."""
    few = tmp_path / "few"
    for split, n in (("train", 1), ("val", 2)):
        for c in ("dark", "light"):
            (few / split / c).mkdir(parents=True)
            for f in sorted((sixteen / split / c).iterdir())[:n]:
                (few / split / c / f.name).write_bytes(f.read_bytes())
    r = subprocess.run([sys.executable, "-m", "edgemap", "finetune", str(few), "--out", str(tmp_path / "run"),
                        "--backbone", "tiny", "--img-size", "32", "--epochs", "2", "--freeze-epochs", "1", "--nproc", "3"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stderr.count("error:") == 1 and "--nproc 3: more processes than images to share among them (2 training, " \
        "4 validation); use --nproc 2 or fewer" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_worker_killed_by_a_signal_is_named_in_one_line(tmp_path: Path) -> None:
    script = tmp_path / "die.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-m", "edgemap.train._torchrun", "--standalone", "--nproc-per-node=1", str(script)],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 128 + signal.SIGKILL, r.stderr
    assert "training process rank 0" in r.stderr and "killed by SIGKILL (out of memory?" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr


def test_the_cause_of_a_failed_job_is_not_the_rank_torchrun_stopped(tmp_path: Path) -> None:
    """One rank exits 2 (its own error), torchrun's agent SIGTERMs the other: the launcher named the SIGTERMed rank,
    "killed by SIGTERM", and exited 143 instead of the error's 2."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from edgemap.train._torchrun import cause

    def failed(**codes: int) -> ChildFailedError:
        return ChildFailedError("edgemap", {int(r[1:]): ProcessFailure(int(r[1:]), 100 + int(r[1:]), c, str(tmp_path / "none"))
                                            for r, c in codes.items()})

    assert cause(failed(r0=-signal.SIGTERM, r1=2))[0] == 1  # the error, not the rank the agent stopped
    assert cause(failed(r0=2, r1=-signal.SIGKILL))[0] == 1  # a rank killed (out of memory) is the cause
    assert cause(failed(r0=1, r1=1))[0] == 0


def test_a_repeated_sigterm_never_cuts_a_stop_that_is_saving_state() -> None:
    """torchrun's agent SIGTERMs the ranks still running once one has stopped: the second SIGTERM cut rank 0's save
    ("interrupted twice") while rank 1's line said "state saved". A second Ctrl-C still stops at once."""
    from edgemap.train.finetune import _catch_signals

    with _catch_signals() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # no KeyboardInterrupt
        assert flag.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after it: stop now


def test_a_ctrl_c_as_the_run_finishes_is_not_called_a_stop_before_training(tmp_path: Path) -> None:
    """A Ctrl-C in the last moments (the ranks past their last check, exiting 0): the launcher said "nothing was
    trained: run the command again" and exited 130 for a finished run. (A stand-in for torchrun: one that finished.)"""
    messages = tmp_path / "messages"
    messages.mkdir()
    fake = tmp_path / "fake_torchrun.py"
    fake.write_text("import os, pathlib, time\n"
                    "os.environ['RANK'] = '0'\n"
                    "from edgemap.cli.common import mark_worker_done\n"
                    "mark_worker_done()\n"
                    "time.sleep(60)\n")
    code = ("import sys; from edgemap.train.distributed import _launch; "
            f"sys.exit(_launch([sys.executable, {str(fake)!r}], 1, {str(messages)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV)
    t0 = time.monotonic()
    while not (messages / "rank0.done").exists():
        assert proc.poll() is None and time.monotonic() - t0 < 60, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "nothing was trained" not in output, output
