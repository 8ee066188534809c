"""`edgemap export --int8`: calibration, formats, the lossless input fold, the accuracy gate."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from _export_fixtures import make_run, write_dataset
from typer.testing import CliRunner

from edgemap.errors import AccuracyGateError, QuantizationError
from edgemap.export import ExportOptions, export
from edgemap.export.calibration import MIN_CALIB_IMAGES, load_images, select_calibration
from edgemap.export.onnx_export import read_metadata
from edgemap.manifest import RunDir
from edgemap.runtime.sessions import load


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[RunDir, dict, Path]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("quant") / "q runs é 日本"
    data = write_dataset(root / "data", n_train=30, n_val=10)
    run, state = make_run(root / "run", data, steps=200)
    return run, state, root


@pytest.fixture(scope="module")
def int8_result(trained):  # noqa: ANN001
    run, _, _ = trained
    return export(run.path, ExportOptions(int8=True, calib_size=60, targets=("cpu", "openvino")))


def test_int8_artifacts_are_recorded_per_format_and_runtime(int8_result, trained) -> None:  # noqa: ANN001
    run = RunDir.load(trained[0].path)
    assert set(int8_result.int8) == {"qoperator", "qdq"}
    qop, qdq = run.artifacts["onnx_int8_qoperator"], run.artifacts["onnx_int8_qdq"]
    assert qop["path"] == "model.int8.qoperator.onnx" and qop["runtimes"] == ["cpu"] and qop["precision"] == "int8"
    assert qdq["path"] == "model.int8.qdq.onnx" and qdq["runtimes"] == ["openvino"] and qdq["format"] == "qdq"
    assert qop["weights"] == "int8 symmetric per-channel" and qop["activations"] == "uint8 asymmetric"
    assert qop["source_sha256"] == run.artifacts["onnx_fp32"]["sha256"] and qop["calib_images"] == 60
    for key in ("onnx_int8_qoperator", "onnx_int8_qdq"):
        run.artifact_path(key)  # sha256 verified
        meta = read_metadata(run.path / run.artifacts[key]["path"])
        assert meta["edgemap.precision"] == "int8" and meta["edgemap.format"] == run.artifacts[key]["format"]
        assert json.loads(meta["edgemap.classes"]) == run.classes
    ops = {n.op_type for n in onnx.load(str(run.path / qop["path"])).graph.node}
    assert "QLinearConv" in ops and not ops & {"QuantizeLinear", "Cast", "Sub", "Mul"}  # uint8 input folded in
    assert any(n.name.startswith("edgemap_stem_pack/") for n in onnx.load(str(run.path / qop["path"])).graph.node)
    nodes = onnx.load(str(run.path / qdq["path"])).graph.node
    ops = {n.op_type for n in nodes}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "QLinearConv" not in ops
    assert not any(n.name.startswith("edgemap_stem_pack/") for n in nodes)  # OpenVINO's artifact keeps its stem


def test_gate_table_is_stored_and_int8_agrees_with_fp32(int8_result, trained) -> None:  # noqa: ANN001
    run = RunDir.load(trained[0].path)
    gate = run.data["metrics"]["int8_gate"]
    assert gate["qoperator"]["passed"] and gate["qdq"]["passed"]
    first = gate["qoperator"]["attempts"][0]
    assert first["method"] == "minmax" and first["runtime"] == "cpu" and first["note"] == "as asked"
    assert gate["qdq"]["attempts"][0]["runtime"] == "openvino"
    for a in int8_result.gate:
        assert a.top1_fp32 > 90 and a.drop_points <= 1.0 and a.agreement >= 95


def test_the_gate_runs_int8_candidates_as_eval_and_the_device_will(trained, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The gate scored OpenVINO's candidate in exact f32 (its metadata still said fp32) while the written int8 model
    runs in OpenVINO's own precision (u8+bf16 here): 1.4 points apart on a Lite0 demo, past --max-drop."""
    import edgemap.runtime.sessions as sessions
    from edgemap.evaluate import open_session

    run, state, root = trained
    r, _ = make_run(tmp_path / "gate", root / "data", state=state)
    seen: list[tuple[str, str, bool | None]] = []
    real_load = sessions.load

    def spy(path, runtime="cpu", opts=None):  # noqa: ANN001, ANN202 - the real loader, recorded
        seen.append((Path(path).name, runtime, opts.exact if opts else None))
        return real_load(path, runtime, opts)

    monkeypatch.setattr(sessions, "load", spy)
    export(r.path, ExportOptions(int8=True, calib_size=30, targets=("openvino",)))
    monkeypatch.undo()
    gated = [exact for name, runtime, exact in seen if runtime == "openvino" and "model.onnx" not in name]
    assert gated and all(exact is False for exact in gated), seen
    deployed = open_session(RunDir.load(r.path), "openvino", "int8", None)  # as eval (and the wheel) load it
    as_gated = real_load(r.path / "model.int8.qdq.onnx", "openvino", sessions.SessionOptions(exact=False))
    assert deployed.precision_in_use == as_gated.precision_in_use


def test_batch_1_and_7_run_on_int8_models(int8_result, trained) -> None:  # noqa: ANN001
    run, _, _ = trained
    from edgemap.data.scan import rescan_for_run

    x = load_images(rescan_for_run(run.data["dataset"]).val[:7], run.contract)
    for fmt, rt in (("qoperator", "cpu"), ("qdq", "openvino"), ("qdq", "cpu")):
        s = load(int8_result.int8[fmt], rt)
        one = np.concatenate([s.run(x[i : i + 1]) for i in range(7)])
        seven = s.run(x)
        assert seven.shape == (7, 3) and np.allclose(one, seven, atol=1e-4)


def test_input_fold_is_lossless(int8_result, trained, tmp_path) -> None:  # noqa: ANN001
    """Pinned (1/std, mean) input quantization returns the uint8 pixels: folded == unfolded, bit for bit."""
    from edgemap.data.scan import rescan_for_run
    from edgemap.export.calibration import calibrate
    from edgemap.export.quantize import FORMATS, fold_input_quantization, graph_info, prepare, quantize_once

    run = RunDir.load(trained[0].path)
    ds = rescan_for_run(run.data["dataset"])
    pre = prepare(run.artifact_path("onnx_fp32"), tmp_path / "pre.onnx")
    info = graph_info(pre)
    assert info.uint8_nchw and info.norm_output and len(info.norm_nodes) == 3  # Cast, Sub, Mul
    cache = calibrate(pre, [s.path for s in ds.train[:20]], run.contract, "minmax", False, tmp_path / "r.json")
    folded = quantize_once(pre, tmp_path / "f.onnx", FORMATS["qoperator"], "minmax", cache, info, run.contract)
    import shutil

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra = {"TensorQuantOverrides": {info.norm_output: [{"scale": np.array(1 / 128, np.float32), "zero_point": np.array(127, np.uint8)}]}}
    quantize_static(str(pre), str(tmp_path / "u.onnx"), None, quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=info.norm_nodes,
                    calibrate_method=CalibrationMethod.MinMax, extra_options=extra, calibration_cache_path=str(cache))
    # folded, and the stem reads the image as 4-pixel groups (edgemap.export.stem_pack): still bit-identical
    assert [n.op_type for n in onnx.load(str(folded)).graph.node][:3] == ["Reshape", "Transpose", "QLinearConv"]
    assert "Sub" in {n.op_type for n in onnx.load(str(tmp_path / "u.onnx")).graph.node}
    x = load_images(ds.val, run.contract)
    a, b = load(folded, "cpu").run(x), load(tmp_path / "u.onnx", "cpu").run(x)
    assert np.array_equal(a, b)
    shutil.copy(tmp_path / "u.onnx", tmp_path / "again.onnx")
    assert fold_input_quantization(tmp_path / "again.onnx", info, run.contract) is True


def test_calibration_is_stratified_training_only(trained) -> None:  # noqa: ANN001
    run, _, _ = trained
    from edgemap.data.scan import rescan_for_run

    ds = rescan_for_run(run.data["dataset"])
    picked = select_calibration(ds.train, 30)
    assert len(picked) == 30 and sorted(np.bincount([s.label for s in picked])) == [10, 10, 10]
    assert {s.path for s in picked} <= {s.path for s in ds.train}
    assert picked == select_calibration(ds.train, 30)  # seeded
    assert len(select_calibration(ds.train, 10_000)) == len(ds.train)


def test_calibration_set_empty_or_too_small_is_a_clear_error(trained) -> None:  # noqa: ANN001
    run, _, _ = trained
    from edgemap.data.scan import rescan_for_run

    ds = rescan_for_run(run.data["dataset"])
    with pytest.raises(QuantizationError, match="calibration set is empty"):
        export(run.path, ExportOptions(int8=True), dataset=SimpleNamespace(train=[], val=ds.val))
    with pytest.raises(QuantizationError, match=f"only 5 image.*at least {MIN_CALIB_IMAGES}"):
        export(run.path, ExportOptions(int8=True), dataset=SimpleNamespace(train=ds.train[:5], val=ds.val))
    with pytest.raises(QuantizationError, match="--calib-size 4 is too small"):
        export(run.path, ExportOptions(int8=True, calib_size=4))


def test_quantizing_silences_the_quantizer_only(capsys) -> None:  # noqa: ANN001
    """export --int8 from a script: the quantizer's root-logger warning installed a root handler (the caller's
    logging.basicConfig then did nothing), and stdout was swapped for every thread (a server's prints vanished)."""
    import logging
    import threading

    from edgemap.export.calibration import quiet

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # a script that has not configured logging (pytest installs its own handlers)
    try:
        with quiet():
            print("from the quantizer")
            t = threading.Thread(target=lambda: print("from another thread"))
            t.start()
            t.join()
            logging.warning("a root warning")  # what onnxruntime.quantization calls; basicConfig when no handler
            logging.getLogger("onnxruntime.quantization.base").warning("noise")
        assert root.handlers == []  # the application can still configure logging
    finally:
        root.handlers[:] = saved
    out = capsys.readouterr().out
    assert "from another thread" in out and "from the quantizer" not in out
    # two threads quantizing at once, leaving in another order than they came: stdout is given back, not left muted
    real = sys.stdout
    inside, leave = threading.Event(), threading.Event()

    def worker() -> None:
        with quiet():
            inside.set()
            leave.wait(10)

    with quiet():
        t = threading.Thread(target=worker)
        t.start()
        assert inside.wait(10)
        assert sys.stdout.encoding == real.encoding and sys.stdout.isatty() == real.isatty()  # the real stream's
    leave.set()
    t.join()
    assert sys.stdout is real
    print("after both")
    assert "after both" in capsys.readouterr().out


def test_gate_failure_exits_nonzero_with_table_and_leaves_artifacts_untouched(trained) -> None:  # noqa: ANN001
    """Flat-grey calibration images + --max-drop 0: every fallback fails; nothing good is overwritten."""
    from edgemap.cli import app

    run, state, root = trained
    data = write_dataset(root / "flat data", n_train=6, n_val=10, flat_train=True)
    bad, _ = make_run(root / "bad run", data, state=state)
    export(bad.path, ExportOptions())  # fp32 first
    onnx_bytes = (bad.path / "model.onnx").read_bytes()
    before = RunDir.load(bad.path).artifacts["onnx_fp32"]
    res = CliRunner().invoke(app, ["export", str(bad.path), "--int8", "--max-drop", "0", "--calib-size", "300",
                                   "--targets", "cpu", "--json", "/dev/full"])
    assert res.exit_code == 3, res.output  # a check failed: not 2, a mistake in the options
    assert "--json /dev/full: cannot write it" in res.output  # a warning: the gate's failure is what is said
    out = " ".join(res.output.split())
    assert "int8 accuracy gate" in out and "int8 accuracy gate failed" in out
    rows = re.findall(r"qoperator +(\d) +(\w+) +(\d+) +cpu .* fail", res.output)
    assert [r[0] for r in rows] == ["1", "2", "3", "4"] and [r[1] for r in rows][:2] == ["minmax", "percentile"]
    assert (bad.path / "model.onnx").read_bytes() == onnx_bytes
    after = RunDir.load(bad.path)
    assert after.artifacts["onnx_fp32"]["sha256"] == before["sha256"]
    assert "onnx_int8_qoperator" not in after.artifacts and not (bad.path / "model.int8.qoperator.onnx").exists()
    gate = after.data["metrics"]["int8_gate"]["qoperator"]
    assert gate["passed"] is False and len(gate["attempts"]) == 4
    assert [a["note"].split(" ")[0] for a in gate["attempts"]][:3] == ["as", "another", "stem"]
    assert gate["attempts"][1]["method"] == "percentile" and len(gate["attempts"][2]["excluded"]) == 2
    assert (bad.path / gate["rejected"]).is_file() and gate["rejected"] == "model.int8.qoperator.rejected.onnx"
    assert not list(bad.path.glob(".export-work-*"))
    # the message names the attempt kept as the .rejected.onnx (ranked by top-1, then agreement; it named the first
    # of equal top-1s), and the terminal still shows export's warnings and parity table before the gate's
    kept = next(a for a in gate["attempts"] if a["attempt"] == gate["rejected_attempt"])
    meta = json.loads(read_metadata(bad.path / gate["rejected"])["edgemap.quantization"])
    assert meta["excluded"] == kept["excluded"] and f"(attempt {kept['attempt']})" in out
    assert max((a["top1_int8"], a["agreement"]) for a in gate["attempts"]) == (kept["top1_int8"], kept["agreement"])
    assert "parity: PyTorch vs runtimes" in out and "warning:" in out and "--calib-size 300 asks for more" in out
    # --json - : the attempts as JSON on stdout (the table went there instead, and no JSON)
    res = CliRunner().invoke(app, ["export", str(bad.path), "--int8", "--max-drop", "0", "--calib-size", "16",
                                   "--targets", "cpu", "--json", "-"])
    assert res.exit_code == 3
    data = json.loads(res.stdout)
    assert data["int8"] == {} and len(data["gate"]) == 4 and "int8 accuracy gate failed" in data["error"]


def test_gate_failure_never_overwrites_a_good_int8_artifact(trained) -> None:  # noqa: ANN001
    run, state, root = trained
    good_data = root / "data"
    r, _ = make_run(root / "keep run", good_data, state=state)
    export(r.path, ExportOptions(int8=True, calib_size=30, targets=("cpu",)))
    good = (r.path / "model.int8.qoperator.onnx").read_bytes()
    sha = RunDir.load(r.path).artifacts["onnx_int8_qoperator"]["sha256"]
    flat = write_dataset(root / "flat data 2", n_train=6, n_val=10, flat_train=True)
    from edgemap.data.scan import scan_dataset

    with pytest.raises(AccuracyGateError) as e:
        export(r.path, ExportOptions(int8=True, calib_size=16, max_drop=0.0, targets=("cpu",)),
               dataset=scan_dataset(flat))
    assert len(e.value.attempts) == 4 and not any(a.passed for a in e.value.attempts)
    assert (r.path / "model.int8.qoperator.onnx").read_bytes() == good
    after = RunDir.load(r.path)
    assert after.artifacts["onnx_int8_qoperator"]["sha256"] == sha
    # the recorded (still deployed) model keeps its passing gate entry; the failed attempt is kept beside it
    assert after.data["metrics"]["int8_gate"]["qoperator"]["passed"] is True
    assert after.data["metrics"]["int8_gate_rejected"]["qoperator"]["passed"] is False
    assert (r.path / "model.int8.qoperator.rejected.onnx").is_file()
    export(r.path, ExportOptions(int8=True, calib_size=30, targets=("cpu",)))  # a new attempt passes
    assert not (r.path / "model.int8.qoperator.rejected.onnx").exists()  # the failed one is not left behind


def test_a_full_disk_is_reported_as_a_full_disk(trained, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """ORT writes truncated models on a full disk without raising; the next step failed with a protobuf error
    (a traceback, or exit 2 'quantization failed'). Now: the space is checked first, and failures say ENOSPC (exit 74)."""
    import errno
    import shutil as shutil_mod
    from collections import namedtuple

    from edgemap.cli import app
    from edgemap.export import quantize as q

    run, state, root = trained
    r, _ = make_run(tmp_path / "full", root / "data", state=state)
    export(r.path, ExportOptions())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda _p: usage(1 << 30, (1 << 30) - 300_000, 300_000))
    res = CliRunner().invoke(app, ["export", str(r.path), "--int8", "--calib-size", "16", "--targets", "cpu"])
    assert res.exit_code == 74 and "int8 quantization needs about" in " ".join(res.output.split()), res.output
    assert not list(r.path.glob(".export-work-*")) and "onnx_int8_qoperator" not in RunDir.load(r.path).artifacts
    truncated = Exception("Error parsing message with type 'onnx.ModelProto'")
    low = q.tool_failed("quantize_static", truncated, tmp_path)
    assert isinstance(low, OSError) and low.errno == errno.ENOSPC and "kB left" in str(low)
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda _p: usage(1 << 30, 0, 1 << 30))
    assert isinstance(q.tool_failed("quantize_static", truncated, tmp_path), QuantizationError)
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert q.tool_failed("quantize_static", quota, tmp_path) is quota


def test_a_calib_size_above_the_training_split_says_all_were_used(trained, tmp_path) -> None:  # noqa: ANN001
    run, state, root = trained
    r, _ = make_run(tmp_path / "few", root / "data", state=state)
    res = export(r.path, ExportOptions(int8=True, calib_size=100_000, targets=("cpu",)))
    assert any(w.startswith("calibrated on all ") and "--calib-size 100000 asks for more" in w for w in res.warnings), res.warnings


def test_entropy_calibration_clips_outliers_that_minmax_keeps(tmp_path) -> None:
    """ORT's entropy defaults (128 bins for 128 quantized levels) leave its threshold search one candidate, the full
    range: `--calib-method entropy` wrote minmax's ranges (97 of 97 tensors on Lite0) into a model labelled entropy."""
    from onnx import TensorProto, helper
    from PIL import Image

    from edgemap.export.calibration import calibrate
    from edgemap.runtime.preprocess import PreprocessContract

    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT), helper.make_node("Relu", ["x"], ["y"])],
        "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 32, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(16):  # dark pixels, and one bright outlier pixel per image
        img = np.clip(np.abs(rng.normal(0, 6, (32, 32, 3))), 0, 255).astype(np.uint8)
        img[i, i] = 255
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    def high(method: str) -> float:
        cache = calibrate(tmp_path / "m.onnx", paths, PreprocessContract(32, 32), method, False, tmp_path / f"{method}.json")
        top = json.loads(cache.read_text())["data"]["y"]["highest"]
        return float(np.ravel(top["data"] if isinstance(top, dict) else top)[0])

    assert high("minmax") == 255.0
    assert high("entropy") < 64.0  # the KL search clips the outliers (ORT's defaults returned 255)


def test_max_drop_must_be_a_number_of_points_json_can_hold(trained) -> None:  # noqa: ANN001
    """--max-drop inf was accepted and written into edgemap.json as Infinity, which strict JSON readers refuse."""
    run, _, _ = trained
    for bad in (float("inf"), float("nan"), -1.0, 101.0):
        with pytest.raises(QuantizationError, match="--max-drop must be 0 to 100 points"):
            export(run.path, ExportOptions(int8=True, max_drop=bad))
    with pytest.raises(QuantizationError, match="--calib-method 'bogus' is not one of"):  # without int8 too
        export(run.path, ExportOptions(calib_method="bogus"))


@pytest.mark.parametrize(("n", "fp32_right", "int8_right", "max_drop", "passed"), [
    (500, 492, 487, 1.0, True),  # 98.4 → 97.4: exactly 1 point (1.0000000000000142 in floats)
    (500, 492, 486, 1.0, False),  # 1.2 points
    (10000, 9000, 8943, 0.57, True),  # 0.57 * 10000 is 5699.999999999999
    (10000, 9000, 8942, 0.57, False),
])
def test_the_gate_passes_a_drop_of_exactly_max_drop(monkeypatch, tmp_path, n, fp32_right, int8_right, max_drop,  # noqa: ANN001
                                                    passed) -> None:
    """The verdict is taken on image counts: "drops more than --max-drop" fails, a drop equal to it passes."""
    import edgemap.export.quantize as q

    labels = np.zeros(n, np.int64)
    fp32 = np.where(np.arange(n) < fp32_right, 0, 1)
    int8 = np.where(np.arange(n) < int8_right, 0, 1)
    # only the quantizer and the scoring session are replaced: the verdict arithmetic is what is tested
    monkeypatch.setattr(q, "graph_info", lambda p: SimpleNamespace(stem="stem", classifier="fc", quantizable=[], weighted=[]))
    monkeypatch.setattr(q, "worst_nodes", lambda *a, **k: [])
    monkeypatch.setattr(q, "quantize_once", lambda *a, **k: None)
    monkeypatch.setattr(q, "calibrate", lambda *a, **k: tmp_path / "ranges.json")
    monkeypatch.setattr(q, "predict", lambda *a, **k: int8)
    gate = q.run_gate("qoperator", ["cpu"], tmp_path / "pre.onnx", tmp_path, [], None, "minmax", np.zeros((n, 1)),
                      labels, fp32, max_drop, {})
    assert gate.attempts[0].passed is passed and gate.passed is passed
    assert gate.attempts[0].drop_points == round(100 * (fp32_right - int8_right) / n, 3)
