"""`edgemap run` / `demo`: every stage chained, nothing redone on a finished run, resume from export."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemap.cli import app
from edgemap.cli.cmd_run import build_options
from edgemap.data.digits import write_digits
from edgemap.manifest import RunDir
from edgemap.pipeline import STAGES, run_pipeline

pytestmark = pytest.mark.slow


def _opts(report: bool = False):  # noqa: ANN202
    return build_options(backbone="tiny", img_size=32, epochs=3, flip=False, lr=1e-2, runtime="torch,cpu,openvino",
                         bench_seconds=0.3, max_drop=100.0, report=report)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline data") / "d"
    write_digits(root, seed=0)
    return root


@pytest.fixture(scope="module")
def finished(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipe") / "run é"
    res = run_pipeline(digits, out, _opts())
    assert [s.status for s in res.stages] == ["done"] * 5
    return out


def test_every_stage_runs_and_is_recorded(finished: Path) -> None:
    run = RunDir.load(finished)
    for stage in ("finetune", "export", "eval", "bench", "package"):
        assert run.stage_done(stage), stage
    wheel = finished / run.data["stages"]["package"]["wheel"]  # relative: a moved run directory still finds it
    assert wheel.is_file() and wheel.suffix == ".whl"
    from edgemap.pipeline import summarize

    rows = {(r["runtime"], r["precision"]): r for r in summarize(run)}
    for key in (("torch", "fp32"), ("cpu", "fp32"), ("cpu", "int8"), ("openvino", "fp32"), ("openvino", "int8")):
        assert rows[key]["accuracy"] is not None and rows[key]["p50_ms"] > 0, key
    assert rows[("cpu", "fp32")]["accuracy"] == pytest.approx(rows[("torch", "fp32")]["accuracy"], abs=0.01)


def test_an_eval_on_another_folder_is_said_and_run_measures_its_own_split_again(digits: Path, finished: Path,
                                                                                tmp_path: Path) -> None:
    """`edgemap eval RUN --data five_images` silently replaced the stored results; `edgemap run` then called eval
    "already done" and packaged a model card measured on those 5 images."""
    import shutil

    from edgemap.evaluate import EvalOptions, evaluate

    copy = _copy(finished, tmp_path)
    few = tmp_path / "few"
    for cls in sorted(p.name for p in (digits / "val").iterdir() if p.is_dir())[:2]:
        (few / cls).mkdir(parents=True)
        for f in sorted((digits / "val" / cls).iterdir())[:3]:
            shutil.copy(f, few / cls / f.name)
    res = evaluate(copy, EvalOptions(data=few, runtimes=("cpu",), precisions=("int8",)))
    assert any("were replaced by these" in n and "measures the run's own held-out split again before it packages" in n
               for n in res.notes), res.notes
    assert RunDir.load(copy).data["metrics"]["eval"]["own_data"] is False
    out = run_pipeline(digits, copy, _opts())
    assert dict(_statuses(out))["eval"] == "done" and dict(_statuses(out))["package"] == "done", _statuses(out)
    stored = RunDir.load(copy).data["metrics"]["eval"]
    assert stored["own_data"] is True and "few" not in stored["data"]


def test_rerun_on_finished_run_does_nothing_and_says_so(digits: Path, finished: Path) -> None:
    before = (finished / "edgemap.json").read_bytes()
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(finished), "--backbone", "tiny", "--no-report"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "nothing to do" in r.output
    assert (finished / "edgemap.json").read_bytes() == before
    j = CliRunner().invoke(app, ["run", str(digits), "--out", str(finished), "--no-report", "--json", "-"])
    assert json.loads(j.output)["did_nothing"] is True


def test_tampered_artifact_is_refused_not_silently_redone(digits: Path, finished: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    run = RunDir.load(copy)
    # paths are relative, so the copy is a valid run; flip one byte of its ONNX model
    onnx = copy / run.artifacts["onnx_fp32"]["path"]
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 1
    onnx.write_bytes(bytes(data))
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(copy), "--no-report"])
    assert r.exit_code == 2
    assert "sha256" in r.output


def test_interrupted_export_continues_from_export(digits: Path, tmp_path: Path) -> None:
    from edgemap.train.finetune import finetune

    out = tmp_path / "half"
    opts = _opts()
    finetune(digits, out, opts.finetune)
    proc = subprocess.Popen([sys.executable, "-m", "edgemap", "export", str(out), "--int8", "--max-drop", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    t0 = time.monotonic()
    while not (out / "model.onnx").exists() and proc.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # fp32 written, int8 under way
    proc.wait()
    run = RunDir.load(out)
    if run.stage_done("export"):  # the tiny export outran the kill: leave the same state by hand
        del run.data["stages"]["export"]
        run.save()
    assert not RunDir.load(out).stage_done("export")
    res = run_pipeline(digits, out, opts)
    assert [(s.stage, s.status) for s in res.stages][:2] == [("finetune", "skipped"), ("export", "done")]
    assert RunDir.load(out).stage_done("package")
    assert not list(out.rglob("*.edgemap-tmp"))


def test_an_export_interrupted_inside_run_says_what_is_true_and_keeps_this_commands_options(
        digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the int8 step of `run`'s first export said "the int8 models of the previous one are retired
    (*.stale.onnx)" (there were none) and named `edgemap export`; the bare re-run then exported with the recorded
    --calib-size, not this command's."""
    import edgemap.export as export_mod
    from edgemap.errors import Interrupted
    from edgemap.train.finetune import finetune

    out = tmp_path / "run"
    base = _opts()
    finetune(digits, out, base.finetune)

    def ctrl_c(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(export_mod, "_int8", ctrl_c)
    messages = []
    for calib_size in (20, 24):  # stopped twice; the second command's options are the ones to continue with
        opts = build_options(backbone="tiny", img_size=32, epochs=3, flip=False, lr=1e-2, runtime="torch,cpu,openvino",
                             bench_seconds=0.3, max_drop=100.0, report=False, calib_size=calib_size)
        with pytest.raises((Interrupted, KeyboardInterrupt)) as e:  # the second: model.onnx was already there
            run_pipeline(digits, out, opts)
        messages.append(str(e.value))
    msg = messages[0]
    assert "model.onnx is new and recorded; the new int8 models were not made" in msg, msg
    assert "retired" not in msg and "stale" not in msg and "run the same `edgemap run` command again" in msg, msg
    run = RunDir.load(out)
    assert run.data["options"]["run"]["export"]["calib_size"] == 24
    assert run.data["stages"]["export"]["status"] == "interrupted"
    monkeypatch.undo()
    res = run_pipeline(digits, out, build_options(report=False))  # the bare `edgemap run DATA --out RUN`
    assert _statuses(res)[:2] == [("finetune", "skipped"), ("export", "done")]
    assert RunDir.load(out).artifacts["onnx_int8_qoperator"]["calib_images"] == 24


def _copy(finished: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    return copy


def _statuses(res) -> list[tuple[str, str]]:  # noqa: ANN001
    return [(s.stage, s.status) for s in res.stages]


def test_rerun_refuses_another_dataset_or_other_finetune_options(digits: Path, finished: Path, tmp_path: Path) -> None:
    from edgemap.errors import DatasetError

    other = tmp_path / "other"
    write_digits(other, seed=1)
    with pytest.raises(DatasetError, match="was made from the dataset"):
        run_pipeline(other, finished, _opts())
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(finished), "--epochs", "5", "--no-report"])
    assert r.exit_code == 2 and "fine-tuned with other options (epochs: 3 → 5)" in " ".join(r.output.split()), r.output


def test_changed_package_options_redo_package_only(digits: Path, finished: Path, tmp_path: Path) -> None:
    copy = _copy(finished, tmp_path)
    opts = build_options(backbone="tiny", img_size=32, epochs=3, flip=False, lr=1e-2, runtime="torch,cpu,openvino",
                         bench_seconds=0.3, max_drop=100.0, report=False, package_runtime="openvino")
    res = run_pipeline(digits, copy, opts)
    assert _statuses(res) == [("finetune", "skipped"), ("export", "skipped"), ("eval", "skipped"),
                              ("bench", "skipped"), ("package", "done")]
    assert "openvino" in RunDir.load(copy).data["options"]["run"]["package"]["runtime"]


def test_deleted_wheel_is_made_again(digits: Path, finished: Path, tmp_path: Path) -> None:
    copy = _copy(finished, tmp_path)
    wheel = copy / RunDir.load(copy).data["stages"]["package"]["wheel"]
    wheel.unlink()
    res = run_pipeline(digits, copy, _opts())
    new = Path(res.wheel)
    assert _statuses(res)[-1] == ("package", "done") and new.is_file()
    assert copy in new.parents  # the copy's own wheel, not the original run's


def test_export_by_hand_outdates_the_later_stages(digits: Path, finished: Path, tmp_path: Path) -> None:
    from edgemap.export import ExportOptions, export

    copy = _copy(finished, tmp_path)
    export(copy, ExportOptions(opset=13))  # new model.onnx; its int8 models are retired
    stages = RunDir.load(copy).data["stages"]
    assert {s: stages[s]["status"] for s in ("eval", "bench", "package")} == dict.fromkeys(("eval", "bench", "package"), "outdated")
    res = run_pipeline(digits, copy, _opts())
    assert _statuses(res) == [("finetune", "skipped")] + [(s, "done") for s in ("export", "eval", "bench", "package")]
    assert any(k.startswith("onnx_int8_") for k in RunDir.load(copy).artifacts)


def test_redone_stages_keep_the_runs_options_unless_given(digits: Path, finished: Path, tmp_path: Path) -> None:
    copy = _copy(finished, tmp_path)
    opts = build_options(backbone="tiny", img_size=32, epochs=3, flip=False, lr=1e-2, max_drop=2.0, report=False)
    res = run_pipeline(digits, copy, opts)  # --max-drop changed: export and all after it are redone...
    assert _statuses(res) == [("finetune", "skipped")] + [(s, "done") for s in ("export", "eval", "bench", "package")]
    run = RunDir.load(copy)
    recorded = run.data["options"]["run"]
    assert recorded["export"]["max_drop"] == 2.0
    assert recorded["eval"]["runtimes"] == ["torch", "cpu", "openvino"] and recorded["bench"]["seconds"] == 0.3  # ...as made
    assert {r["runtime"] for r in run.data["metrics"]["eval"]["rows"]} == {"torch", "cpu", "openvino"}


def test_run_takes_the_exports_opset_and_calibration_method(digits: Path, finished: Path, tmp_path: Path) -> None:
    """`edgemap run` had no --opset or --calib-method: the export stage had to be run by hand first."""
    copy = _copy(finished, tmp_path)
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(copy), "--opset", "14", "--calib-method", "percentile"])
    assert r.exit_code == 0, r.output
    run = RunDir.load(copy)
    assert run.data["stages"]["export"]["status"] == "done" and run.data["options"]["run"]["export"]["opset"] == 14
    assert run.artifacts["onnx_fp32"]["opset"] == 14
    assert {a["calib_method"] for k, a in run.artifacts.items() if k.startswith("onnx_int8_")} == {"percentile"}
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(copy)])  # the run's own choice is kept
    assert r.exit_code == 0 and RunDir.load(copy).artifacts["onnx_fp32"]["opset"] == 14, r.output


def test_a_rerun_after_ctrl_c_resumes_with_the_runs_own_options(digits: Path, tmp_path: Path) -> None:
    """Interrupted after epoch 1 of 4; `edgemap run` again without --epochs trains to 4, not to the default."""
    from edgemap.errors import Interrupted
    from edgemap.train.finetune import _Reporter

    class CtrlCAfterFirstEpoch(_Reporter):
        def epoch_done(self, row: dict) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler sets its stop flag

    out = tmp_path / "cut"
    first = build_options(backbone="tiny", img_size=32, epochs=4, freeze_epochs=1, flip=False, lr=1e-2,
                          runtime="cpu", bench_seconds=0.3, max_drop=100.0, report=False, name="cut-wheel")
    with pytest.raises(Interrupted, match="run the same `edgemap run` command again"):
        run_pipeline(digits, out, first, finetune_reporter=CtrlCAfterFirstEpoch())
    again = build_options(backbone="tiny", img_size=32, runtime="cpu", bench_seconds=0.3, max_drop=100.0, report=False)
    res = run_pipeline(digits, out, again)
    assert _statuses(res)[0] == ("finetune", "resumed")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and RunDir.load(out).data["options"]["finetune"]["epochs"] == 4
    assert Path(res.wheel).name.startswith("cut_wheel-")  # the first command's --name, though not given again


@pytest.mark.parametrize(("kw", "says"), [
    ({"runtime": "foo"}, "--runtime 'foo' is unknown"),
    ({"package_runtime": "tflite"}, "--package-runtime 'tflite'"),
    ({"name": "Bad Name!"}, "--name"),
    ({"bench_seconds": 0.0}, "--bench-seconds 0.0: must be a finite number of seconds > 0"),
    ({"bench_seconds": float("nan")}, "--bench-seconds nan: must be a finite"),  # measured for ever
    ({"bench_seconds": float("inf")}, "--bench-seconds inf: must be a finite"),
    ({"max_drop": -5.0}, "--max-drop"),
    ({"calib_size": 0}, "--calib-size 0 is too small"),
    ({"img_size": 8}, "--img-size 8"),
    ({"int8": False, "calib_size": 5, "max_drop": 2.0}, "--max-drop, --calib-size only apply with int8"),  # unused
    ({"int8": False, "calib_method": "entropy"}, "--calib-method only applies with int8; leave out --no-int8 or leave it out"),
    ({"calib_method": "kl"}, "--calib-method 'kl' is not one of minmax, entropy, percentile"),
    ({"opset": 99}, "--opset 99 is newer than torch"),  # failed only at export, after fine-tuning
    ({"opset": 11}, "--int8 needs --opset 13 or newer (per-channel int8), got 11; or export fp32 only"),
    ({"opset": 11, "int8": True}, "--opset 11: int8 models need --opset 13 or newer (per-channel int8); give --no-int8"),
])
def test_bad_options_of_any_stage_fail_before_training(digits: Path, tmp_path: Path, kw: dict, says: str) -> None:
    """They used to fail only when their stage started: after fine-tuning (hours with a real backbone)."""
    from edgemap.errors import EdgemapError

    with pytest.raises(EdgemapError, match=re.escape(says)):
        opts = build_options(**{"backbone": "tiny", "img_size": 32, "epochs": 1, "freeze_epochs": 0, "runtime": "cpu", **kw})
        run_pipeline(digits, tmp_path / "run", opts)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_no_runtime_that_can_run_is_refused_before_training_and_on_a_finished_run(digits: Path, finished: Path,
                                                                                  tmp_path: Path) -> None:
    from edgemap.runtime.sessions import available

    if available("cuda")[0]:
        pytest.skip("CUDA runs here")
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(tmp_path / "new"), "--backbone", "tiny",
                                 "--runtime", "cuda"])
    assert r.exit_code == 2 and "none of --runtime can run here: cuda:" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "new").exists()
    copy = _copy(finished, tmp_path)
    before = (copy / "edgemap.json").read_bytes()
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(copy), "--runtime", "cuda"])
    assert r.exit_code == 2 and "none of --runtime can run here" in r.output, r.output
    assert (copy / "edgemap.json").read_bytes() == before  # results and stage records kept


def test_given_default_img_size_is_not_a_change_and_report_can_be_turned_back_on(digits: Path, finished: Path,
                                                                                 tmp_path: Path) -> None:
    copy = _copy(finished, tmp_path)
    run = RunDir.load(copy)
    run.data["options"]["finetune"]["img_size"] = None  # as if made without --img-size: tiny's own 32
    run.save()
    assert run.data["options"]["run"]["report"] is False  # made with --no-report
    res = run_pipeline(digits, copy, build_options(img_size=32))
    assert res.did_nothing
    res = run_pipeline(digits, copy, build_options(report=True))
    assert _statuses(res)[-1] == ("report", "done") and Path(res.report).is_file()
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(copy), "--img-size", "64"])
    assert r.exit_code == 2 and "img_size: None → 64" in r.output, r.output


def test_eval_by_hand_redoes_the_package_and_report_that_show_its_results(digits: Path, finished: Path,
                                                                          tmp_path: Path) -> None:
    """After `edgemap eval RUN --runtime cpu` (the run's own next step) a re-run said 'nothing to do' and the
    wheel's model card and the report kept the rows eval had just replaced."""
    from edgemap.evaluate import EvalOptions, evaluate
    from edgemap.report import ReportOptions, report

    copy = _copy(finished, tmp_path)
    evaluate(copy, EvalOptions(runtimes=("cpu",), precisions=("fp32",)))
    stages = RunDir.load(copy).data["stages"]
    assert stages["package"]["status"] == "outdated" and stages["eval"]["status"] == "done"
    res = run_pipeline(digits, copy, _opts())
    assert _statuses(res) == [(s, "skipped") for s in ("finetune", "export", "eval", "bench")] + [("package", "done")]
    # results measured before a new export are flagged in the report
    from edgemap.export import ExportOptions, export

    export(copy, ExportOptions(opset=13))
    page = report(copy, ReportOptions(out=tmp_path / "r.html", predict=False))
    assert any("eval result row(s) were measured on a model replaced since and are left out" in w for w in page.warnings)
    assert any("bench result row(s) were measured on a model replaced since and are left out" in w for w in page.warnings)


def test_run_summary_is_readable_at_80_columns_and_its_next_commands_paste(digits: Path, finished: Path) -> None:
    """The summary table lost its right border and cut 'ran on' in pipes; the next step joined commands with '|'."""
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(finished)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    # tables fit; message lines holding paths are not cut by rich (the terminal wraps them, a log keeps them whole)
    said = ("cuda:", "install on", "next:", "also:", "nothing to do", *(f"  {s:9s}" for s in STAGES))
    assert max(len(line) for line in lines if not line.startswith(said)) <= 80
    rows = [line.split() for line in lines if line.strip().startswith(("cpu ", "openvino "))]
    assert rows and all(row[-2:] in (["ORT", "CPU"], ["OV", "CPU"]) for row in rows), rows
    nxt = next(line for line in lines if line.startswith("next:"))
    assert "|" not in nxt and nxt.split()[1:3] == ["edgemap", "report"]


def test_the_report_tells_the_runs_wheel_from_an_earlier_build(digits: Path, finished: Path, tmp_path: Path) -> None:
    from edgemap.report import ReportOptions, report

    copy = _copy(finished, tmp_path)
    opts = build_options(backbone="tiny", img_size=32, epochs=3, flip=False, lr=1e-2, runtime="torch,cpu,openvino",
                         bench_seconds=0.3, max_drop=100.0, report=False, name="renamed-clf")
    res = run_pipeline(digits, copy, opts)
    assert Path(res.wheel).name.startswith("renamed_clf-") and len(list((copy / "dist").glob("*.whl"))) == 2
    page = report(copy, ReportOptions(out=tmp_path / "r.html", predict=False)).html.read_text(encoding="utf-8")
    assert page.count("device package (an earlier build)") == 1


def test_no_int8_keeps_the_whole_run_fp32(digits: Path, tmp_path: Path) -> None:
    """A dataset too small for int8 calibration could not go through `edgemap run` (no way to turn int8 off)."""
    from edgemap.pipeline import summarize

    out = tmp_path / "fp32 only"
    opts = build_options(backbone="tiny", img_size=32, epochs=1, freeze_epochs=0, runtime="torch,cpu",
                         bench_seconds=0.2, report=False, int8=False)
    res = run_pipeline(digits, out, opts)
    run = RunDir.load(out)
    assert not any(k.startswith("onnx_int8") for k in run.artifacts)
    assert {r["precision"] for r in summarize(run)} == {"fp32"}
    assert "fp32" in res.stages[-1].detail  # the wheel ships model.onnx
    assert run_pipeline(digits, out, build_options()).did_nothing  # the run keeps its choice


def test_no_int8_on_a_run_with_int8_models_summarises_fp32(digits: Path, finished: Path, tmp_path: Path) -> None:
    """`run --no-int8` on a run that had int8 models still listed their int8 rows, above the fp32 ones."""
    copy = _copy(finished, tmp_path)
    res = run_pipeline(digits, copy, build_options(report=False, int8=False))
    assert res.summary and {r["precision"] for r in res.summary} == {"fp32"}, res.summary


def test_the_summary_never_shows_rows_of_a_replaced_model(finished: Path, tmp_path: Path) -> None:
    """After a narrower re-run (new int8 models, eval/bench of torch,cpu only) the summary listed the old openvino int8
    row as current, above the torch reference, and a cuda row nobody asked for."""
    from edgemap.evaluate import EvalOptions, evaluate
    from edgemap.export import ExportOptions, export
    from edgemap.pipeline import summarize

    copy = _copy(finished, tmp_path)
    export(copy, ExportOptions(int8=True, calib_size=50, calib_method="percentile", max_drop=100.0))  # new int8 models
    evaluate(copy, EvalOptions(runtimes=("torch", "cpu"), precisions=("fp32", "int8")))
    rows = summarize(RunDir.load(copy))
    assert [(r["runtime"], r["precision"]) for r in rows][0] == ("torch", "fp32")  # the reference first
    assert ("openvino", "int8") not in {(r["runtime"], r["precision"]) for r in rows}  # its model was replaced
    assert ("openvino", "fp32") in {(r["runtime"], r["precision"]) for r in rows}  # model.onnx is unchanged: kept


def test_a_run_whose_older_edgemap_recorded_max_drop_inf_continues(digits: Path, finished: Path, tmp_path: Path) -> None:
    """An older edgemap recorded --max-drop inf as Infinity (and a config's 300.0 for a count); a bare re-run fed them
    back and was refused."""
    copy = _copy(finished, tmp_path)
    text = (copy / "edgemap.json").read_text()
    data = json.loads(text)
    data["options"]["run"]["export"]["max_drop"] = float("inf")
    data["options"]["run"]["export"]["calib_size"] = 300.0  # as a config file passed through the Python API wrote it
    data["options"]["finetune"]["patience"] = 4.0
    (copy / "edgemap.json").write_text(json.dumps(data))  # json writes Infinity, as the older edgemap did
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(copy), "--no-report"])
    assert r.exit_code == 0, r.output


def test_run_names_the_files_its_finetune_skipped(digits: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits, data)
    (data / "train" / "3" / "broken é.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "run"
    args = ["run", str(data), "--out", str(out), "--backbone", "tiny", "--img-size", "32", "--epochs", "1",
            "--freeze-epochs", "0", "--no-int8", "--runtime", "cpu", "--bench-seconds", "0.2", "--no-report"]
    r = CliRunner().invoke(app, [*args, "--skip-bad", "--json", str(tmp_path / "r.json")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    bad = str(data / "train" / "3" / "broken é.png")
    assert f"skipped 1 unreadable file(s): {bad} (all in {out}/edgemap.json" in r.output, r.output
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["skipped"] == [bad] and got["wheel_replaced"] is False
    assert got["pip_install"] == f"pip install {got['wheel']}" and f"install on a device: {got['pip_install']}" in r.output
    again = CliRunner().invoke(app, [*args, "--skip-bad"], env={"COLUMNS": "200"})  # nothing trained now: not said again
    assert again.exit_code == 0 and "unreadable" not in again.output, again.output


def test_run_prints_what_its_report_warned_about(digits: Path, tmp_path: Path) -> None:
    """`edgemap run` kept only the report's path: its warnings (here: class names the plot font cannot draw) were
    printed by `edgemap report` but never by `edgemap run`."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits, data)
    for split in ("train", "val"):
        (data / split / "3").rename(data / split / "猫")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", str(data), "--out", str(out), "--backbone", "tiny", "--img-size", "32",
                                 "--epochs", "1", "--freeze-epochs", "0", "--no-int8", "--runtime", "cpu",
                                 "--bench-seconds", "0.2", "--json", str(tmp_path / "r.json")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "r.json").read_text())
    said = [w for w in got["report_warnings"] if "has no glyph for 1 character(s) of the class names (猫)" in w]
    assert said and f"warning: {said[0]}" in " ".join(r.output.split()), r.output


def test_demo_takes_the_freeze_epochs_its_note_names(tmp_path: Path) -> None:
    """`edgemap demo --epochs 2` is told "give --epochs 3 --freeze-epochs 2", and the demo had no --freeze-epochs."""
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--epochs", "2", "--freeze-epochs", "5"])
    assert r.exit_code == 2 and "--freeze-epochs 5 exceeds --epochs 2" in " ".join(r.output.split()), r.output


def test_run_takes_val_split_patience_and_max_pixels(digits: Path, tmp_path: Path) -> None:
    """A single-folder dataset could not get another validation share through `edgemap run`, nor images above
    Pillow's ~89 M pixels: "No such option"."""
    from edgemap.cli.cmd_run import build_options

    opts = build_options(val_split=0.3, patience=2, max_pixels=200_000_000)
    assert (opts.finetune.val_split, opts.finetune.patience, opts.finetune.max_pixels) == (0.3, 2, 200_000_000)
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(tmp_path / "r"), "--backbone", "tiny",
                                 "--val-split", "1.5"])
    assert r.exit_code == 2 and "--val-split" in r.output and not (tmp_path / "r").exists(), r.output


def test_a_moved_dataset_continues_and_new_test_images_are_scored(digits: Path, finished: Path, tmp_path: Path) -> None:
    """`edgemap run MOVED --out RUN` was refused ("made from the dataset X, not MOVED ... choose another --out") though
    `export --data` accepted the same files; and one image added to test/ blocked eval and run with "dataset changed
    since training ... train a new run", though the model depends on train and val only."""
    import shutil

    import numpy as np
    from PIL import Image

    from edgemap.errors import DatasetError

    copy = _copy(finished, tmp_path)
    moved = tmp_path / "moved digits"
    shutil.copytree(digits, moved, copy_function=shutil.copy)  # the same bytes, new file times (as cp -r, rsync)
    res = run_pipeline(moved, copy, _opts())
    assert res.did_nothing, _statuses(res)
    recorded = RunDir.load(copy).data["dataset"]
    assert recorded["root"] == str(moved)  # recorded: the next commands read it there, by its files' times now
    assert recorded["fingerprint"] != RunDir.load(finished).data["dataset"]["fingerprint"]
    for i, cls in enumerate(("3", "7")):  # new labelled photos in a test split
        (moved / "test" / cls).mkdir(parents=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(moved / "test" / cls / "new.png")
    res = run_pipeline(moved, copy, _opts())
    assert _statuses(res)[:4] == [("finetune", "skipped"), ("export", "skipped"), ("eval", "done"),
                                  ("bench", "skipped")], _statuses(res)  # bench does not read test images
    run = RunDir.load(copy)
    assert "(test, 2 images)" in run.data["metrics"]["eval"]["data"] and run.data["dataset"]["counts"]["test"]
    assert run_pipeline(moved, copy, _opts()).did_nothing  # recorded: not scored again
    (moved / "train" / "3" / sorted(os.listdir(moved / "train" / "3"))[0]).unlink()  # training images changed: refused
    with pytest.raises(DatasetError, match="dataset changed since training"):
        run_pipeline(moved, copy, _opts())
    shutil.rmtree(moved)
    with pytest.raises(DatasetError, match=r"was made from the dataset .*, not .*other .*\); a run directory holds one model"):
        run_pipeline(tmp_path / "other", copy, _opts())


def test_the_training_bar_ends_before_the_next_stage(digits: Path, tmp_path: Path) -> None:
    """The fine-tuning bar stayed live through export, eval and bench: in a log, its last state came after them."""
    r = CliRunner().invoke(app, ["run", str(digits), "--out", str(tmp_path / "run"), "--backbone", "tiny", "--img-size",
                                 "32", "--epochs", "1", "--no-int8", "--runtime", "cpu", "--bench-seconds", "0.1",
                                 "--no-report"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    bar = r.output.rfind("epoch 1/1")
    assert 0 <= bar < r.output.index("── export ──"), r.output


def test_a_wheel_packaged_by_hand_is_the_one_run_keeps_and_rebuilds(digits: Path, finished: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`edgemap package RUN --name cats-classifier`, then `edgemap run DATA --out RUN`: run said "package skipped"
    and printed the install line of its own default-named wheel, and rebuilt that name when eval outdated it."""
    from edgemap.evaluate import EvalOptions, evaluate

    copy = _copy(finished, tmp_path)
    r = CliRunner().invoke(app, ["package", str(copy), "--name", "cats-classifier"])
    assert r.exit_code == 0, r.output
    res = run_pipeline(digits, copy, _opts())
    assert res.did_nothing and Path(res.wheel).name.startswith("cats_classifier-"), (res.wheel, _statuses(res))
    evaluate(copy, EvalOptions(runtimes=("torch", "cpu")))  # new results: the wheel's card is outdated
    res = run_pipeline(digits, copy, _opts())
    assert ("package", "done") in _statuses(res) and Path(res.wheel).name.startswith("cats_classifier-"), res.wheel
    # a bare `edgemap package` keeps the recorded name (it erased it: the next run rebuilt the default name), and a
    # relative --out is recorded as the folder it named, not relative to a later command's working directory
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["package", str(copy), "--out", "rel dist"])
    assert r.exit_code == 0 and "comes from the run folder" not in r.output, r.output
    assert list((tmp_path / "rel dist").glob("cats_classifier-*.whl")), r.output
    recorded = RunDir.load(copy).data["options"]["run"]["package"]
    assert recorded["name"] == "cats-classifier" and recorded["out"] == str(tmp_path / "rel dist"), recorded


def test_a_partial_eval_does_not_record_a_changed_test_split(digits: Path, finished: Path, tmp_path: Path) -> None:
    """After new test images, `eval --precision fp32` dropped the stored int8 row and recorded the new test split:
    the next `edgemap run` said eval was done and shipped a card without int8 accuracy."""
    import shutil

    import numpy as np
    from PIL import Image

    from edgemap.evaluate import EvalOptions, evaluate

    data = tmp_path / "data"
    shutil.copytree(digits, data)
    copy = _copy(finished, tmp_path)
    assert run_pipeline(data, copy, _opts()).did_nothing  # recorded at the new place
    (data / "test" / "3").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "test" / "3" / "new.png")
    before = RunDir.load(copy).data["dataset"]["fingerprint"]
    evaluate(copy, EvalOptions(runtimes=("torch", "cpu"), precisions=("fp32",)))
    assert RunDir.load(copy).data["dataset"]["fingerprint"] == before  # not every stored row was measured again
    res = run_pipeline(data, copy, _opts())
    assert ("eval", "done") in _statuses(res)
    rows = RunDir.load(copy).data["metrics"]["eval"]["rows"]
    assert {(r["runtime"], r["precision"]) for r in rows} >= {("cpu", "int8"), ("cpu", "fp32")}
    assert RunDir.load(copy).data["dataset"]["fingerprint"] != before  # now scored in full: recorded
