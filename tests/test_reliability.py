"""Reliability across stages: kill -9 loop (short), SIGINT/SIGTERM per stage, determinism, RELIABILITY.md.

The full fault-injection run is ``python benchmarks/kill_loop.py --kills 60``; the short
version here kills every writing stage twice (CI budget ~60 s).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgemap.manifest import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _kill_loop():  # noqa: ANN202 - the benchmark script, imported as a module
    spec = importlib.util.spec_from_file_location("kill_loop", ROOT / "benchmarks" / "kill_loop.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kill_loop"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def kl():  # noqa: ANN201
    return _kill_loop()


@pytest.fixture(scope="module")
def loop(kl, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    """A finetuned, exported (fp32 + int8) and packaged run, made by the CLI like a user would."""
    lp = kl.Loop(tmp_path_factory.mktemp("kill loop é"), seed=0, log=lambda _m: None)
    lp.prepare(kl.STAGES)
    return lp


# ---- 15. kill -9 at random points of every writing stage -------------------------------------
@pytest.mark.slow
def test_kill_loop_short(kl, loop) -> None:  # noqa: ANN001
    """Two SIGKILLs per stage (random / mid-write / after-replace points), then a completed re-run."""
    loop.finetune(2)
    loop.export("export", 2)
    loop.export("quantize", 2)
    loop.package(2)
    for name, st in loop.stats.items():
        assert st.kills == 2, name
        assert st.lost_or_corrupt == 0, (name, st.problems)
        assert st.completed_runs >= 1, name  # the re-run after the kills finished
    assert not kl.temp_files(loop.good) and not kl.work_dirs(loop.good)


# ---- 16. SIGINT / SIGTERM: a clean exit everywhere --------------------------------------------
def _signal_mid_run(cmd: list[str], watch: Path, sig: int, kl, max_wait: float) -> tuple[int, str]:  # noqa: ANN001
    """Send ``sig`` when the stage starts writing (a new temp file) or after ``max_wait`` s."""
    old = set(kl.temp_files(watch))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=kl._env())
    t0 = time.monotonic()
    while proc.poll() is None:
        if set(kl.temp_files(watch)) - old or time.monotonic() - t0 > max_wait:
            proc.send_signal(sig)
            break
        time.sleep(0.001)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("stage", ["export", "quantize", "package"])
def test_signal_exits_cleanly(kl, loop, stage: str, sig: int) -> None:  # noqa: ANN001
    args = {"export": ["export", str(loop.good)], "quantize": ["export", str(loop.good), *kl.QUANT_ARGS[1]],
            "package": ["package", str(loop.good), "--out", str(loop.good / "dist")]}[stage]
    watch = loop.good / "dist" if stage == "package" else loop.good
    for frac in (0.6, 0.8, 0.95, 0.4):
        # Sent when the stage starts writing, else at frac of its duration. rc 0: it finished first;
        # rc < 0: the signal came while Python was still importing, before any handler (nothing written).
        rc, out = _signal_mid_run(kl.edgemap_cmd(*args), watch, sig, kl, frac * loop.durations[stage])
        if rc > 0:
            break
        assert not kl.check_run(loop.good)[1]
    else:
        pytest.skip("every signal landed before the CLI started or after the stage finished")
    name = signal.Signals(sig).name
    assert rc == (143 if sig == signal.SIGTERM else 130), out
    assert f"interrupted by {name}" in out and "Traceback" not in out, out
    assert not kl.temp_files(watch) and not kl.work_dirs(loop.good), "temp files left by a clean interrupt"
    _, problems = kl.check_run(loop.good)
    _, wheel_problems = kl.check_wheels(loop.good / "dist")
    assert not problems and not wheel_problems
    assert subprocess.run(kl.edgemap_cmd(*args), capture_output=True, env=kl._env()).returncode == 0  # re-run completes


@pytest.mark.slow
def test_sigterm_during_finetune_saves_state_and_says_how_to_resume(kl, loop, tmp_path: Path) -> None:  # noqa: ANN001
    from edgemap.train import checkpoint as ckpt

    out = tmp_path / "ft 日本"
    cmd = kl.edgemap_cmd("finetune", str(loop.data), "--out", str(out), *kl.FINETUNE_ARGS)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=kl._env())
    t0 = time.monotonic()
    while not (out / ckpt.STATE_FILE).exists() and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("run finished before the signal arrived")
    assert proc.returncode == 143 and "SIGTERM" in output and "--resume" in output, output
    assert not kl.temp_files(out)
    assert RunDir.load(out).data["stages"]["finetune"]["status"] == "interrupted"
    ckpt.read_state(out)
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=kl._env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert RunDir.load(out).stage_done("finetune")


# ---- 17/19. determinism: same seed, same weights, same ONNX outputs ----------------------------
def test_same_seed_gives_identical_weights_and_onnx_outputs(tmp_path: Path) -> None:
    """Two finetune + export (fp32 and int8) runs with one seed on CPU: bit-identical everywhere."""
    from _export_fixtures import write_dataset
    from safetensors.torch import load_file

    from edgemap.export import ExportOptions, export
    from edgemap.runtime.preprocess import preprocess_batch
    from edgemap.runtime.sessions import SessionOptions, load
    from edgemap.train.finetune import FinetuneOptions, finetune

    data = write_dataset(tmp_path / "data", n_train=24, n_val=8)
    opts = FinetuneOptions(backbone="tiny", img_size=32, epochs=3, freeze_epochs=1, flip=False, threads=1,
                           batch_size=16, seed=7)
    xopts = ExportOptions(int8=True, targets=("cpu",), calib_size=16, parity_runtimes=("cpu",))
    runs = []
    for name in ("a", "b"):
        finetune(data, tmp_path / name, opts)
        export(tmp_path / name, xopts)
        runs.append(RunDir.load(tmp_path / name))
    a, b = runs
    for key in ("weights_best", "weights_last"):
        wa, wb = load_file(str(a.artifact_path(key))), load_file(str(b.artifact_path(key)))
        assert wa.keys() == wb.keys() and all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa), key
        assert a.artifacts[key]["sha256"] == b.artifacts[key]["sha256"], key  # the files too, not only the tensors
    images = preprocess_batch(sorted((data / "val").rglob("*.png")), a.contract)
    for key in ("onnx_fp32", "onnx_int8_qoperator"):
        import onnx

        ga = onnx.load(str(a.artifact_path(key))).graph.SerializeToString()
        gb = onnx.load(str(b.artifact_path(key))).graph.SerializeToString()
        assert ga == gb, f"{key}: the graphs differ"
        ya = load(a.artifact_path(key), "cpu", SessionOptions(threads=1)).run(images)
        yb = load(b.artifact_path(key), "cpu", SessionOptions(threads=1)).run(images)
        assert ya.tobytes() == yb.tobytes(), key  # bit-exact on ORT CPU
    finetune(data, tmp_path / "c", dataclasses.replace(opts, seed=8))
    wc = load_file(str(RunDir.load(tmp_path / "c").artifact_path("weights_last")))
    wa = load_file(str(a.artifact_path("weights_last")))
    assert any(not np.array_equal(wa[k].numpy(), wc[k].numpy()) for k in wa), "another seed must change the weights"


# ---- RELIABILITY.md names tests that exist -----------------------------------------------------
def test_reliability_md_covers_every_case_with_existing_tests() -> None:
    text = (ROOT / "RELIABILITY.md").read_text(encoding="utf-8")
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(refs) >= 40
    missing = []
    for file, name in set(refs):
        src = ROOT / file
        if not src.is_file() or not re.search(rf"^(async )?def {name}\(", src.read_text(encoding="utf-8"), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"RELIABILITY.md names tests that do not exist: {sorted(missing)}"
    rows = re.findall(r"^\|\s*(\d+)\s*\|", text, re.M)
    assert set(range(1, 30)) <= {int(r) for r in rows}, "every case 1-29 of the shared RELIABILITY.md has a row"
    for line in text.splitlines():
        if re.match(r"^\|\s*(\d+|I8\.\d+|R\d+)\s*\|", line):
            assert "::" in line, f"a case without a named test: {line}"
