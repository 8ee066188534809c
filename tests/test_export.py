"""`edgemap export`: ONNX with the preprocessing inside, metadata, parity, typed errors, CLI."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from _export_fixtures import CLASSES, make_run, write_dataset
from typer.testing import CliRunner

from edgemap.errors import ExportError, ParityError
from edgemap.export import ExportOptions, export
from edgemap.export.calibration import load_images
from edgemap.export.onnx_export import check_model, read_metadata
from edgemap.export.parity import check_parity
from edgemap.manifest import RunDir
from edgemap.runtime import metadata as md
from edgemap.runtime.errors import ModelFormatError
from edgemap.runtime.preprocess import DEFAULT_MAX_PIXELS
from edgemap.runtime.sessions import SessionOptions, load


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[RunDir, dict, Path]:  # noqa: ANN001
    """A trained tiny run (32 px, 3 classes) under a path with a space, é and 日本."""
    root = tmp_path_factory.mktemp("export") / "my runs é 日本"
    data = write_dataset(root / "data", n_train=30, n_val=10)
    run, state = make_run(root / "run", data, steps=200)
    return run, state, root


@pytest.fixture(scope="module")
def exported(trained):  # noqa: ANN001
    run, _, _ = trained
    return export(run.path, ExportOptions())


def test_model_onnx_is_recorded_with_spec_and_contract_inside(exported, trained) -> None:  # noqa: ANN001
    run, _, _ = trained
    run = RunDir.load(run.path)
    entry = run.artifacts["onnx_fp32"]
    assert entry["opset"] == 17 and entry["stage"] == "export" and entry["path"] == "model.onnx"
    assert entry["input"] == {"name": "images", "layout": "NHWC", "dtype": "uint8", "shape": [-1, 32, 32, 3]}
    assert entry["output"]["shape"] == [-1, 3]
    assert run.artifact_path("onnx_fp32") == exported.onnx_path  # sha256 verified
    model = onnx.load(str(exported.onnx_path))
    inp = model.graph.input[0].type.tensor_type
    assert model.graph.input[0].name == "images" and inp.elem_type == onnx.TensorProto.UINT8
    assert inp.shape.dim[0].dim_param and [d.dim_value for d in inp.shape.dim[1:]] == [32, 32, 3]
    assert {n.op_type for n in model.graph.node} >= {"Transpose", "Cast", "Sub", "Mul"}  # normalisation inside
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}


def test_metadata_round_trip(exported, trained) -> None:  # noqa: ANN001
    run, _, _ = trained
    meta = read_metadata(exported.onnx_path)
    keys = [v for k, v in vars(md).items() if k.isupper() and isinstance(v, str) and v.startswith("edgemap.")]
    assert set(keys) <= set(meta)
    assert json.loads(meta[md.CLASSES]) == CLASSES == run.classes
    assert json.loads(meta[md.PREPROCESS]) == run.contract.to_dict()
    assert meta[md.BACKBONE] == "tiny" and meta[md.PRECISION] == "fp32" and meta[md.FORMAT] == "fp32"
    assert meta[md.RUN] == "run" and meta[md.SCHEMA] == md.METADATA_SCHEMA_VERSION
    assert json.loads(meta[md.INPUT])["shape"] == [-1, 32, 32, 3]
    assert "torch" in json.loads(meta[md.VERSIONS])
    assert json.loads(meta[md.MAX_PIXELS]) == run.max_pixels


def test_reexport_is_byte_identical_and_not_rewritten(exported, trained) -> None:  # noqa: ANN001
    run, _, _ = trained
    before = exported.onnx_path.read_bytes()
    again = export(run.path, ExportOptions())
    assert again.rewritten is False and exported.onnx_path.read_bytes() == before


def test_parity_rows_cover_ort_and_openvino_at_batch_1_and_7(exported, trained) -> None:  # noqa: ANN001
    run, _, _ = trained
    got = {(r.runtime, r.batch): r for r in exported.parity}
    assert set(got) == {("cpu", 1), ("cpu", 7), ("openvino", 1), ("openvino", 7)}
    for r in got.values():
        assert r.status == "ok" and r.images == 7 and r.max_abs_diff < 1e-4 and r.top1_agreement == 1.0
    assert "(f32)" in got[("openvino", 7)].provider  # exact mode, not bf16
    stored = RunDir.load(run.path).data["metrics"]["parity"]
    assert stored["passed"] is True and len(stored["rows"]) == 4


def test_dynamic_batch_runs_other_sizes(exported, trained) -> None:  # noqa: ANN001
    run, _, _ = trained
    from edgemap.data.scan import rescan_for_run

    x = load_images(rescan_for_run(run.data["dataset"]).val[:5], run.contract)
    for rt in ("cpu", "openvino"):
        s = load(exported.onnx_path, rt, SessionOptions(exact=True))
        assert s.run(x[:3]).shape == (3, 3) and s.run(x).shape == (5, 3)


def test_parity_failure_lists_every_runtime_and_batch(exported, trained) -> None:  # noqa: ANN001
    import torch

    from edgemap.model import load_classifier

    run, _, _ = trained
    net = load_classifier(run)
    with torch.no_grad():
        net.head.bias += torch.tensor([0.0, 3.0, -3.0])  # the "PyTorch" side no longer matches the file
    from edgemap.data.scan import rescan_for_run

    images = load_images(rescan_for_run(run.data["dataset"]).val[:7], run.contract)
    with pytest.raises(ParityError) as e:
        check_parity(net, exported.onnx_path, images)
    msg = str(e.value)
    for part in ("cpu batch 1", "cpu batch 7", "openvino batch 1", "openvino batch 7", "max|Δlogit|"):
        assert part in msg
    assert all(r.status == "FAIL" for r in e.value.rows)


def test_nan_logits_are_named_as_such_in_the_parity_error(exported, trained) -> None:  # noqa: ANN001
    """NaN logits printed "top-1 differs on 0 image(s) that are not near-ties": a failure that said nothing."""
    import torch

    from edgemap.data.scan import rescan_for_run
    from edgemap.model import load_classifier

    run, _, _ = trained
    net = load_classifier(run)
    with torch.no_grad():
        net.head.bias[0] = float("nan")
    images = load_images(rescan_for_run(run.data["dataset"]).val[:7], run.contract)
    with pytest.raises(ParityError, match=r"PyTorch gave non-finite logits \(NaN/inf\)") as e:
        check_parity(net, exported.onnx_path, images)
    assert "near-ties" not in str(e.value) and all(r.status == "FAIL" for r in e.value.rows)


def test_a_manifest_edited_against_its_weights_is_one_error(trained, tmp_path) -> None:  # noqa: ANN001
    """Fewer classes, another backbone or a text dropout in edgemap.json gave torch's traceback (exit 1); classes in
    another order passed the int8 gate (it scores by index) and the models named the wrong classes."""
    from edgemap.cli import app

    run, _, _ = trained
    edits = {"classes": lambda d: d.update(classes=d["classes"][:2]),
             "reordered": lambda d: d.update(classes=d["classes"][::-1]),
             "backbone": lambda d: d["backbone"].update(name="efficientnet_lite0"),
             "dropout": lambda d: d["options"].setdefault("finetune", {}).update(dropout="abc")}
    for name, edit in edits.items():
        copy = Path(shutil.copytree(run.path, tmp_path / name))
        before = sorted(p.name for p in copy.iterdir() if p.name not in ("edgemap.json", ".edgemap.lock"))
        d = json.loads((copy / "edgemap.json").read_text())
        edit(d)
        (copy / "edgemap.json").write_text(json.dumps(d))
        res = CliRunner().invoke(app, ["export", str(copy)])
        said = " ".join(res.output.split())
        assert res.exit_code == 2 and "Traceback" not in said, (name, res.output)
        expected = {"dropout": "dropout' 'abc' must be a number in [0, 1]",
                    "classes": "'classes' is not the class list the weights were trained with",
                    "reordered": "'classes' is not the class list the weights were trained with"}
        assert expected.get(name, "weights do not fit the run's") in said, said
        assert sorted(p.name for p in copy.iterdir() if p.name not in ("edgemap.json", ".edgemap.lock")) == before


def test_a_moved_or_copied_dataset_is_given_with_data(trained, tmp_path) -> None:  # noqa: ANN001
    """A run copied to another machine could not be exported (the dataset "is gone", no way to say where it is)."""
    from edgemap.cli import app

    run, _, root = trained
    copy = Path(shutil.copytree(run.path, tmp_path / "run"))
    data = Path(shutil.copytree(root / "data", tmp_path / "data elsewhere"))  # new mtimes: the content must match
    d = json.loads((copy / "edgemap.json").read_text())
    d["dataset"]["root"] = str(tmp_path / "gone")
    (copy / "edgemap.json").write_text(json.dumps(d))
    res = CliRunner().invoke(app, ["export", str(copy)])
    assert res.exit_code == 2 and "--data DIR" in " ".join(res.output.split()), res.output
    res = CliRunner().invoke(app, ["export", str(copy), "--data", str(data)])
    assert res.exit_code == 0, res.output
    assert RunDir.load(copy).data["dataset"]["root"] == str(data.resolve())  # eval and report find it there too
    other = write_dataset(tmp_path / "other data", n_train=4, n_val=3)
    res = CliRunner().invoke(app, ["export", str(copy), "--data", str(other)])
    assert res.exit_code == 2 and "dataset changed since training" in " ".join(res.output.split()), res.output
    # trained with --skip-bad: the skipped file is recorded under the old place; it is still skipped at the new one
    from edgemap.data.scan import ScanOptions, scan_dataset

    (data / "train" / CLASSES[0] / "junk.png").write_bytes(b"not a png")
    run2 = RunDir.load(copy)
    run2.data["dataset"] = scan_dataset(data, ScanOptions(skip_bad=True)).to_manifest()
    run2.save()
    assert run2.data["dataset"]["skipped"]
    moved = Path(shutil.copytree(data, tmp_path / "data moved again"))
    (tmp_path / "via link").symlink_to(moved, target_is_directory=True)  # given through a symlink (macOS /tmp too)
    res = CliRunner().invoke(app, ["export", str(copy), "--data", str(tmp_path / "via link")])
    assert res.exit_code == 0, res.output
    assert RunDir.load(copy).data["dataset"]["skipped"][0][0] == str(tmp_path / "via link" / "train" / CLASSES[0] / "junk.png")
    # a recorded root that is a symlink loop: one line or a working export, never a traceback
    (tmp_path / "loop a").symlink_to(tmp_path / "loop b")
    (tmp_path / "loop b").symlink_to(tmp_path / "loop a")
    run3 = RunDir.load(copy)
    run3.data["dataset"]["root"] = str(tmp_path / "loop a")
    run3.data["dataset"]["skipped"] = [[str(tmp_path / "loop a" / "train" / CLASSES[0] / "junk.png"), "unreadable"]]
    run3.save()
    res = CliRunner().invoke(app, ["export", str(copy), "--data", str(moved)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output


def test_an_interrupt_between_two_int8_formats_says_which_was_made(trained, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Ctrl-C after the QOperator model was written and during the QDQ gate said both old models were retired and no
    new one was made: the QOperator model was new and recorded."""
    import edgemap.export.quantize as q
    from edgemap.errors import Interrupted

    run, state, root = trained
    r, _ = make_run(tmp_path / "two", root / "data", state=state)
    export(r.path, ExportOptions(int8=True, calib_size=16, targets=("cpu", "openvino")))
    real = q.run_gate

    def stop_at_qdq(fmt, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if fmt == "qdq":
            raise KeyboardInterrupt("SIGINT")
        return real(fmt, *a, **k)

    monkeypatch.setattr(q, "run_gate", stop_at_qdq)
    with pytest.raises(Interrupted) as e:
        export(r.path, ExportOptions(opset=13, int8=True, calib_size=16, targets=("cpu", "openvino")))
    msg = str(e.value)
    assert "model.int8.qoperator.onnx made, the others not" in msg, msg
    assert "retired (model.int8.qdq.onnx → *.stale.onnx)" in msg, msg
    after = RunDir.load(r.path)
    assert "onnx_int8_qoperator" in after.artifacts and "onnx_int8_qdq" not in after.artifacts


def test_export_never_renames_a_file_through_a_symlinked_folder(trained, tmp_path) -> None:  # noqa: ANN001
    """An int8 artifact 'link/secret.onnx', with link -> a folder outside: re-exporting renamed the outside file to
    secret.stale.onnx (the manifest's path check reads the text only)."""
    from edgemap.errors import ManifestError

    run, state, root = trained
    r, _ = make_run(tmp_path / "linked", root / "data", state=state)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.onnx").write_text("precious")
    (r.path / "link").symlink_to(outside, target_is_directory=True)
    r.data["artifacts"]["onnx_int8_evil"] = {"path": "link/secret.onnx", "sha256": "0" * 64, "stage": "export",
                                             "source_sha256": "x"}
    r.save()
    with pytest.raises(ManifestError, match="escapes the run directory"):
        export(r.path, ExportOptions())
    assert (outside / "secret.onnx").read_text() == "precious" and not (outside / "secret.stale.onnx").exists()


def test_a_folder_where_a_kept_model_goes_is_left_alone(trained, tmp_path) -> None:  # noqa: ANN001
    """A folder named model.rejected.onnx made export fail after it had written model.onnx ("Is a directory")."""
    run, state, root = trained
    r, _ = make_run(tmp_path / "folder", root / "data", state=state)
    (r.path / "model.rejected.onnx").mkdir()
    export(r.path, ExportOptions())
    assert (r.path / "model.rejected.onnx").is_dir() and RunDir.load(r.path).data["metrics"]["parity"]["passed"]


def test_run_without_weights_is_refused(trained, tmp_path) -> None:  # noqa: ANN001
    run, _, _ = trained
    bare = RunDir.create(tmp_path / "bare", backbone={"name": "tiny"}, classes=CLASSES, contract=run.contract,
                         dataset=run.data["dataset"])
    with pytest.raises(ExportError, match="no trained weights.*edgemap finetune"):
        export(bare.path, ExportOptions())
    assert not (bare.path / "model.onnx").exists()


def test_op_unsupported_at_opset_is_a_clear_error_and_writes_nothing(trained, tmp_path, capfd) -> None:  # noqa: ANN001
    run, state, root = trained
    other, _ = make_run(tmp_path / "run6", root / "data", state=state)
    with pytest.raises(ExportError, match=r"^model.onnx: op Sub at opset 6 is not supported by onnxruntime.*--opset"):
        export(other.path, ExportOptions(opset=6))
    assert not (other.path / "model.onnx").exists() and "onnx_fp32" not in RunDir.load(other.path).artifacts
    assert not list(other.path.glob(".*edgemap-tmp"))
    capfd.readouterr()
    with pytest.raises(ExportError, match=r"--opset 99 is newer than torch .* exports \(at most \d+\)"):
        export(other.path, ExportOptions(opset=99))
    assert capfd.readouterr().out == ""  # torch would print its whole graph to stdout here
    with pytest.raises(ExportError, match=r"could not export .* --opset 3: Unsupported onnx_opset_version"):
        export(other.path, ExportOptions(opset=3))
    assert capfd.readouterr().out == ""  # the same from its C++ side ("Torch IR graph at exception: ...")


def test_ir_version_newer_than_installed_is_a_clear_error(exported, tmp_path) -> None:  # noqa: ANN001
    model = onnx.load(str(exported.onnx_path))
    model.ir_version = 99
    bad = tmp_path / "ir99.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ExportError, match="IR version 99 is newer than the installed"):
        check_model(bad)
    check_model(exported.onnx_path)  # the real one passes


def test_empty_validation_split_is_refused(trained) -> None:  # noqa: ANN001
    run, _, _ = trained
    from edgemap.data.scan import rescan_for_run

    ds = rescan_for_run(run.data["dataset"])
    with pytest.raises(ExportError, match="validation split is empty") as e:
        export(run.path, ExportOptions(), dataset=SimpleNamespace(train=ds.train, val=[]))
    assert e.value.exit_code == 2 and not isinstance(e.value, ParityError)  # an input problem, not a failed check


def test_cli_export_prints_parity_and_next_step(trained, tmp_path) -> None:  # noqa: ANN001
    from edgemap.cli import app

    run, state, root = trained
    other, _ = make_run(tmp_path / "cli run", root / "data", state=state)
    out = tmp_path / "res.json"
    res = CliRunner().invoke(app, ["export", str(other.path), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "parity" in res.output and "openvino" in res.output
    assert f"next: edgemap eval {shlex.quote(str(other.path))}" in " ".join(res.output.split())
    data = json.loads(out.read_text(encoding="utf-8"))
    assert len(data["parity"]) == 4 and data["int8"] == {}
    res = CliRunner().invoke(app, ["export", str(tmp_path / "missing")])
    assert res.exit_code != 0 and "no such run directory" in res.output


@pytest.mark.slow
def test_parity_on_efficientnet_lite0_at_64px(trained, tmp_path) -> None:  # noqa: ANN001
    """Real ImageNet weights (random 3-class head): ORT and OpenVINO at batch 1 and 7."""
    import torch
    from safetensors.torch import save_file

    from edgemap.backbones import get_spec
    from edgemap.model import build_classifier
    from edgemap.runtime.preprocess import PreprocessContract

    run, _, root = trained
    spec = get_spec("efficientnet_lite0")
    contract = PreprocessContract(64, 64, interpolation=spec.interpolation, mean=spec.mean, std=spec.std)
    lite = RunDir.create(tmp_path / "lite0 é", backbone={"name": "efficientnet_lite0"}, classes=CLASSES, contract=contract,
                         options={"finetune": {"dropout": 0.2}}, dataset=run.data["dataset"])
    net = build_classifier("efficientnet_lite0", 3, contract, pretrained=True)
    with torch.no_grad():
        net.head.weight.mul_(20)  # spread the logits so top-1 is not a near-tie everywhere
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(lite.path / "w.safetensors"))
    lite.add_artifact("weights_best", lite.path / "w.safetensors", stage="finetune")
    res = export(lite.path, ExportOptions())
    got = {(r.runtime, r.batch): r for r in res.parity}
    assert set(got) == {("cpu", 1), ("cpu", 7), ("openvino", 1), ("openvino", 7)}
    assert all(r.status == "ok" for r in got.values()), res.parity
    assert max(r.max_abs_diff for r in got.values()) < 1e-3
    shutil.rmtree(lite.path)


def test_options_are_validated_before_any_work(trained) -> None:  # noqa: ANN001
    from edgemap.errors import QuantizationError

    run, _, _ = trained
    for opts, pat in [  # names are refused when the options are made; values that need the run, by export
        (lambda: ExportOptions(int8=True, targets=("cuda",)), "cuda has no int8 path"),
        (lambda: ExportOptions(int8=True, targets=("nope",)), "unknown runtime"),
        (lambda: ExportOptions(int8=True, calib_method="mse"), "--calib-method 'mse'"),
        (lambda: ExportOptions(int8=True, max_drop=-1), "--max-drop"),
        (lambda: ExportOptions(int8=True, opset=11), "--int8 needs --opset 13"),
    ]:
        with pytest.raises(QuantizationError, match=pat):
            export(run.path, opts())
    with pytest.raises(ExportError, match="parity_batch"):
        export(run.path, ExportOptions(parity_batch=8))
    assert np.isfinite(ExportOptions().max_drop)
    # the "always on" parity check could be switched off from Python: an unknown name was skipped, () compared
    # nothing, and both were recorded as passed (package then shipped the model)
    for parity, pat in ((("onnxruntime",), "unknown runtime 'onnxruntime'"), ((), "must name runtimes")):
        with pytest.raises(ExportError, match=pat):
            export(run.path, ExportOptions(parity_runtimes=parity))
    from edgemap.model import load_classifier

    x = np.zeros((1, run.contract.height, run.contract.width, 3), np.uint8)
    with pytest.raises(ParityError, match="no runtime could run the parity check"):  # cuda: unavailable here
        check_parity(load_classifier(run), run.path / "model.onnx", x, ("cuda",))


def test_new_model_failing_parity_never_replaces_the_recorded_one(trained, tmp_path) -> None:  # noqa: ANN001
    """A re-export at another opset that fails parity (tolerance 0) keeps model.onnx; package then refuses nothing good."""
    run, state, root = trained
    r, _ = make_run(tmp_path / "par", root / "data", state=state)
    export(r.path, ExportOptions())
    good = (r.path / "model.onnx").read_bytes()
    with pytest.raises(ParityError, match=r"^model.onnx: outputs differ.*the previous model.onnx is kept.*model.rejected.onnx"):
        export(r.path, ExportOptions(opset=13, parity_atol=0.0, parity_rtol=0.0))
    after = RunDir.load(r.path)
    assert (r.path / "model.onnx").read_bytes() == good and after.artifact_path("onnx_fp32")
    assert (r.path / "model.rejected.onnx").is_file() and not list(r.path.glob(".*edgemap-tmp"))
    assert after.data["metrics"]["parity"]["passed"] is True  # describes the recorded model
    assert after.data["metrics"]["parity_rejected"]["passed"] is False
    assert after.data["stages"]["export"]["status"] == "failed"
    # the same bytes failing parity now (tolerance 0): recorded as failed, and package refuses to ship it
    with pytest.raises(ParityError):
        export(r.path, ExportOptions(parity_atol=0.0, parity_rtol=0.0))
    from edgemap.errors import PackageError
    from edgemap.package import PackageOptions, package

    with pytest.raises(PackageError, match="failed the parity check"):
        package(r.path, PackageOptions(out=tmp_path / "dist"))
    export(r.path, ExportOptions())  # passes again: recorded, parity_rejected cleared only by a new model
    assert RunDir.load(r.path).data["metrics"]["parity"]["passed"] is True
    assert (r.path / "model.rejected.onnx").is_file()  # the recorded model passed again; the failed one stays
    assert export(r.path, ExportOptions(opset=13)).rewritten  # a new model.onnx passes: the failed one is superseded
    assert not (r.path / "model.rejected.onnx").exists()


def test_cli_export_json_when_parity_fails(trained, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """`export --json` still writes its JSON (every row, the error) when parity fails; the exit code says so."""
    import functools

    import edgemap.export as exp
    from edgemap.cli import app

    run, state, root = trained
    r, _ = make_run(tmp_path / "par json", root / "data", state=state)
    # the real runtimes at zero tolerance: no fp32 engine matches PyTorch bit for bit on every logit
    monkeypatch.setattr(exp, "ExportOptions", functools.partial(ExportOptions, parity_atol=0.0, parity_rtol=0.0))
    out = tmp_path / "parity.json"
    res = CliRunner().invoke(app, ["export", str(r.path), "--json", str(out)])
    assert res.exit_code == ParityError.exit_code != 0, res.output
    data = json.loads(out.read_text(encoding="utf-8"))
    assert "outputs differ" in data["error"]
    assert {(row["runtime"], row["batch"]) for row in data["parity"]} == {("cpu", 1), ("cpu", 7), ("openvino", 1), ("openvino", 7)}
    assert any(row["status"] != "ok" for row in data["parity"])
    assert "parity" in res.output  # the table is printed too when the JSON goes to a file
    res = CliRunner().invoke(app, ["export", str(r.path), "--json", "-"])
    assert res.exit_code == ParityError.exit_code
    assert "outputs differ" in json.loads(res.stdout)["error"]  # stdout is the JSON alone


def test_reexport_retires_int8_models_of_the_old_fp32(trained, tmp_path) -> None:  # noqa: ANN001
    run, state, root = trained
    r, _ = make_run(tmp_path / "stale", root / "data", state=state)
    export(r.path, ExportOptions(int8=True, calib_size=16, targets=("cpu",)))
    assert "onnx_int8_qoperator" in RunDir.load(r.path).artifacts
    res = export(r.path, ExportOptions(opset=13))  # new fp32 bytes
    assert res.rewritten and any("quantized from the previous model.onnx" in w and "--int8" in w for w in res.warnings)
    after = RunDir.load(r.path)
    assert "onnx_int8_qoperator" not in after.artifacts and not after.data["metrics"].get("int8_gate")
    assert (r.path / "model.int8.qoperator.stale.onnx").is_file() and not (r.path / "model.int8.qoperator.onnx").exists()
    # a new model and new int8 models in one call: nothing to warn about
    export(r.path, ExportOptions(opset=13, int8=True, calib_size=16, targets=("cpu",)))
    assert not (r.path / "model.int8.qoperator.stale.onnx").exists()  # replaced by the new int8 model: deleted
    res = export(r.path, ExportOptions(opset=14, int8=True, calib_size=16, targets=("cpu",)))
    assert res.rewritten and res.retired == {"qoperator": "model.int8.qoperator.onnx"} and not res.warnings
    # a manifest from before this check (stale int8 still recorded) is refused by package
    after = RunDir.load(r.path)
    after.artifacts["onnx_int8_qoperator"]["source_sha256"] = "0" * 64
    after.save()
    from edgemap.cli import app
    from edgemap.errors import ManifestError
    from edgemap.evaluate import EvalOptions, evaluate
    from edgemap.package import PackageOptions, package

    with pytest.raises(ManifestError, match="quantized from an earlier model.onnx.*edgemap export .* --int8"):
        package(r.path, PackageOptions(out=tmp_path / "dist"))
    # fine-tuned again after the export (`finetune --resume`): eval, bench and package used the old models silently
    after.artifacts["onnx_int8_qoperator"]["source_sha256"] = after.artifacts["onnx_fp32"]["sha256"]
    after.artifacts["onnx_fp32"]["weights_sha256"] = "1" * 64
    after.save()
    for call in (lambda: package(r.path, PackageOptions(out=tmp_path / "dist")),
                 lambda: evaluate(r.path, EvalOptions(runtimes=("cpu",), precisions=("fp32",), save=False, strict=True))):
        with pytest.raises(ManifestError, match="exported from earlier weights .*Export again: edgemap export"):
            call()
    res = CliRunner().invoke(app, ["bench", str(r.path), "--runtime", "cpu", "--precision", "fp32", "--iters", "2"])
    assert res.exit_code == 2 and "exported from earlier weights" in res.output, res.output


def test_a_copied_run_reexports_unchanged_and_keeps_its_int8(trained, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The run folder's name is in the metadata: `cp -r` + export rewrote model.onnx and retired valid int8 models."""
    import edgemap.export as export_mod
    from edgemap.errors import Interrupted
    from edgemap.export import same_model

    run, state, root = trained
    r, _ = make_run(tmp_path / "orig", root / "data", state=state)
    export(r.path, ExportOptions(int8=True, calib_size=16, targets=("cpu",)))
    copy = tmp_path / "a copy"
    shutil.copytree(r.path, copy)
    res = export(copy, ExportOptions())
    assert not res.rewritten and not res.retired and not res.warnings
    assert (copy / "model.int8.qoperator.onnx").is_file() and "onnx_int8_qoperator" in RunDir.load(copy).artifacts
    # what the model means still counts: other class names are another model
    m = onnx.load(copy / "model.onnx")
    for p in m.metadata_props:
        if p.key == md.CLASSES:
            p.value = json.dumps(list(reversed(json.loads(p.value))))
    assert not same_model((copy / "model.onnx").read_bytes(), m.SerializeToString())
    # stopped during int8 after a new model.onnx was written: not "done", and said so (was "earlier artifacts untouched")
    monkeypatch.setattr(export_mod, "_int8", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    with pytest.raises(Interrupted, match="model.onnx is new and recorded.*retired.*--int8` again") as err:
        export(copy, ExportOptions(opset=13, int8=True, calib_size=16, targets=("cpu",)))
    assert err.value.exit_code == 143
    after = RunDir.load(copy)
    assert after.data["stages"]["export"]["status"] == "interrupted" and not any(k.startswith("onnx_int8") for k in after.artifacts)


def test_unfinished_finetune_is_exported_with_a_warning(trained, tmp_path) -> None:  # noqa: ANN001
    run, state, root = trained
    r, _ = make_run(tmp_path / "cut", root / "data", state=state)
    r.set_stage("finetune", "interrupted")
    res = export(r.path, ExportOptions())
    assert any("fine-tuning did not finish" in w and "--resume" in w for w in res.warnings)


def test_a_second_writer_on_the_run_directory_is_refused(exported, trained) -> None:  # noqa: ANN001
    """Another process holding the run (e.g. an export) → RunBusyError naming it; nothing of its work is touched."""
    import subprocess
    import sys

    from edgemap.errors import RunBusyError

    run, _, _ = trained
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom edgemap.manifest import run_lock\n"
         "with run_lock(sys.argv[1], 'export'):\n    print('held', flush=True); time.sleep(60)", str(run.path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        marker = run.path / ".export-work-other"  # the holder's work folder: must survive
        marker.mkdir()
        with pytest.raises(RunBusyError, match=rf"in use by pid {holder.pid} \(edgemap export\)"):
            export(run.path, ExportOptions())
        assert marker.is_dir()
        from edgemap.evaluate import EvalOptions, evaluate

        with pytest.raises(RunBusyError):
            evaluate(run.path, EvalOptions(runtimes=("cpu",)))
        evaluate(run.path, EvalOptions(runtimes=("cpu",), save=False))  # reading is fine
        from edgemap.evaluate import evaluate_arrays

        x = np.zeros((2, run.contract.height, run.contract.width, 3), np.uint8)
        with pytest.raises(RunBusyError):  # it saved into edgemap.json without the lock
            evaluate_arrays(RunDir.load(run.path), x, np.array([0, 1]), EvalOptions(runtimes=("cpu",)))
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(run.path / ".export-work-other", ignore_errors=True)
    export(run.path, ExportOptions())  # the OS released the lock with the process


def test_another_thread_is_a_second_writer_too(trained) -> None:  # noqa: ANN001
    """The lock counted re-entry per process: a second thread walked in (bench and eval in two threads lost the
    results of one, or failed with a KeyError in the lock's own bookkeeping)."""
    import threading

    from edgemap.errors import RunBusyError
    from edgemap.manifest import run_lock

    run, _, _ = trained
    held, release, seen = threading.Event(), threading.Event(), []

    def holder() -> None:
        with run_lock(run.path, "bench"), run_lock(run.path, "bench"):  # re-entrant in its own thread
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(30)
        try:
            with run_lock(run.path, "eval"):
                seen.append("entered")
        except RunBusyError as e:
            seen.append(str(e))
    finally:
        release.set()
        t.join()
    assert len(seen) == 1 and "another thread of this process" in seen[0], seen
    with run_lock(run.path, "eval"):  # released by the other thread: free again
        pass


def test_cli_refuses_int8_options_without_int8(trained) -> None:  # noqa: ANN001
    from edgemap.cli import app

    run, _, _ = trained
    res = CliRunner().invoke(app, ["export", str(run.path), "--calib-size", "5", "--targets", "foo"])
    assert res.exit_code == 2
    assert "--calib-size, --targets only apply with --int8" in " ".join(res.output.split())


def test_export_decodes_with_the_runs_image_size_limit(trained, tmp_path) -> None:  # noqa: ANN001
    """Images are decoded with the --max-pixels the run was trained with (here lowered below 32x32)."""
    from edgemap.errors import ImageError

    run, state, root = trained
    r, _ = make_run(tmp_path / "limit", root / "data", state=state)
    r.data["dataset"]["options"]["max_pixels"] = 500
    r.save()
    with pytest.raises(ImageError, match="32x32 = 1,024 pixels exceeds the limit of 500"):
        export(r.path, ExportOptions())


def test_a_model_loaded_from_its_file_decodes_with_the_runs_image_size_limit(trained, tmp_path) -> None:  # noqa: ANN001
    """`Classifier.from_path` (a device without the wheel's model.json) uses the run's --max-pixels from the metadata."""
    from PIL import Image

    from edgemap.errors import ImageError
    from edgemap.runtime.classifier import Classifier
    from edgemap.runtime.onnx_meta import OnnxInfo, model_meta

    run, state, root = trained
    r, _ = make_run(tmp_path / "limit", root / "data", state=state)
    r.data["dataset"]["options"]["max_pixels"] = 2_000  # the 32x32 training images pass, a 50x50 image does not
    r.save()
    model = export(r.path, ExportOptions()).onnx_path
    big = tmp_path / "big.png"
    Image.new("RGB", (50, 50), "gray").save(big)
    clf = Classifier.from_path(model)
    assert clf.max_pixels == 2_000
    with pytest.raises(ImageError, match="exceeds the limit of 2,000"):
        clf.predict(big)
    assert Classifier.from_path(model, max_pixels=None).predict_one(big).label in CLASSES  # asked otherwise: Pillow's limit
    props = dict(read_metadata(model))
    for bad in ("0", "-5", "1.5", '"2000"', "true"):
        with pytest.raises(ModelFormatError, match="max_pixels"):
            model_meta(OnnxInfo(metadata={**props, md.MAX_PIXELS: bad}), "m.onnx")
    assert model_meta(OnnxInfo(metadata={**props, md.MAX_PIXELS: "null"}), "m.onnx").max_pixels is None
    del props[md.MAX_PIXELS]  # a model exported before the key existed: the default limit
    assert model_meta(OnnxInfo(metadata=props), "m.onnx").max_pixels == DEFAULT_MAX_PIXELS


def test_no_lock_file_outside_a_run_directory(trained, tmp_path) -> None:  # noqa: ANN001
    from edgemap.errors import ManifestError

    run, _, root = trained
    data = root / "data"
    before = sorted(p.name for p in data.rglob("*"))
    with pytest.raises(ManifestError):
        export(data, ExportOptions())
    assert sorted(p.name for p in data.rglob("*")) == before


def test_int8_targets_name_each_runtime_once() -> None:
    from edgemap.errors import QuantizationError
    from edgemap.export import _int8_plan

    assert _int8_plan(("cpu", "cpu", "openvino", "OpenVINO")) == {"qoperator": ["cpu"], "qdq": ["openvino"]}
    # a device was dropped without a word (openvino:FOO passed, gated on the CPU); eval then refused the same name
    for device in ("openvino:GPU", "openvino:FOO"):
        with pytest.raises(QuantizationError, match=f"--targets {device}: name runtimes .* not devices"):
            _int8_plan(("cpu", device))


def test_exports_from_threads_keep_stdout_and_agree() -> None:
    """torch_to_onnx_bytes silences fd 1 while torch exports (it prints graphs there): from two threads at once, one
    thread saved the other's /dev/null as "stdout" and restored it, so the process lost its stdout for good; and
    torch.onnx keeps export state in globals. Exports now take turns."""
    import os
    import threading

    import torch

    from edgemap.export.onnx_export import torch_to_onnx_bytes

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.permute(0, 3, 1, 2).float()).mean((2, 3))

    torch.manual_seed(0)
    net = Net()
    before = os.fstat(1)
    results: list[bytes | BaseException] = []

    def work() -> None:
        for _ in range(3):
            try:
                results.append(torch_to_onnx_bytes(net, 16, 16, 17))
            except BaseException as e:  # noqa: BLE001 - reported below
                results.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino), "fd 1 no longer is the process's stdout"
    assert all(isinstance(r, bytes) for r in results), [r for r in results if not isinstance(r, bytes)]
    assert len(set(results)) == 1


def test_an_export_that_writes_the_same_models_again_outdates_nothing(trained, tmp_path) -> None:  # noqa: ANN001
    """`eval`, then `export --int8` again: the int8 files came out with the bytes they had, yet eval/bench/package/report
    were marked outdated ("export wrote new models") and the report called their rows older than the models."""
    from edgemap.evaluate import EvalOptions, evaluate

    run, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    first = export(copy, ExportOptions(int8=True, calib_size=16))
    evaluate(copy, EvalOptions(runtimes=("cpu",)))
    RunDir.load(copy).set_stage("eval", "done")  # as `edgemap run` records it
    made = {k: dict(v) for k, v in RunDir.load(copy).artifacts.items() if k.startswith("onnx")}
    assert "onnx_fp32" in made  # its time is kept too (through add_artifact, as the fp32 path records it)
    import time

    time.sleep(1.1)  # the times have whole seconds: another second, or a kept time could not be told from a new one
    again = export(copy, ExportOptions(int8=True, calib_size=16))
    assert first.int8 and sorted(again.int8_unchanged) == sorted(again.int8) and not again.rewritten
    now = RunDir.load(copy)
    assert now.data["stages"]["eval"]["status"] == "done", now.data["stages"]["eval"]
    assert {k: v["created"] for k, v in made.items()} == {k: now.artifacts[k]["created"] for k in made}
    r = CliRunner().invoke(__import__("edgemap.cli", fromlist=["app"]).app, ["export", str(copy), "--int8",
                                                                            "--calib-size", "16"])
    assert r.exit_code == 0 and r.output.count("(unchanged)") == 1 + len(first.int8), r.output
