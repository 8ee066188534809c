"""`edgemap eval` on a trained tiny run: every runtime, agreement, tolerance, data selection, CLI, JSON."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_support import CLASSES, load_arrays, make_images, trained_run  # noqa: F401
from typer.testing import CliRunner

from edgemap.errors import DatasetError, EdgemapError, OptionError, RuntimeUnavailableError
from edgemap.evaluate import EvalOptions, evaluate, evaluate_arrays
from edgemap.manifest import RunDir
from edgemap.metrics import classification_report

EVAL_KEYS = {"runtime", "precision", "n", "accuracy", "macro_f1", "agreement", "status", "reason", "provider",
             "top5", "macro_precision", "macro_recall", "per_class", "confusion", "within_tolerance"}


@pytest.fixture(scope="module")
def result(trained_run):  # noqa: ANN001, F811
    run, _ = trained_run
    return evaluate(run.path, EvalOptions(runtimes=("torch", "cpu", "cuda", "openvino")))


def test_default_data_is_the_test_split_and_rows_cover_every_combo(result, trained_run) -> None:  # noqa: ANN001, F811
    _, splits = trained_run
    assert result.n == len(splits["test"]) and "(test," in result.data
    got = [(r.runtime, r.precision, r.status) for r in result.rows]
    assert got[0] == ("torch", "fp32", "ok")  # the reference comes first
    assert ("cpu", "fp32", "ok") in got and ("cpu", "int8", "ok") in got
    assert ("openvino", "fp32", "ok") in got and ("openvino", "int8", "ok") in got
    assert ("cuda", "fp32", "unavailable") in got and ("cuda", "int8", "unavailable") in got
    cuda = next(r for r in result.rows if r.runtime == "cuda" and r.precision == "fp32")
    assert "CUDAExecutionProvider" in cuda.reason and "onnxruntime-gpu>=1.20,<1.27" in cuda.reason


def test_runtimes_agree_within_documented_tolerance(result) -> None:  # noqa: ANN001
    ok = [r for r in result.rows if r.status == "ok"]
    ref = ok[0]
    assert ref.accuracy > 0.5  # the tiny net learned the colours: a meaningful comparison
    for r in ok:
        assert r.within_tolerance, (r.runtime, r.precision, r.agreement, r.accuracy)
        assert r.agreement >= 0.95
        if r.precision == "fp32" and r.runtime == "cpu":
            assert r.max_abs_diff < 1e-3
            assert r.accuracy == ref.accuracy
    ov = next(r for r in ok if r.runtime == "openvino" and r.precision == "int8")
    assert "OpenVINO:CPU" in ov.provider and "8" in ov.provider  # its kernels really ran int8


def test_row_metrics_equal_the_metrics_of_torch_logits(result, trained_run) -> None:  # noqa: ANN001, F811
    import torch

    from edgemap.model import load_classifier

    run, splits = trained_run
    x, y = load_arrays(splits["test"], run.contract)
    with torch.inference_mode():
        logits = load_classifier(run)(torch.from_numpy(x)).numpy()
    rep = classification_report(y, logits, CLASSES)
    ref = result.rows[0]
    assert (ref.accuracy, ref.top5, ref.macro_f1, ref.confusion) == (rep.accuracy, rep.top5, rep.macro_f1, rep.confusion)
    assert sum(map(sum, ref.confusion)) == ref.n == len(y)


def test_results_are_stored_in_the_manifest_as_json_rows(result, trained_run) -> None:  # noqa: ANN001, F811
    run, _ = trained_run
    stored = RunDir.load(run.path).data["metrics"]["eval"]
    assert stored["n"] == result.n and len(stored["rows"]) == len(result.rows)
    for row in stored["rows"]:
        assert EVAL_KEYS <= set(row)
        assert row["status"] in ("ok", "unavailable", "error")
        assert (row["status"] == "ok") == (row["reason"] == "")
    json.dumps(stored)  # plain JSON types only


def test_data_option_maps_classes_by_name_and_refuses_unknown(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    run, _ = trained_run
    flat = tmp_path / "flat é"
    make_images(flat, 3, seed=9)
    shutil.rmtree(flat / "blue")  # a subset of the run's classes is fine
    res = evaluate(run, EvalOptions(data=flat, runtimes=("torch", "cpu"), precisions=("fp32",), save=False))
    assert res.n == 15 and "(all," in res.data  # a single-folder dataset is evaluated entirely
    assert res.rows[1].agreement == 1.0
    ref = res.rows[0]
    support = {c["class"]: c["support"] for c in ref.per_class}
    assert support["blue"] == 0 and support["red"] == 3
    (flat / "purple").mkdir()
    make_images(tmp_path / "x", 1, seed=1)
    shutil.copy(tmp_path / "x" / "red" / "img 000.png", flat / "purple" / "a.png")
    with pytest.raises(DatasetError, match="purple.*give --known-classes-only to leave their images out"):
        evaluate(run, EvalOptions(data=flat, runtimes=("cpu",), save=False))
    # a class added since the run was trained: its images left out (and said), so runs compare on shared classes
    res = evaluate(run, EvalOptions(data=flat, runtimes=("cpu",), precisions=("fp32",), save=False,
                                    known_classes_only=True))
    assert res.n == 15 and "1 image(s) of classes the run does not know left out (purple)" in res.data, res.data
    with pytest.raises(DatasetError, match="--known-classes-only goes with --data"):
        EvalOptions(known_classes_only=True)


def test_strict_fails_on_unavailable_and_reference_runs_when_not_asked(trained_run) -> None:  # noqa: F811
    run, splits = trained_run
    x, y = load_arrays(splits["test"][:10], run.contract)
    with pytest.raises(RuntimeUnavailableError, match="cuda/fp32 unavailable"):
        evaluate_arrays(run, x, y, EvalOptions(runtimes=("cpu", "cuda"), precisions=("fp32",), strict=True, save=False))
    res = evaluate_arrays(run, x, y, EvalOptions(runtimes=("openvino",), precisions=("fp32",), save=False))
    assert [r.runtime for r in res.rows] == ["openvino"] and res.rows[0].agreement is not None


def test_changed_model_file_is_refused(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    run, splits = trained_run
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    x, y = load_arrays(splits["test"][:4], run.contract)
    res = evaluate_arrays(RunDir.load(copy), x, y, EvalOptions(runtimes=("cpu",), precisions=("fp32",), save=False))
    assert res.rows[0].status == "error" and "sha256" in res.rows[0].reason
    with pytest.raises(EdgemapError, match="sha256") as e:  # a changed file is not "unavailable here"
        evaluate_arrays(RunDir.load(copy), x, y,
                        EvalOptions(runtimes=("cpu",), precisions=("fp32",), save=False, strict=True))
    assert not isinstance(e.value, RuntimeUnavailableError)


def test_bad_options_and_inputs(trained_run) -> None:  # noqa: F811
    run, _ = trained_run
    x = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(OptionError, match="--precision"):  # a typo, not RuntimeUnavailableError (a sweep skips those)
        evaluate_arrays(run, x, np.zeros(2), EvalOptions(precisions=("fp16",), save=False))
    with pytest.raises(DatasetError, match="uint8"):
        evaluate_arrays(run, x.astype(np.float32), np.zeros(2), EvalOptions(save=False))
    for bad, why in ((("nosuch",), "'nosuch' is unknown; choose from torch, cpu"), (("cpu", "gpu"), "'gpu' is unknown"),
                     (("torch",), "nothing to run: torch is the fp32 reference")):
        with pytest.raises(OptionError, match=why):  # before anything runs
            evaluate_arrays(run, x, np.zeros(2, np.int64), EvalOptions(runtimes=bad, precisions=("int8",), save=False))
    cased = evaluate_arrays(run, x, np.zeros(2, np.int64), EvalOptions(runtimes=("TORCH", "CPU"), precisions=("fp32",), save=False))
    assert [(r.runtime, r.status) for r in cased.rows] == [("torch", "ok"), ("cpu", "ok")]


def test_cli_table_json_and_exit_codes(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    from edgemap.cli import app

    run, _ = trained_run
    out = tmp_path / "eval é.json"
    r = CliRunner().invoke(app, ["eval", str(run.path), "--runtime", "torch,cpu,cuda", "--precision", "fp32",
                                 "--json", str(out), "--details"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "edgemap eval" in r.output and "unavailable" in r.output and "next: edgemap bench" in r.output
    assert "confusion" in r.output
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [x["runtime"] for x in rows] == ["torch", "cpu", "cuda"] and all(EVAL_KEYS <= set(x) for x in rows)
    r = CliRunner().invoke(app, ["eval", str(run.path), "--runtime", "cuda", "--strict"])
    assert r.exit_code != 0 and "unavailable" in r.output
    stored = RunDir.load(run.path).data["metrics"]["eval"]
    r = CliRunner().invoke(app, ["eval", str(run.path), "--runtime", "cuda", "--precision", "fp32"])
    assert r.exit_code == 2 and "no runtime ran" in r.output and "next:" not in r.output, r.output
    assert RunDir.load(run.path).data["metrics"]["eval"] == stored  # a run where nothing ran keeps the results
    r = CliRunner().invoke(app, ["eval", str(run.path), "--skip-bad"])
    assert r.exit_code == 2 and "--skip-bad goes with --data" in r.output, r.output
    r = CliRunner().invoke(app, ["eval", str(run.path / "nope")])
    assert r.exit_code != 0 and "no such run directory" in r.output


def test_cli_table_keeps_numbers_whole_at_80_columns(trained_run) -> None:  # noqa: F811
    """Piped output (CI logs, | cat) is 80 columns wide: numbers and names must not be cut to '90.…'."""
    from edgemap.cli import app

    run, _ = trained_run
    r = CliRunner().invoke(app, ["eval", str(run.path), "--runtime", "torch,cpu,cuda,openvino", "--precision", "fp32,int8"],
                           env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert "…" not in r.output and max(len(line) for line in r.output.splitlines()) <= 80, r.output
    rows = {tuple(line.split()[:2]): line.split() for line in r.output.splitlines() if line.strip().startswith(("cpu", "torch"))}
    acc = f"{100 * RunDir.load(run.path).data['metrics']['eval']['rows'][0]['accuracy']:.2f}"
    assert rows[("torch", "fp32")][2] == acc and rows[("cpu", "int8")][2].replace(".", "").isdigit(), r.output
    said = " ".join(r.output.split())
    assert "[1] cuda fp32 unavailable: " in said and "CUDAExecutionProvider missing" in said, r.output


def test_exact_makes_openvino_compute_f32(trained_run) -> None:  # noqa: F811
    run, splits = trained_run
    x, y = load_arrays(splits["test"], run.contract)
    res = evaluate_arrays(run, x, y, EvalOptions(runtimes=("openvino",), precisions=("fp32",), exact=True, save=False))
    row = res.rows[0]
    assert row.provider == "OpenVINO:CPU (f32)" and row.agreement == 1.0 and row.max_abs_diff < 1e-3
    auto = evaluate_arrays(run, x, y, EvalOptions(runtimes=("openvino:AUTO",), precisions=("fp32",), save=False)).rows[0]
    assert "(f32)" in auto.provider and auto.max_abs_diff < 1e-3, auto  # AUTO hands f32 (and --threads) to the CPU


def test_image_size_limit_is_the_runs_unless_given(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """eval decodes with the decompression-bomb limit the run was trained with; --max-pixels overrides it."""
    from PIL import Image

    run, _ = trained_run
    data = tmp_path / "big"
    make_images(data, 2, seed=3)
    Image.new("RGB", (300, 200), (200, 10, 10)).save(data / "red" / "large.png")  # 60,000 pixels
    from edgemap.cli import app

    opts = dict(data=data, runtimes=("cpu",), precisions=("fp32",), save=False)
    original = run.manifest_path.read_text()
    manifest = json.loads(original)
    manifest["dataset"]["options"]["max_pixels"] = 50_000  # as if trained with --max-pixels 50000
    run.manifest_path.write_text(json.dumps(manifest))
    try:
        with pytest.raises(DatasetError, match=r"large.png \(300x200 = 60,000 pixels exceeds the limit of 50,000.*--skip-bad"):
            evaluate(run.path, EvalOptions(**opts))
        assert evaluate(run.path, EvalOptions(**opts, max_pixels=100_000)).n == 1 + 2 * len(CLASSES)
        res = evaluate(run.path, EvalOptions(**opts, skip_bad=True))  # with --data the file can be skipped
        assert res.n == 2 * len(CLASSES) and "1 unreadable skipped" in res.data
        r = CliRunner().invoke(app, ["eval", str(run.path), "--data", str(data), "--runtime", "cpu", "--precision", "fp32",
                                     "--max-pixels", "100000"])
        assert r.exit_code == 0, r.output
    finally:
        run.manifest_path.write_text(original)


def test_a_moved_dataset_error_points_to_eval_data(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    import shlex

    from edgemap.cli import app

    run, _ = trained_run
    original = run.manifest_path.read_text()
    manifest = json.loads(original)
    manifest["dataset"]["root"] = str(tmp_path / "moved away")
    run.manifest_path.write_text(json.dumps(manifest))
    try:
        with pytest.raises(DatasetError, match=r"gone; restore it .* if it moved, give its new place: `edgemap export RUN "
                                               r"--data NEW_PLACE` .* or evaluate on another labelled folder"):
            evaluate(run.path, EvalOptions(runtimes=("cpu",), precisions=("fp32",), save=False))
        r = CliRunner().invoke(app, ["eval", str(run.path), "--runtime", "cpu", "--precision", "fp32"])
        assert r.exit_code == 2, r.output
        assert f"edgemap eval {shlex.quote(str(run.path))} --data FOLDER" in " ".join(r.output.split()), r.output
    finally:
        run.manifest_path.write_text(original)


def test_eval_on_the_runs_own_dataset_says_when_training_images_are_included(trained_run) -> None:  # noqa: F811
    run, splits = trained_run
    root = Path(run.data["dataset"]["root"])
    note = "the run's own dataset: training images included"
    opts = {"runtimes": ("cpu",), "precisions": ("fp32",), "save": False}
    res = evaluate(run, EvalOptions(data=root, **opts))  # its test/ split: never trained on
    assert note not in res.data and f"(test, {len(splits['test'])} images)" in res.data
    res = evaluate(run, EvalOptions(data=root / "train", **opts))
    assert note in res.data and f"(all, {len(splits['train'])} images)" in res.data


def test_eval_data_names_training_images_by_their_bytes_wherever_they_are(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """A copy of the dataset, or the original moved, was scored as unseen images (and said so on the model card)."""
    from edgemap.data.scan import scan_dataset, write_train_digests

    run, splits = trained_run
    original = run.manifest_path.read_text()
    root = Path(run.data["dataset"]["root"])
    try:
        run.data["dataset"]["train_digests"] = write_train_digests(scan_dataset(root), run.path)
        run.save()
        opts = {"runtimes": ("cpu",), "precisions": ("fp32",), "save": False}
        copy = tmp_path / "copy"
        shutil.copytree(root / "train", copy)
        n = len(splits["train"])
        assert f"{n} of {n} images are training images (same bytes)" in evaluate(run, EvalOptions(data=copy, **opts)).data
        mixed = tmp_path / "mixed"
        shutil.copytree(root / "test", mixed)
        first = sorted(copy.rglob("*.png"))[:2]
        for i, f in enumerate(first):
            shutil.copy(f, mixed / f.parent.name / f"from_train_{i}.png")
        res = evaluate(run, EvalOptions(data=mixed, **opts))
        assert f"2 of {len(splits['test']) + 2} images are training images" in res.data, res.data
        assert "training images" not in evaluate(run, EvalOptions(data=root / "test", **opts)).data
    finally:
        run.manifest_path.write_text(original)
        (run.path / "train_images.sha256").unlink(missing_ok=True)


def test_eval_data_is_any_labelled_folder_not_a_training_layout(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """A held-out folder needs no second class, no validation share, no full class set."""
    run, _ = trained_run
    opts = {"runtimes": ("torch", "cpu"), "precisions": ("fp32",), "save": False}
    one = tmp_path / "one class"
    make_images(one, 2, seed=3)
    for c in CLASSES[1:]:
        shutil.rmtree(one / c)
    (one / "empty").mkdir()  # an empty class folder is skipped (with a warning), even if the run lacks the class
    res = evaluate(run, EvalOptions(data=one, **opts))
    assert res.n == 2 and "(all, 2 images)" in res.data
    assert res.rows[0].status == "ok" and res.rows[1].agreement == 1.0
    only_train = tmp_path / "only train"
    make_images(only_train / "train", 1, seed=4)
    with pytest.raises(DatasetError, match="only train/.*trained the model"):
        evaluate(run, EvalOptions(data=only_train, **opts))
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(next((one / CLASSES[0]).iterdir()), loose / "a.png")
    with pytest.raises(DatasetError, match="no class folders found.*each image has a label"):
        evaluate(run, EvalOptions(data=loose, **opts))
    empties = tmp_path / "empties"
    (empties / "red").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        evaluate(run, EvalOptions(data=empties, **opts))


def _as_unprivileged() -> list[str]:
    """A command prefix under which permission bits apply (root ignores them); empty when not root."""
    import os

    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permission bits cannot be tested")
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


def test_a_read_only_run_directory_is_one_line_or_works_without_storing(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """A shared/mounted read-only run: eval and bench still measure (not stored); writers say what to do."""
    import os
    import stat
    import subprocess
    import sys

    run, _ = trained_run
    ro = tmp_path / "ro run"
    shutil.copytree(run.path, ro, ignore=shutil.ignore_patterns("report", "dist"))
    before = (ro / "edgemap.json").read_bytes()
    for p in [ro, *ro.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    env = {**os.environ, "COLUMNS": "120"}

    def edgemap(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*_as_unprivileged(), sys.executable, "-m", "edgemap", *args], capture_output=True,
                              text=True, env=env, timeout=300)

    try:
        r = edgemap("eval", str(ro), "--runtime", "cpu", "--precision", "fp32")
        assert r.returncode == 0 and "not stored: the run directory is not writable" in r.stdout, r.stdout + r.stderr
        r = edgemap("bench", str(ro), "--runtime", "cpu", "--precision", "fp32", "--iters", "3", "--warmup", "1")
        assert r.returncode == 0 and "not stored" in r.stdout, r.stdout + r.stderr
        r = edgemap("export", str(ro))
        assert r.returncode == 74 and "cannot write in this run directory" in r.stderr and "chmod -R u+w" in r.stderr, r.stderr
        r = edgemap("package", str(ro), "--precision", "fp32")
        assert r.returncode == 74 and f"{ro / 'dist'}: Permission denied" in r.stderr, r.stderr
        for res in (r,):
            assert "Traceback" not in res.stderr and res.stderr.count("\n") <= 3, res.stderr
        r = edgemap("report", str(ro), "--out", str(tmp_path / "elsewhere" / "r.html"), "--no-predict")
        assert r.returncode == 0 and (tmp_path / "elsewhere" / "r_files").is_dir(), r.stdout + r.stderr
        assert (ro / "edgemap.json").read_bytes() == before and not (ro / "report").exists()
    finally:
        for p in [ro, *ro.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_a_hand_edited_manifest_that_contradicts_the_model_is_caught(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """Classes or preprocessing edited in edgemap.json: eval must not score the ONNX models with labels or inputs the
    device (which reads the model's metadata) never uses, and package must not write a card that says so."""
    from edgemap.errors import ManifestError, PackageError
    from edgemap.package import PackageOptions, package

    run, splits = trained_run
    for edit in ("classes", "preprocess"):
        copy = tmp_path / edit
        shutil.copytree(run.path, copy, ignore=shutil.ignore_patterns("report", "dist"))
        manifest = json.loads((copy / "edgemap.json").read_text(encoding="utf-8"))
        if edit == "classes":
            manifest["classes"][0], manifest["classes"][1] = manifest["classes"][1], manifest["classes"][0]
        else:
            manifest["preprocess"]["interpolation"] = "nearest"
        (copy / "edgemap.json").write_text(json.dumps(manifest), encoding="utf-8")
        if edit == "classes":  # not the classes the weights were trained with: refused by every command at once
            with pytest.raises(ManifestError, match="'classes' is not the class list the weights were trained with"):
                RunDir.load(copy)
            continue
        edited = RunDir.load(copy)
        x, y = load_arrays(splits["test"][:4], edited.contract)
        res = evaluate_arrays(edited, x, y, EvalOptions(runtimes=("torch", "cpu", "openvino"), precisions=("fp32",),
                                                        save=False))  # the torch reference too (it scored 11 %)
        assert all(r.status == "error" and "metadata differs from edgemap.json" in r.reason and edit[:5] in r.reason
                   for r in res.rows), res.rows
        with pytest.raises(PackageError, match="metadata differs"):
            package(copy, PackageOptions(precision="fp32", out=tmp_path / f"dist-{edit}"))


def test_a_reference_that_cannot_run_says_why_agreement_is_blank(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """`eval --runtime cpu` with broken weights left the agreement column blank, exit 0, without a word."""
    import shutil

    from edgemap.cli import app

    run, _ = trained_run
    copy = Path(shutil.copytree(run.path, tmp_path / "run"))
    with open(copy / "weights" / "best.safetensors", "ab") as f:
        f.write(b"x")
    res = evaluate(copy, EvalOptions(runtimes=("cpu",), precisions=("fp32",), save=False))
    assert res.rows[0].status == "ok" and res.rows[0].agreement is None
    assert len(res.notes) == 1 and "agreement with PyTorch not computed" in res.notes[0] and "sha256" in res.notes[0]
    r = CliRunner().invoke(app, ["eval", str(copy), "--runtime", "cpu", "--precision", "fp32"])
    assert r.exit_code == 0 and "note: agreement with PyTorch not computed" in " ".join(r.output.split())


def test_the_torch_model_is_built_from_the_weight_bytes_it_checked(trained_run, tmp_path, monkeypatch) -> None:  # noqa: ANN001, F811
    """load_classifier (export, the torch reference of eval) checked the weights' sha256, then read the path again."""
    import edgemap.model as model_mod
    from edgemap.manifest import RunDir

    run, _ = trained_run
    copy = Path(shutil.copytree(run.path, tmp_path / "run"))
    weights = copy / "weights" / "best.safetensors"
    expected = model_mod.load_classifier(RunDir.load(copy)).state_dict()
    real = model_mod.build_classifier

    def swap_after_the_check(*a, **kw):  # noqa: ANN002, ANN003, ANN202 - another process, at the worst moment
        weights.write_bytes(b"not the weights that were checked")
        return real(*a, **kw)

    monkeypatch.setattr(model_mod, "build_classifier", swap_after_the_check)
    got = model_mod.load_classifier(RunDir.load(copy)).state_dict()
    assert weights.read_bytes() == b"not the weights that were checked"
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_eval_runs_the_bytes_it_checked_even_if_the_file_is_swapped(trained_run, tmp_path, monkeypatch) -> None:  # noqa: ANN001, F811
    """open_session hashed model.onnx, then the runtime read the path again: a file swapped in between was stored as
    an ok row under the checked sha256."""
    import edgemap.artifacts as arts

    run, _ = trained_run
    copy = Path(shutil.copytree(run.path, tmp_path / "run"))
    real = arts.model_run_mismatch

    def swap_after_the_check(r, model, data=None):  # noqa: ANN001, ANN202 - another process, at the worst moment
        if data is not None:  # the ONNX row: its bytes were read and checked just now
            shutil.copyfile(copy / "model.int8.qoperator.onnx", copy / "model.onnx")
        return real(r, model, data)

    monkeypatch.setattr(arts, "model_run_mismatch", swap_after_the_check)
    res = evaluate(copy, EvalOptions(runtimes=("torch", "cpu"), precisions=("fp32",), save=False))
    row = next(r for r in res.rows if r.runtime == "cpu")
    assert row.status == "ok" and row.max_abs_diff < 1e-4, row  # fp32 (the checked bytes), not the int8 file


@pytest.mark.parametrize(("kw", "says"), [
    ({"batch": 0}, "EvalOptions.batch 0: must be a whole number >= 1"),  # named --batch, which eval does not have
    ({"batch": "8"}, "EvalOptions.batch '8': must be a whole number >= 1"),  # a bare TypeError inside eval
    ({"max_pixels": 0}, "--max-pixels 0: must be a whole number >= 1"),
    ({"threads": 2.0}, "--threads 2.0: must be a whole number"),
    ({"precisions": None}, "--precisions None: give a value"),
    ({"skip_bad": True}, "--skip-bad goes with --data"),  # was ignored from Python
])
def test_bad_eval_option_values_from_python_are_one_line_when_made(kw: dict, says: str) -> None:
    from edgemap.errors import EdgemapError

    with pytest.raises(EdgemapError, match=re.escape(says)):
        EvalOptions(**kw)


def test_a_run_loaded_before_another_command_wrote_it_never_saves_its_old_records(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """A notebook keeps a RunDir, exports in between, evaluates again: eval and bench saved the RunDir as it was
    loaded, putting the old int8 sha256 back (every int8 row then failed as "changed after it was made")."""
    import shutil

    from edgemap.bench import BenchOptions, bench
    from edgemap.errors import ManifestError

    run, _ = trained_run
    shutil.copytree(run.path, tmp_path / "run")
    early = RunDir.load(tmp_path / "run")
    later = RunDir.load(tmp_path / "run")
    later.data["artifacts"]["onnx_fp32"]["created"] = "2099-01-01T00:00:00+00:00"  # as an export made since
    later.save()
    c, fp32 = early.contract, EvalOptions(runtimes=("cpu",), precisions=("fp32",))
    evaluate_arrays(early, np.zeros((2, c.height, c.width, 3), np.uint8), np.zeros(2, np.int64), fp32)
    assert evaluate(early, fp32).rows[0].status == "ok"
    bench(early, BenchOptions(runtimes=("cpu",), precisions=("fp32",), batches=(1,), iters=2, warmup=0))
    now = RunDir.load(tmp_path / "run")
    assert now.artifacts["onnx_fp32"]["created"] == "2099-01-01T00:00:00+00:00"  # the later record is kept
    assert now.data["metrics"]["eval"]["rows"] and now.data["metrics"]["bench"]["rows"]
    # and the caller's RunDir holds what they stored: report(early) shows them, export(early) is not refused
    assert early.data == now.data
    from edgemap.export import ExportOptions, export
    from edgemap.report import ReportOptions, report

    assert "cpu" in report(early, ReportOptions(predict=False, out=tmp_path / "r.html")).html.read_text(encoding="utf-8")
    export(early, ExportOptions())
    # a RunDir that another one saved over since is refused, and nothing is written
    stale, other = RunDir.load(tmp_path / "run"), RunDir.load(tmp_path / "run")
    other.data["artifacts"]["onnx_fp32"]["created"] = "2100-01-01T00:00:00+00:00"
    other.save()
    before = (tmp_path / "run" / "edgemap.json").read_bytes()
    stale.data["stages"]["eval"] = {"status": "outdated"}
    with pytest.raises(ManifestError, match="changed since this run was loaded .* nothing was written over it"):
        stale.save()
    assert (tmp_path / "run" / "edgemap.json").read_bytes() == before


def test_stored_rows_of_other_images_behind_the_same_name_are_not_merged(trained_run, tmp_path, caplog) -> None:  # noqa: ANN001, F811
    """`eval --data ext` on all runtimes, new images put in ext/, `eval --data ext --runtime openvino`: the card showed
    the old torch/cpu rows and the new openvino row as one measurement on one set of images."""
    import shutil

    from edgemap.bench import BenchOptions, bench

    run, _ = trained_run
    shutil.copytree(run.path, tmp_path / "run")
    ext = tmp_path / "ext"
    make_images(ext, 3, seed=11)
    fp32 = {"precisions": ("fp32",), "data": ext}
    evaluate(tmp_path / "run", EvalOptions(runtimes=("torch", "cpu", "openvino"), **fp32))
    evaluate(tmp_path / "run", EvalOptions(runtimes=("openvino",), **fp32))  # the same images: the other rows are kept
    rows = RunDir.load(tmp_path / "run").data["metrics"]["eval"]["rows"]
    assert [r["runtime"] for r in rows] == ["torch", "cpu", "openvino"]
    shutil.rmtree(ext)
    make_images(ext, 3, seed=12)  # other images, the same folder name and count
    res = evaluate(tmp_path / "run", EvalOptions(runtimes=("openvino",), **fp32))
    rows = RunDir.load(tmp_path / "run").data["metrics"]["eval"]["rows"]
    assert [r["runtime"] for r in rows] == ["openvino"], rows
    assert any(f"the stored results on {ext} (all, 18 images) (other images then) were replaced" in n for n in res.notes), res.notes
    # bench: rows at another thread count replace the stored ones, and that is said
    quick = {"runtimes": ("cpu",), "precisions": ("fp32",), "batches": (1,), "iters": 2, "warmup": 0}
    bench(tmp_path / "run", BenchOptions(threads=2, **quick))
    with caplog.at_level("WARNING", logger="edgemap"):
        bench(tmp_path / "run", BenchOptions(threads=1, **quick))
    assert re.search(r"the \d+ stored bench row\(s\), measured with 2 thread\(s\), were replaced by these \(1 thread\(s\)\)",
                     caplog.text), caplog.text  # the fixture's run may hold rows other tests stored at 2 threads


def test_arrays_evaluated_without_saving_read_the_run_as_it_is_now(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """evaluate_arrays(run, save=False) used the caller's RunDir as loaded: after an export from another process,
    every int8 row failed as "changed after it was made", with advice that could not fix it."""
    import shutil

    from edgemap.export import ExportOptions, export

    run, _ = trained_run
    shutil.copytree(run.path, tmp_path / "run")
    stale = RunDir.load(tmp_path / "run")
    before = stale.artifacts["onnx_int8_qoperator"]["sha256"]
    export(tmp_path / "run", ExportOptions(int8=True, targets=("cpu",), calib_size=16, calib_method="percentile",
                                           max_drop=100.0))  # other int8 bytes
    assert RunDir.load(tmp_path / "run").artifacts["onnx_int8_qoperator"]["sha256"] != before
    c = stale.contract
    res = evaluate_arrays(stale, np.zeros((2, c.height, c.width, 3), np.uint8), np.zeros(2, np.int64),
                          EvalOptions(runtimes=("cpu",), precisions=("int8",), save=False))
    assert [(r.runtime, r.status) for r in res.rows] == [("cpu", "ok")], [r.reason for r in res.rows]
    assert stale.artifacts["onnx_int8_qoperator"]["sha256"] == before  # read-only: the caller's object is left alone


def test_strict_is_runtime_unavailable_only_when_every_row_was(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """--strict raised RuntimeUnavailableError for rows that failed (a missing model, out of memory): a sweep that
    skips unavailable runtimes skipped those too."""
    import shutil

    from edgemap.errors import EdgemapError

    run, _ = trained_run
    shutil.copytree(run.path, tmp_path / "run")
    with pytest.raises(RuntimeUnavailableError, match="--strict: cuda/fp32 unavailable"):
        evaluate(tmp_path / "run", EvalOptions(runtimes=("cuda",), precisions=("fp32",), strict=True, save=False))
    (tmp_path / "run" / "model.int8.qoperator.onnx").unlink()
    with pytest.raises(EdgemapError, match="--strict: cpu/int8 error") as e:
        evaluate(tmp_path / "run", EvalOptions(runtimes=("cpu",), precisions=("int8",), strict=True, save=False))
    assert not isinstance(e.value, RuntimeUnavailableError)


@pytest.mark.parametrize(("make", "says"), [
    (lambda: __import__("edgemap.export", fromlist=["x"]).ExportOptions(calib_size=20.5), "--calib-size 20.5: must be a whole"),
    (lambda: __import__("edgemap.export", fromlist=["x"]).ExportOptions(max_drop="1"), "--max-drop '1': must be a number"),
    # API-only fields: a nan tolerance failed a good model's parity and recorded it; calib_chunk 0 failed inside ORT
    (lambda: __import__("edgemap.export", fromlist=["x"]).ExportOptions(parity_atol=float("nan")),
     "parity_atol must be a finite number >= 0, got nan"),
    (lambda: __import__("edgemap.export", fromlist=["x"]).ExportOptions(parity_rtol=-1.0), "parity_rtol must be a finite"),
    (lambda: __import__("edgemap.export", fromlist=["x"]).ExportOptions(calib_chunk=0), "calib_chunk must be at least 1"),
    (lambda: __import__("edgemap.export", fromlist=["x"]).ExportOptions(gate_images=0), "gate_images must be at least 1"),
    (lambda: __import__("edgemap.report", fromlist=["x"]).ReportOptions(grid="5").validate(), "--grid '5': must be a whole"),
    (lambda: __import__("edgemap.train.finetune", fromlist=["x"]).FinetuneOptions(epochs=2.5).validate(),
     "--epochs 2.5: must be a whole number"),
    (lambda: __import__("edgemap.train.finetune", fromlist=["x"]).FinetuneOptions(batch_size="8").validate(),
     "--batch-size '8': must be a whole number"),
])
def test_whole_numbers_are_whole_in_every_stage(make, says: str) -> None:  # noqa: ANN001
    """calib_size=20.5 calibrated on 21 images, epochs=2.5 was accepted, batch_size="8" was a bare TypeError."""
    from edgemap.errors import EdgemapError

    with pytest.raises(EdgemapError, match=re.escape(says)):
        make()


def test_details_show_undefined_precision_and_recall_as_a_dash() -> None:
    """A class with no images (recall 0/0) or never predicted (precision 0/0) printed 0.000, like a real zero."""
    from types import SimpleNamespace

    from rich.console import Console

    from edgemap.cli.cmd_eval import render_details
    from edgemap.metrics import classification_report

    labels, preds = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])  # class 2: no images, never predicted
    m = classification_report(labels, np.eye(3)[preds], ["a", "b", "c"])
    row = SimpleNamespace(runtime="cpu", precision="fp32", per_class=m.per_class, confusion=m.confusion)
    console = Console(width=200, record=True)
    console.print(render_details(row, ["a", "b", "c"])[0])  # the per-class table
    text = console.export_text()
    cells = {r[0]: r[1:] for r in ([c.strip() for c in x.split("│")[1:-1]] for x in text.splitlines() if x.startswith("│"))}
    assert cells["c"] == ["—", "—", "—", "0"] and cells["a"] == ["1.000", "0.500", "0.667", "2"], cells
    assert "undefined (0/0)" in text


def test_eval_tables_show_class_names_and_paths_as_they_are() -> None:
    """Class folders "[cat]" and "[bold red]dog" were read as Rich markup: a blank row label, a red "dog"; the
    dataset path "[data]" vanished from the title; columns cut to 8 characters made healthy_leaf and healthy_stem
    the same column."""
    from types import SimpleNamespace

    from rich.console import Console

    from edgemap.cli.cmd_eval import render, render_details
    from edgemap.metrics import classification_report

    classes = ["[cat]", "[bold red]dog", "healthy_leaf", "healthy_stem"]
    labels, preds = np.array([0, 1, 2, 3, 3]), np.array([0, 1, 2, 3, 2])
    m = classification_report(labels, np.eye(4)[preds], classes)
    row = SimpleNamespace(runtime="cpu", precision="fp32", per_class=m.per_class, confusion=m.confusion)
    console = Console(width=200, record=True)
    for table in render_details(row, classes):
        console.print(table)
    console.print(render(SimpleNamespace(data="/d/[data] (val, 5 images)", rows=[], notes=[])))
    text = console.export_text()
    assert "│ [cat]" in text and "│ [bold red]dog" in text and "/d/[data] (val" in text, text
    assert "│ 2 healthy_leaf" in text and "│ 3 healthy_stem" in text, text  # numbered: the columns are 0..3


def test_unknown_names_are_refused_when_the_options_are_made() -> None:
    """EvalOptions(runtimes="cpux"), BenchOptions(runtimes="gpu"), ExportOptions(calib_method="kl"),
    PackageOptions(runtime="tensorrt") were accepted and refused only when the stage ran (README said "when made")."""
    from edgemap.bench import BenchOptions
    from edgemap.errors import EdgemapError
    from edgemap.export import ExportOptions
    from edgemap.package import PackageOptions

    for make, said in ((lambda: EvalOptions(runtimes="cpux"), "--runtime 'cpux' is unknown"),
                       (lambda: BenchOptions(runtimes="gpu"), "--runtime 'gpu' is unknown"),
                       (lambda: EvalOptions(precisions="fp16"), "--precision 'fp16' is unknown"),
                       (lambda: ExportOptions(calib_method="kl"), "--calib-method 'kl'"),
                       (lambda: ExportOptions(targets="gpu"), "--targets: unknown runtime 'gpu'"),
                       (lambda: PackageOptions(runtime="tensorrt"), "--runtime 'tensorrt'"),
                       (lambda: PackageOptions(precision="fp16"), "--precision 'fp16'")):
        with pytest.raises(EdgemapError, match=re.escape(said)):
            make()
    assert EvalOptions(runtimes="openvino:GPU").runtimes == ("openvino:GPU",)  # a device is a name, not a check


def test_no_save_measures_without_replacing_the_runs_results(trained_run, tmp_path) -> None:  # noqa: ANN001, F811
    """`eval RUN --data NEW` to compare two runs replaced the run's own results (and its wheel's card); they often
    cannot be measured again once the dataset moved on."""
    import shutil

    from edgemap.cli import app

    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    before = (copy / "edgemap.json").read_bytes()
    r = CliRunner().invoke(app, ["eval", str(copy), "--data", str(run.path.parent / "data" / "val"), "--runtime",
                                 "torch,cpu", "--no-save"])
    assert r.exit_code == 0 and "not stored (--no-save)" in r.output, r.output
    assert (copy / "edgemap.json").read_bytes() == before


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_a_full_run_disk_shows_the_results_and_names_the_run_not_tmpdir(trained_run, tmp_path, monkeypatch,  # noqa: ANN001, F811
                                                                        command: str) -> None:
    """The save of edgemap.json on a full disk failed after all the measuring: no table (the results were lost), and
    the error blamed "the temp folder /tmp (TMPDIR)" though /tmp had room and the run's disk was full."""
    import errno
    import shutil

    from edgemap.cli import app

    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    before = (copy / "edgemap.json").read_bytes()
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:  # the run's disk: any write of edgemap.json's temp file
        if self.name.startswith(".edgemap.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    args = ["--runtime", "cpu", "--precision", "fp32"] + (["--iters", "3", "--batch", "1"] if command == "bench" else [])
    r = CliRunner().invoke(app, [command, str(copy), *args], env={"COLUMNS": "200"})
    said = " ".join(r.output.split())
    assert r.exit_code == 74, r.output
    assert "cpu fp32" in said and f"{copy}: No space left on device" in said and "TMPDIR" not in said, r.output
    assert (copy / "edgemap.json").read_bytes() == before and not list(copy.glob("*.edgemap-tmp"))
