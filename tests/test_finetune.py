"""finetune: run directory contents, exact resume after SIGKILL and SIGINT, typed errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgemap.cli import app
from edgemap.data.digits import write_digits
from edgemap.errors import DatasetError, ResumeError, TrainingError
from edgemap.manifest import RunDir
from edgemap.model import load_classifier
from edgemap.train import checkpoint as ckpt
from edgemap.train.finetune import FinetuneOptions, augment, finetune, flip_half, lr_factor

TINY = dict(backbone="tiny", img_size=32, epochs=3, freeze_epochs=1, flip=False, threads=1, batch_size=64)
CLI_TINY = ["--backbone", "tiny", "--img-size", "32", "--epochs", "3", "--freeze-epochs", "1", "--no-flip",
            "--threads", "1", "--batch-size", "64"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits data é")
    write_digits(root / "d", val_fraction=0.2, seed=0)
    return root / "d"


@pytest.fixture(scope="module")
def reference_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: the baseline resumed runs must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "run 日本"
    finetune(digits, out, FinetuneOptions(**TINY))
    return out


def _weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "weights" / f"{which}.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    diff = {k: (wa[k].float() - wb[k].float()).abs().max().item() for k in wa}
    assert max(diff.values()) == 0.0, {k: v for k, v in diff.items() if v}


def test_run_directory_contents(reference_run: Path) -> None:
    run = RunDir.load(reference_run)
    assert run.backbone == "tiny"
    assert run.classes == [str(i) for i in range(10)]
    assert run.contract.height == 32
    assert run.stage_done("finetune")
    for key in ("weights_best", "weights_last", "metrics"):
        run.artifact_path(key)  # exists and sha256 matches
    rows = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["phase"] == "head" and rows[1]["phase"] == "full"
    best = run.data["metrics"]["finetune"]["best"]
    assert best["val_accuracy"] == max(r["val_acc"] for r in rows)
    # images/s per epoch, not a running average since the run began (cached head-only epochs inflated it ~8%)
    for r in rows:
        assert r["train_seconds"] > 0 and r["images_per_s"] * r["train_seconds"] == pytest.approx(rows[0]["images_per_s"] * rows[0]["train_seconds"])
    digests = (reference_run / "train_images.sha256").read_text().split()  # what eval --data checks its images against
    assert run.data["dataset"]["train_digests"] == {"path": "train_images.sha256", "count": len(digests)}
    assert len(digests) == len(set(digests)) == sum(run.data["dataset"]["counts"]["train"].values())
    full = [r for r in rows if r["phase"] == "full"]
    rate = run.data["metrics"]["finetune"]["train_images_per_second"]  # the full-network epochs' throughput
    assert rate == pytest.approx(sum(r["images_per_s"] * r["train_seconds"] for r in full) / sum(r["train_seconds"] for r in full))
    assert run.data["dataset"]["fingerprint"]
    assert run.data["options"]["finetune"]["backbone"] == "tiny"
    assert not list(reference_run.rglob("*.edgemap-tmp"))
    # the stored weights rebuild a model that classifies better than chance
    net = load_classifier(run)
    assert net(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape == (2, 10)


def test_same_seed_same_weights(digits: Path, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    finetune(digits, out, FinetuneOptions(**TINY))
    _assert_same_weights(reference_run, out)


def _spawn(digits: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgemap", "finetune", str(digits), "--out", str(out), *CLI_TINY, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def _wait_for_state(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    state = out / ckpt.STATE_FILE
    t0 = time.monotonic()
    while not state.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - t0 < timeout, "no state file appeared"
        time.sleep(0.02)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(digits: Path, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = _spawn(digits, out, "--checkpoint-every", "7")
    _wait_for_state(proc, out)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert not RunDir.load(out).stage_done("finetune")
    tensors, meta = ckpt.read_state(out)  # the state survived the kill
    progress = meta["info"]["progress"]
    assert progress["global_step"] > 0
    r = CliRunner().invoke(app, ["finetune", str(digits), "--out", str(out), "--resume", "--threads", "1"])
    assert r.exit_code == 0, r.output
    _assert_same_weights(reference_run, out)
    assert not list(out.rglob("*.edgemap-tmp"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    ref = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, ref):  # the interrupted epoch's line counts the steps before the kill too
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9) and a["train_acc"] == b["train_acc"]


@pytest.mark.slow
def test_sigint_saves_state_and_prints_resume_command(digits: Path, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    proc = _spawn(digits, out, "--checkpoint-every", "5")
    _wait_for_state(proc, out)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("run finished before the signal arrived")
    assert proc.returncode == 130, output
    assert "--resume" in output and "SIGINT" in output
    assert RunDir.load(out).data["stages"]["finetune"]["status"] == "interrupted"
    finetune(digits, out, resume=True, overrides={"threads": 1})
    _assert_same_weights(reference_run, out)


@pytest.mark.parametrize("moment", ["caching frozen features", "validation"])
def test_a_signal_while_caching_features_or_validating_stops_at_once_and_resumes_exactly(
        digits: Path, reference_run: Path, tmp_path: Path, moment: str) -> None:
    """The stop flag was read only between steps: a SIGTERM during feature caching or validation waited for them
    (13.8 s at 128 px here; minutes on a large dataset, past `docker stop`'s 10 s)."""
    import time

    from edgemap.errors import Interrupted
    from edgemap.train.finetune import _Reporter

    class SigtermAt(_Reporter):
        def __init__(self) -> None:
            self.name, self.total, self.done, self.sent, self.cached = "", 0, 0, 0.0, 0

        def phase(self, name: str, total: int) -> None:
            self.name, self.total, self.done = name, total, 0
            if moment in name and not self.sent:
                self._send()

        def advance(self, n: int = 1, **fields: object) -> None:
            self.done += n  # the last step of the first full epoch: validation comes next
            self.cached += n if self.name.startswith("caching") else 0
            if moment == "validation" and self.name.startswith("epoch 2/") and self.done == self.total and not self.sent:
                self._send()

        def _send(self) -> None:
            self.sent = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler sets its stop flag

    out = tmp_path / "run"
    rep = SigtermAt()
    with pytest.raises(Interrupted, match="interrupted by SIGTERM; state saved"):
        finetune(digits, out, FinetuneOptions(**TINY), reporter=rep)
    assert rep.sent and time.monotonic() - rep.sent < 5
    if moment.startswith("caching"):
        assert rep.cached == 0, rep.cached  # not one more batch of features after the signal (all 23 were computed)
    rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    assert len(rows) == (0 if moment.startswith("caching") else 1)  # epoch 2 was not logged before its validation
    finetune(digits, out, resume=True)
    _assert_same_weights(reference_run, out)


def test_a_run_resumed_where_auto_would_choose_another_precision_continues_as_it_began(
        digits: Path, reference_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision auto was resolved again on resume: on a CPU with AMX (or a GPU) the rest of the run silently trained
    in bf16 and the manifest said bf16 for all of it. (Another machine is simulated: its bf16 detection says yes.)"""
    from edgemap.errors import Interrupted
    from edgemap.train import hardware
    from edgemap.train.finetune import _Reporter

    class Messages(_Reporter):
        def __init__(self, stop: bool) -> None:
            self.stop, self.said = stop, []

        def epoch_done(self, row: dict) -> None:
            if self.stop:
                os.kill(os.getpid(), signal.SIGINT)

        def message(self, text: str) -> None:
            self.said.append(text)

    if hardware.cpu_has_fast_bf16():
        pytest.skip("this CPU trains in bf16 already")
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        finetune(digits, out, FinetuneOptions(**TINY), reporter=Messages(stop=True))
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    rep = Messages(stop=False)
    res = finetune(digits, out, resume=True, reporter=rep)
    assert any("continuing in fp32, as this run began (--precision auto chooses bfloat16 on this machine)" in m
               for m in rep.said), rep.said
    assert res.autocast == "fp32" and RunDir.load(out).data["metrics"]["finetune"]["autocast"] == "fp32"
    _assert_same_weights(reference_run, out)


def test_resume_messages_name_flags_and_advice_that_can_be_followed(digits: Path, tmp_path: Path) -> None:
    """--resume --epochs 1 on a run with --freeze-epochs 2 advised --freeze-epochs 1, which was then refused; the
    native size given as a number was a conflict ("img_size: the run used None, given 32"); flags had Python names."""
    from edgemap.errors import Interrupted
    from edgemap.train.finetune import _Reporter

    class StopAfterOne(_Reporter):
        def epoch_done(self, row: dict) -> None:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        finetune(digits, out, FinetuneOptions(**{**TINY, "img_size": None, "epochs": 4, "freeze_epochs": 2}),
                 reporter=StopAfterOne())
    with pytest.raises(ResumeError, match=r"--epochs 1: this run has --freeze-epochs 2 .* give --epochs 2 or more"):
        finetune(digits, out, resume=True, overrides={"epochs": 1})
    with pytest.raises(ResumeError, match=r"--no-flip: the run was made with it, left out now; --lr: the run used"):
        finetune(digits, out, resume=True, overrides={"flip": True, "lr": 0.5})  # TINY has flip=False: --no-flip
    with pytest.raises(ResumeError, match=r"--img-size: the run used 32, given 64"):  # not "None", its real size
        finetune(digits, out, resume=True, overrides={"img_size": 64})
    finetune(digits, out, resume=True, overrides={"img_size": 32, "epochs": 2})  # tiny's own size: no change


def test_nan_loss_stops_with_clear_error_and_keeps_state(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="loss became"):
        finetune(digits, out, FinetuneOptions(**{**TINY, "lr": 1e38, "checkpoint_every": 1}))
    ckpt.read_state(out)  # last good state still loads
    assert RunDir.load(out).data["stages"]["finetune"]["status"] == "failed"


def test_resume_errors(digits: Path, reference_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="does not exist"):
        finetune(digits, tmp_path / "nope", FinetuneOptions(**TINY), resume=True)
    with pytest.raises(ResumeError, match=r"already finished; export it \(`edgemap export "):
        finetune(digits, reference_run, resume=True)
    # an interrupted run whose state file is corrupt
    out = tmp_path / "corrupt"
    with pytest.raises(TrainingError):
        finetune(digits, out, FinetuneOptions(**{**TINY, "lr": 1e38, "checkpoint_every": 1}))
    (out / ckpt.STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(ResumeError, match="corrupt"):
        finetune(digits, out, resume=True)


def test_resume_refuses_fewer_epochs_than_already_trained(digits: Path, tmp_path: Path) -> None:
    """A resume with --epochs below what the state has trained finished 'with 2 epochs' after training 3."""
    from safetensors.torch import save_file

    out = tmp_path / "stopped"
    with pytest.raises(TrainingError):
        finetune(digits, out, FinetuneOptions(**{**TINY, "lr": 1e38, "checkpoint_every": 1}))
    tensors, meta = ckpt.read_state(out)
    meta["info"]["progress"].update(epoch=2, step=3)  # as if stopped in the third epoch
    save_file(tensors, str(out / ckpt.STATE_FILE), metadata={ckpt._META_KEY: json.dumps(meta)})
    with pytest.raises(ResumeError, match="already trained 2 epochs and part of the next; give --epochs 3 or more"):
        finetune(digits, out, resume=True, overrides={"epochs": 2})
    r = CliRunner().invoke(app, ["finetune", str(digits), "--out", str(out), "--resume", "--epochs", "1"])
    assert r.exit_code == 2 and "give --epochs 3 or more" in " ".join(r.output.split()), r.output


def test_resume_refuses_other_backbone_and_other_classes(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "partial"
    with pytest.raises(TrainingError):
        finetune(digits, out, FinetuneOptions(**{**TINY, "lr": 1e38, "checkpoint_every": 1}))
    with pytest.raises(ResumeError, match="--backbone: the run used 'tiny', given 'efficientnet_lite0'"):
        finetune(digits, out, resume=True, overrides={"backbone": "efficientnet_lite0"})
    other = tmp_path / "other data"
    write_digits(other, seed=0)
    import shutil

    shutil.rmtree(other / "train" / "9")
    shutil.rmtree(other / "val" / "9")
    with pytest.raises(ResumeError, match=r"missing \['9'\]"):
        finetune(other, out, resume=True)
    # the same classes but changed files: resuming would not be exact
    (digits / "train" / "0" / "extra copy.png").write_bytes((next((digits / "train" / "0").glob("*.png"))).read_bytes())
    try:
        with pytest.raises(DatasetError, match="changed"):
            finetune(digits, out, resume=True)
    finally:
        (digits / "train" / "0" / "extra copy.png").unlink()
    # a test split added since: training does not read it, so the run resumes (here to its own lr's failure)
    (digits / "test" / "0").mkdir(parents=True)
    shutil.copy(next((digits / "val" / "0").glob("*.png")), digits / "test" / "0" / "new.png")
    try:
        with pytest.raises(TrainingError):
            finetune(digits, out, resume=True)
    finally:
        shutil.rmtree(digits / "test")


def test_existing_run_is_never_overwritten(digits: Path, reference_run: Path) -> None:
    before = (reference_run / "weights" / "last.safetensors").read_bytes()
    with pytest.raises(TrainingError, match=r"already holds a finished run: export it \(`edgemap export .* --int8`\)"):
        finetune(digits, reference_run, FinetuneOptions(**TINY))  # it said "continue it with --resume", which refused
    assert (reference_run / "weights" / "last.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--img-size", "50", "--backbone", "efficientnet_lite0"], "multiple of 32, at least 32: give 32 or 64"),
        (["--img-size", "100", "--backbone", "efficientnet_lite0"], "give 96 or 128"),  # said ">= 16"
        (["--img-size", "20", "--backbone", "efficientnet_lite0"], "give 32"),
        (["--img-size", "8", "--backbone", "tiny"], "--img-size 8: tiny needs at least 16"),  # "a multiple of 1"
        (["--img-size", "99999", "--backbone", "tiny"], "--img-size 99999: at most 8192"),  # was: after the scan
        (["--backbone", "nope"], "unknown backbone"),
        (["--epochs", "0"], "--epochs 0"),
        (["--freeze-epochs", "5", "--epochs", "2"], "exceeds --epochs"),
        (["--device", "cuda"], "CUDA unavailable"),
        (["--precision", "fp16", "--device", "cpu", "--backbone", "tiny", "--img-size", "32"], "fp16 is for CUDA"),
        (["--patience", "0", "--backbone", "tiny", "--img-size", "32"], "--patience 0: must be >= 1"),
        (["--threads", "-1", "--backbone", "tiny", "--img-size", "32"], "--threads -1: must be >= 0"),
        (["--threads", "5000", "--backbone", "tiny", "--img-size", "32"], "--threads 5000: must be at most 1024"),
        (["--seed", "99999999999999999999", "--backbone", "tiny", "--img-size", "32"], "must be < 2**63"),
        (["--img-size", "0", "--backbone", "tiny"], "--img-size 0: must be positive"),  # was: the native size, silently
        (["--nproc", "0", "--backbone", "tiny"], "--nproc 0: must be >= 1"),  # was ignored
        (["--nproc", "-1", "--backbone", "tiny"], "--nproc -1: must be >= 1"),
        (["--device", "cuda:x:", "--backbone", "tiny"], "--device cuda:x:"),  # as typed (rich made ":x:" an emoji)
    ],
)
def test_cli_option_errors(digits: Path, tmp_path: Path, args: list[str], message: str) -> None:
    if any(a.startswith("cuda") for a in args) and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = CliRunner().invoke(app, ["finetune", str(digits), "--out", str(tmp_path / "x"), *args])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())
    assert "Traceback" not in r.output
    assert not (tmp_path / "x").exists()  # refused before anything was written: the same command can be fixed and rerun


def test_cli_missing_dataset(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["finetune", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--backbone", "tiny"])
    assert r.exit_code == 2
    assert "missing" in r.output
    assert not (tmp_path / "x").exists()


def test_lr_schedule_shape() -> None:
    f = [lr_factor(s, 10, 1, 5, 1.0) for s in range(50)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0  # warm-up in the head phase
    assert f[10] == pytest.approx(0.1) and f[19] == 1.0  # warm-up again when the backbone thaws
    assert all(a >= b for a, b in zip(f[19:], f[20:]))  # cosine decay
    assert f[-1] < 0.01
    # one full epoch (3 epochs, 2 head-only): warm-up is cut to a quarter of it, then the rate decays (it ended at peak)
    g = [lr_factor(s, 8, 2, 3, 1.0) for s in range(24)]
    assert g[16] == pytest.approx(0.5) and g[17] == 1.0 and g[-1] < 0.1


def test_epochs_below_the_default_freeze_epochs_just_trains(digits: Path, tmp_path: Path) -> None:
    """`--epochs 1` failed with "--freeze-epochs 2 exceeds --epochs 1", an option the user never set."""
    r = CliRunner().invoke(app, ["finetune", str(digits), "--out", str(tmp_path / "one"), "--backbone", "tiny",
                                 "--img-size", "32", "--epochs", "1", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert RunDir.load(tmp_path / "one").data["options"]["finetune"]["freeze_epochs"] == 1
    r = CliRunner().invoke(app, ["finetune", str(digits), "--out", str(tmp_path / "two"), *CLI_TINY[:-4],
                                 "--epochs", "1", "--freeze-epochs", "2"])
    assert r.exit_code == 2 and "--freeze-epochs 2 exceeds --epochs 1" in r.output  # given: still refused


@pytest.mark.parametrize("bad", [dict(dropout=1.5), dict(label_smoothing=2.0), dict(weight_decay=-1.0),
                                 dict(crop_scale=(0.0, 5.0)), dict(bn_momentum=-0.1), dict(warmup_epochs=float("nan")),
                                 dict(dropout="abc"), dict(dropout=None)])
def test_python_options_are_checked_before_a_run_directory_is_made(digits: Path, tmp_path: Path, bad: dict) -> None:
    """From Python, dropout=1.5 or label_smoothing=2 failed inside torch (ValueError/RuntimeError, not an
    EdgemapError) after the run directory was made and left "running"."""
    from edgemap.errors import TrainingError
    from edgemap.train.finetune import FinetuneOptions, finetune

    with pytest.raises(TrainingError, match="must be"):
        finetune(digits, tmp_path / "run", FinetuneOptions(backbone="tiny", img_size=32, epochs=1, freeze_epochs=0, **bad))
    assert not (tmp_path / "run").exists()
    # what torch accepts stays accepted: an earlier run recorded checkpoint_seconds inf (time checkpoints off)
    FinetuneOptions(backbone="tiny", checkpoint_seconds=float("inf"), label_smoothing=1.0, dropout=1.0).validate()


def test_finetune_gives_back_the_callers_torch_threads_and_random_state(digits: Path, tmp_path: Path) -> None:
    """--threads 2 stayed set for the whole process; and training's per-step seeding left torch's global generator
    where training put it: a caller's own draws after finetune() were the same whatever seed it had set."""
    import torch

    from edgemap.train.finetune import FinetuneOptions, finetune

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        finetune(digits, tmp_path / "run", FinetuneOptions(backbone="tiny", img_size=32, epochs=1, freeze_epochs=0,
                                                             threads=2))
        assert torch.get_num_threads() == 1
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        torch.set_num_threads(before)


def test_the_progress_rate_is_not_inflated_by_checkpoints(digits: Path, tmp_path: Path) -> None:
    """The bar's img/s divided the epoch's images by the time since the last mid-epoch checkpoint: `edgemap demo`
    showed 5984 img/s for an epoch that ran at 28."""
    import json

    from edgemap.train.finetune import _Reporter

    class Rates(_Reporter):
        def __init__(self) -> None:
            self.ips: list[float] = []

        def advance(self, n: int = 1, **fields) -> None:  # noqa: ANN003
            if "ips" in fields:
                self.ips.append(fields["ips"])

    rates = Rates()
    out = tmp_path / "rate"
    finetune(digits, out, FinetuneOptions(**{**TINY, "epochs": 2, "batch_size": 16, "checkpoint_every": 1}),
             reporter=rates)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = len(rates.ips) // 2
    assert steps >= 10
    last_full = rates.ips[-1]  # the full-phase epoch's final figure, checkpointed after every step
    assert last_full < 3 * rows[-1]["images_per_s"], (last_full, rows[-1])


def test_augment_keeps_shape_and_is_seeded() -> None:
    x = torch.randn(4, 3, 16, 16)
    a = augment(x, torch.Generator().manual_seed(1), (0.5, 1.0), True)
    b = augment(x, torch.Generator().manual_seed(1), (0.5, 1.0), True)
    c = augment(x, torch.Generator().manual_seed(2), (0.5, 1.0), True)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_no_augment_keeps_the_flips_unless_no_flip(digits: Path, tmp_path: Path) -> None:
    """--no-augment turned the flips off too (while edgemap.json recorded flip: true): both runs were identical."""
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5).repeat(8, 1, 1, 1)
    y = flip_half(x, torch.Generator().manual_seed(0))
    mirrored = [bool(torch.equal(y[i], x[i].flip(-1))) for i in range(len(x))]
    assert all(m or torch.equal(y[i], x[i]) for i, m in enumerate(mirrored)) and 0 < sum(mirrored) < len(x)
    one = {**TINY, "epochs": 1, "freeze_epochs": 0, "augment": False}
    finetune(digits, tmp_path / "flip", FinetuneOptions(**{**one, "flip": True}))
    finetune(digits, tmp_path / "noflip", FinetuneOptions(**{**one, "flip": False}))
    a, b = _weights(tmp_path / "flip"), _weights(tmp_path / "noflip")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_relative_out_directory(digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["finetune", str(digits), "--out", "rel/run", *CLI_TINY[:-4], "--epochs", "1", "--freeze-epochs", "0"])
    assert r.exit_code == 0, r.output
    monkeypatch.chdir("/")
    run = RunDir.load(tmp_path / "rel" / "run")
    run.artifact_path("weights_best")
    assert not Path(run.artifacts["weights_best"]["path"]).is_absolute()


def test_nan_before_any_checkpoint_does_not_point_at_a_state_file(digits: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no state was saved yet"):
        finetune(digits, tmp_path / "nan0", FinetuneOptions(**{**TINY, "lr": 1e38}))


def test_out_inside_the_dataset_is_refused_before_anything_is_written(digits: Path) -> None:
    before = sorted(p.name for p in digits.iterdir())
    for out in (digits / "run", digits, digits / "train" / "nested run"):
        with pytest.raises(TrainingError, match="inside the dataset"):
            finetune(digits, out, FinetuneOptions(**TINY))
    assert sorted(p.name for p in digits.iterdir()) == before and not (digits / "train" / "nested run").exists()


def test_out_that_is_a_file_is_a_clear_error(digits: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for out, pat in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "cannot create the run directory")):
        r = CliRunner().invoke(app, ["finetune", str(digits), "--out", str(out), *CLI_TINY])
        assert r.exit_code == 2 and pat in " ".join(r.output.split()) and "Traceback" not in r.output, r.output


def test_out_holding_other_files_is_refused_and_nothing_is_overwritten(digits: Path, tmp_path: Path) -> None:
    """An existing folder of other work: its weights/best.safetensors was overwritten and its metrics.jsonl appended to
    (or, not JSON lines, a JSONDecodeError traceback on every retry)."""
    out = tmp_path / "my experiment"
    (out / "weights").mkdir(parents=True)
    (out / "weights" / "best.safetensors").write_text("precious")
    (out / "metrics.jsonl").write_text("step,loss\n1,0.5\n")
    r = CliRunner().invoke(app, ["finetune", str(digits), "--out", str(out), *CLI_TINY])
    assert r.exit_code == 2 and "holds other files (metrics.jsonl, weights) and no edgemap run" in " ".join(r.output.split())
    assert (out / "weights" / "best.safetensors").read_text() == "precious" and not (out / "edgemap.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0")
    assert finetune(digits, empty, FinetuneOptions(**{**TINY, "epochs": 1})).epochs_run == 1  # empty is fine


def test_a_cut_metrics_line_does_not_stop_a_resume(tmp_path: Path) -> None:
    from edgemap.train.finetune import _truncate_metrics

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo\n{"epoch": 3}\n')
    _truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_a_second_ctrl_c_marks_the_run_interrupted_and_says_resume(digits: Path, tmp_path: Path) -> None:
    """The second Ctrl-C stops at once (KeyboardInterrupt): the stage stayed "running" and the message said "run the
    command again", which a run directory refuses ("already holds a run")."""
    from edgemap.errors import Interrupted
    from edgemap.train.finetune import _Reporter

    class SecondCtrlC(_Reporter):
        def epoch_done(self, row: dict) -> None:
            if row["epoch"] == 2:
                raise KeyboardInterrupt

    out = tmp_path / "twice"
    from edgemap.errors import EdgemapError

    with pytest.raises(Interrupted, match="interrupted twice: stopped at once.*Resume with: .*--resume"):
        try:
            finetune(digits, out, FinetuneOptions(**TINY), reporter=SecondCtrlC())
        except EdgemapError:  # a script's sweep loop (`except EdgemapError: continue`) swallowed the user's Ctrl-C
            pytest.fail("the interrupt was caught as an EdgemapError")
    assert issubclass(Interrupted, KeyboardInterrupt) and not issubclass(Interrupted, Exception)
    assert RunDir.load(out).data["stages"]["finetune"]["status"] == "interrupted"
    assert finetune(digits, out, FinetuneOptions(**TINY), resume=True).epochs_run == 3


def test_resume_from_a_moved_dataset_records_where_it_is_now(digits: Path, tmp_path: Path) -> None:
    """`mv dA dB; finetune dB --resume` trained, but edgemap.json kept dA: the printed `export` failed ("gone")."""
    import shutil

    from edgemap.data.scan import rescan_for_run
    from edgemap.errors import Interrupted
    from edgemap.train.finetune import _Reporter

    class CtrlC(_Reporter):
        def epoch_done(self, row: dict) -> None:
            if row["epoch"] == 2:
                raise KeyboardInterrupt

    first = shutil.copytree(digits, tmp_path / "dA")
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        finetune(first, out, FinetuneOptions(**TINY), reporter=CtrlC())
    moved = first.rename(tmp_path / "dB")
    finetune(moved, out, FinetuneOptions(**TINY), resume=True)
    run = RunDir.load(out)
    assert run.data["dataset"]["root"] == str(moved) and rescan_for_run(run.data["dataset"]).root == moved


def test_a_run_that_never_started_training_can_be_started_again(digits: Path, tmp_path: Path) -> None:
    """A manifest with nothing trained (e.g. a dataset error after it was written) does not block a new run."""
    from edgemap.runtime.preprocess import PreprocessContract

    out = tmp_path / "stub"
    RunDir.create(out, backbone={"name": "tiny"}, classes=["a", "b"], contract=PreprocessContract(32, 32))
    res = finetune(digits, out, FinetuneOptions(**{**TINY, "epochs": 1}))
    assert res.epochs_run == 1 and RunDir.load(out).stage_done("finetune")


def test_a_second_finetune_on_a_busy_run_directory_is_refused(digits: Path, tmp_path: Path) -> None:
    from edgemap.errors import RunBusyError

    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom edgemap.manifest import run_lock\n"
                               "with run_lock(sys.argv[1], 'finetune', create=True):\n    print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusyError, match=r"in use by pid \d+ \(edgemap finetune\)"):
            finetune(digits, out, FinetuneOptions(**TINY))
        assert sorted(p.name for p in out.iterdir()) == [".edgemap.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_busy_run_is_refused_before_the_dataset_is_scanned(digits: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A second `finetune --resume` decoded the whole dataset (24 s on 1,200 photos) before exiting 75."""
    import edgemap.data.scan as scan_mod
    from edgemap.errors import RunBusyError
    from edgemap.runtime.preprocess import PreprocessContract

    out = tmp_path / "busy run"
    RunDir.create(out, backbone={"name": "tiny"}, classes=["a", "b"], contract=PreprocessContract(32, 32))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom edgemap.manifest import run_lock\n"
                               "with run_lock(sys.argv[1], 'finetune'):\n    print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    scans: list[object] = []
    monkeypatch.setattr(scan_mod, "scan_dataset", lambda *a, **k: scans.append(a))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusyError, match="in use by pid"):
            finetune(digits, out, FinetuneOptions(**TINY), resume=True)
        assert scans == []
    finally:
        holder.kill()
        holder.wait()


def test_decoding_stops_when_asked(digits: Path) -> None:
    """Ctrl-C while decoding: queued images are cancelled, not decoded to the end."""
    from edgemap.runtime.preprocess import PreprocessContract
    from edgemap.train.finetune import load_arrays

    seen: list[int] = []
    img = next((digits / "train" / "0").glob("*.png"))
    arr = load_arrays([img] * 500, PreprocessContract(32, 32), None, 1, seen.append, stop=lambda: len(seen) >= 3)
    assert arr.shape == (500, 32, 32, 3) and len(seen) == 3
    assert arr[:3].any() and not arr[-100:].any()  # the tail was never decoded


def test_bf16_asked_for_on_a_gpu_without_it_is_refused_not_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision bf16 on a GPU without bf16 trained in fp16 (another range, a loss scaler) without a word.
    (No GPU here: the GPU's answer is simulated; the choice itself runs for real.)"""
    from edgemap.train.hardware import autocast_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(TrainingError, match="--precision bf16: this GPU has no bf16"):  # emulated (T4, V100): no
        autocast_dtype(torch.device("cuda"), "bf16")
    assert autocast_dtype(torch.device("cuda"), "auto") == torch.float16  # auto chooses fp16 there


def test_head_only_for_every_epoch_is_said(digits: Path, tmp_path: Path) -> None:
    from edgemap.train.finetune import _Reporter

    class Said(_Reporter):
        def __init__(self) -> None:
            self.said: list[str] = []

        def message(self, text: str) -> None:
            self.said.append(text)

    rep = Said()
    finetune(digits, tmp_path / "run", FinetuneOptions(**{**TINY, "epochs": 1, "freeze_epochs": 1}), reporter=rep)
    assert any("all 1 epoch(s) train the head only (--freeze-epochs 1); the backbone is not fine-tuned" in m
               for m in rep.said), rep.said
    # the advice works as given: `--epochs 2` alone would bring back the default 2 head-only epochs where
    # `--epochs 1` had capped them to 1 (the note said "give --epochs 2 or more")
    assert any("give --epochs 2 --freeze-epochs 1 " in m for m in rep.said), rep.said


def test_running_out_of_memory_is_recognised() -> None:
    """`--img-size 8192` (tiny) ended in a traceback from alloc_cpu.cpp; finetune now names the options to lower."""
    from edgemap.train.finetune import out_of_memory

    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**62, dtype=torch.uint8)  # a real allocation failure, at once
    assert out_of_memory(caught.value)
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_an_out_that_cannot_be_written_is_refused_before_the_scan(digits: Path, tmp_path: Path) -> None:
    """`--out` under a read-only folder was refused only after the whole dataset had been decoded."""
    import os
    import shutil
    import stat
    import subprocess
    import sys

    prefix: list[str] = []
    if os.geteuid() == 0:  # root ignores permission bits: drop the capabilities that do so
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permission bits cannot be tested")
        caps = "-dac_override,-dac_read_search,-fowner"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        r = subprocess.run([*prefix, sys.executable, "-m", "edgemap", "finetune", str(digits), "--out", str(ro / "run"),
                            "--backbone", "tiny", "--img-size", "32", "--epochs", "1"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    finally:
        ro.chmod(stat.S_IRWXU)
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2 and f"cannot write the run directory ({ro} is not writable" in out, out
    assert "classes" not in out and "Traceback" not in out, out  # refused before the dataset was scanned


def test_a_full_disk_while_saving_weights_is_an_os_error(tmp_path: Path) -> None:
    """safetensors reports a full disk as its own SafetensorError: finetune printed a 30-line traceback, exit 1, where
    every other stage says one line (exit 74)."""
    import subprocess

    from edgemap.train.checkpoint import save_tensors

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights): no full disk to write to")
    try:
        with pytest.raises(OSError) as e:
            save_tensors({"w": torch.zeros(200_000)}, mnt / "w.safetensors", {"edgemap": "{}"})
        assert e.value.errno == 28 and e.value.filename == str(mnt / "w.safetensors")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_stop_as_training_finishes_is_honoured_not_dropped(digits: Path, tmp_path: Path) -> None:
    """A Ctrl-C during the last validation or the final saves was dropped: exit 0, and `edgemap run` went on through
    export, eval, bench and package."""
    import signal

    from edgemap.errors import Interrupted
    from edgemap.train.finetune import FinetuneOptions, _Reporter, finetune

    class LastEpochCtrlC(_Reporter):
        def epoch_done(self, row: dict) -> None:
            if row["epoch"] == TINY["epochs"]:  # after the last step: no step left to see the stop
                os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="as fine-tuning finished: the run is complete and recorded") as e:
        finetune(digits, out, FinetuneOptions(**TINY), reporter=LastEpochCtrlC())
    assert e.value.exit_code == 130 and "edgemap export" in str(e.value)
    assert RunDir.load(out).stage_done("finetune")  # complete: nothing to resume


def test_a_resume_gives_back_the_callers_python_and_numpy_random_state(digits: Path, tmp_path: Path) -> None:
    """Resuming restores the run's own random states into `random` and numpy's global generator: they stayed so."""
    import random
    import signal

    import numpy as np

    from edgemap.errors import Interrupted
    from edgemap.train.finetune import FinetuneOptions, _Reporter, finetune

    class CtrlCAfterEpoch1(_Reporter):
        def epoch_done(self, row: dict) -> None:
            if row["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        finetune(digits, out, FinetuneOptions(**TINY), reporter=CtrlCAfterEpoch1())
    random.seed(5)
    np.random.seed(5)
    py, npy = random.getstate(), np.random.get_state()
    finetune(digits, out, resume=True)
    assert random.getstate() == py and all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), npy))
