"""Runtime sessions: unavailable paths with their reasons, fallback detection, batch 1 and 7, precision."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from test_eval_support import load_arrays, trained_run  # noqa: F401

from edgemap.errors import OptionError, ProviderFallbackError, RuntimeUnavailableError
from edgemap.runtime import sessions as S


# ---- unavailable paths ------------------------------------------------------------------
def test_cuda_and_tensorrt_unavailable_without_onnxruntime_gpu() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu installed: the unavailable path is not reachable here")
    for name in ("cuda", "tensorrt"):
        ok, why = S.available(name)
        assert not ok
        assert S.RUNTIMES[name].provider in why and "pip uninstall -y onnxruntime onnxruntime-gpu" in why and "onnxruntime-gpu>=1.20,<1.27" in why
        if S._can_load("libcuda.so.1", "libcuda.so", "nvcuda.dll"):  # no driver: said first, the pip advice after it
            assert why.startswith("no NVIDIA GPU driver on this machine (libcuda could not be loaded) and "), why
            assert f"{name} cannot run here; on a machine with an NVIDIA GPU: pip uninstall" in why, why


def test_load_of_an_unavailable_runtime_raises_with_the_reason(trained_run) -> None:  # noqa: F811
    run, _ = trained_run
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu installed")
    with pytest.raises(RuntimeUnavailableError, match="runtime 'cuda' unavailable: .*CUDAExecutionProvider"):
        S.load(run.artifact_path("onnx_fp32"), "cuda")


def test_openvino_missing_device_and_bad_specs() -> None:
    import openvino as ov

    if any(d.startswith("GPU") for d in ov.Core().available_devices):
        pytest.skip("this machine has an OpenVINO GPU")
    ok, why = S.available("openvino:GPU")
    assert not ok and "OpenVINO device GPU not found" in why and "CPU" in why
    assert S.available("openvino") == (True, "")
    assert S.available("cpu") == (True, "")
    ok, why = S.available("tpu")
    assert not ok and "unknown runtime 'tpu'" in why
    with pytest.raises(OptionError, match="no device suffix"):
        S.parse_runtime("cpu:GPU")
    ok, why = S.check_precision(S.RUNTIMES["cuda"], "int8")
    assert not ok and "fp32" in why


@pytest.mark.parametrize(("runtime", "module", "package"), [("cpu", "onnxruntime", "onnxruntime"),
                                                             ("cuda", "onnxruntime", "onnxruntime-gpu"),
                                                             ("openvino", "openvino", "openvino")])
def test_missing_package_is_reported(monkeypatch, runtime: str, module: str, package: str) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError, as when not installed
    ok, why = S.available(runtime)
    assert not ok and f"package {package} is not installed" in why


@pytest.mark.parametrize(("runtime", "module"), [("cpu", "onnxruntime"), ("openvino", "openvino")])
def test_an_installed_runtime_that_fails_to_import_is_not_called_missing(monkeypatch, tmp_path, runtime: str,  # noqa: ANN001
                                                                          module: str) -> None:
    """onnxruntime 1.18.0 beside numpy 2 fails inside its import; the device was told to pip install onnxruntime."""
    (tmp_path / module).mkdir()
    (tmp_path / module / "__init__.py").write_text(
        "raise ImportError('numpy.core.multiarray failed to import')\n", encoding="utf-8")
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    ok, why = S.available(runtime)
    assert not ok and "is installed but failed to import (numpy.core.multiarray failed to import)" in why, why
    assert "is not installed" not in why


# ---- fallback detection -----------------------------------------------------------------
def test_ort_cuda_session_that_falls_back_to_cpu_is_refused(trained_run) -> None:  # noqa: F811
    """A real ORT session asked for [CUDA, CPU] where CUDA cannot be created: ORT runs it on CPU."""
    run, _ = trained_run
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider creatable here")
    # _load_ort skips the availability pre-check, exactly as a session whose CUDA libraries
    # fail at creation time would get past it.
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"), \
            pytest.raises(ProviderFallbackError, match=r"asked for CUDAExecutionProvider but .*CPUExecutionProvider"):
        S._load_ort(run.artifact_path("onnx_fp32"), S.RUNTIMES["cuda"], 1)


def test_provider_list_of_a_real_session_is_checked(trained_run, monkeypatch) -> None:  # noqa: ANN001, F811
    run, _ = trained_run
    import onnxruntime as ort

    s = ort.InferenceSession(str(run.artifact_path("onnx_fp32")), providers=["CPUExecutionProvider"])
    assert S.check_ort_providers(S.RUNTIMES["cpu"], s.get_providers()) == ["CPUExecutionProvider"]
    with pytest.raises(ProviderFallbackError, match="TensorrtExecutionProvider"):
        S.check_ort_providers(S.RUNTIMES["tensorrt"], s.get_providers())
    # only the provider-list result changes: the real cpu loader must then refuse its own session
    monkeypatch.setattr(ort.InferenceSession, "get_providers", lambda self: ["AzureExecutionProvider"])
    with pytest.raises(ProviderFallbackError, match="AzureExecutionProvider"):
        S.load(run.artifact_path("onnx_fp32"), "cpu")


def test_openvino_device_check_on_a_real_compiled_model(trained_run) -> None:  # noqa: F811
    run, _ = trained_run
    sess = S.load(run.artifact_path("onnx_fp32"), "openvino", S.SessionOptions(threads=1))
    devices = list(sess.native.get_property("EXECUTION_DEVICES"))
    assert S.check_ov_devices("CPU", devices) == devices
    with pytest.raises(ProviderFallbackError, match="asked for OpenVINO GPU"):
        S.check_ov_devices("GPU", devices)
    assert S.check_ov_devices("AUTO", devices) == devices


# ---- running ----------------------------------------------------------------------------
@pytest.mark.parametrize("runtime", ["cpu", "openvino"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_batch_1_and_7_match_torch(trained_run, runtime: str, precision: str) -> None:  # noqa: F811
    from edgemap.artifacts import key_for
    from edgemap.model import load_classifier

    run, splits = trained_run
    x, _ = load_arrays(splits["test"][:7], run.contract)
    with torch.inference_mode():
        ref = load_classifier(run)(torch.from_numpy(x)).numpy()
    sess = S.load(run.artifact_path(key_for(runtime, precision)), runtime,
                  S.SessionOptions(threads=1, exact=True))
    assert sess.load_ms > 0 and sess.providers_in_use
    one = sess.run(x[:1])
    seven = sess.run(x)
    assert one.shape == (1, 6) and seven.shape == (7, 6) and seven.dtype == np.float32
    np.testing.assert_allclose(one[0], seven[0], rtol=1e-4, atol=1e-4)  # batch size changes nothing
    tol = 1e-4 if precision == "fp32" else 0.35 * float(np.abs(ref).max())
    np.testing.assert_allclose(seven, ref, atol=tol)
    with pytest.raises(ValueError, match="uint8"):
        sess.run(x.astype(np.float32))


@pytest.mark.parametrize("runtime", ["cpu", "openvino"])
def test_a_session_is_safe_to_call_from_threads(trained_run, runtime: str) -> None:  # noqa: F811
    """One OpenVINO infer request served every thread: "Infer Request is busy", or another thread's logits returned
    (204 wrong of 600 calls from 8 threads) - a threaded server on the device wheel gave wrong labels."""
    from concurrent.futures import ThreadPoolExecutor

    from edgemap.artifacts import key_for

    run, splits = trained_run
    x, _ = load_arrays(splits["test"][:8], run.contract)
    sess = S.load(run.artifact_path(key_for(runtime, "fp32")), runtime, S.SessionOptions(threads=1))
    alone = [sess.run(x[i:i + 1])[0] for i in range(len(x))]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: (j % len(x), sess.run(x[j % len(x):j % len(x) + 1])[0]), range(240)))
    for i, logits in got:
        np.testing.assert_allclose(logits, alone[i], rtol=1e-5, atol=1e-5)


def test_openvino_reports_the_precision_it_computes_in(trained_run) -> None:  # noqa: F811
    run, _ = trained_run
    exact = S.load(run.artifact_path("onnx_fp32"), "openvino", S.SessionOptions(threads=1, exact=True))
    assert exact.precision_in_use == "f32"
    default = S.load(run.artifact_path("onnx_fp32"), "openvino", S.SessionOptions(threads=1))
    assert default.precision_in_use in ("f32", "bf16", "f16")  # bf16 on AMX/AVX512-BF16 CPUs
    int8 = S.load(run.artifact_path("onnx_int8_qdq"), "openvino", S.SessionOptions(threads=1))
    assert int8.precision_in_use.split("+")[0] in ("i8", "u8")
    assert int8.provider.startswith("OpenVINO:CPU (")


def test_openvino_static_batch_runs_that_batch_like_the_dynamic_model(trained_run) -> None:  # noqa: F811
    run, splits = trained_run
    x, _ = load_arrays(splits["test"][:3], run.contract)
    path = run.artifact_path("onnx_fp32")
    static = S.load(path, "openvino", S.SessionOptions(threads=1, exact=True, batch=3))
    assert list(static.native.input(0).get_partial_shape().to_shape()) == [3, 32, 32, 3]
    dynamic = S.load(path, "openvino", S.SessionOptions(threads=1, exact=True))
    assert dynamic.native.input(0).get_partial_shape().is_dynamic
    np.testing.assert_allclose(static.run(x), dynamic.run(x), atol=1e-5)


def test_physical_cores_is_sane() -> None:
    import os

    assert 1 <= S.physical_cores() <= (os.cpu_count() or 1)


def test_ctrl_c_after_openvino_sessions_are_freed_is_not_a_segfault(trained_run) -> None:  # noqa: F811
    """OpenVINO gives the main thread an alternate signal stack per Core and restores a stale one on
    teardown; with a Core per session, a SIGINT after two sessions were freed killed the process
    with SIGSEGV (exit 139, seen when `edgemap run` was interrupted in its bench stage)."""
    import subprocess

    run, _ = trained_run
    script = (
        "import gc, os, signal, sys\n"
        "from edgemap.runtime.sessions import SessionOptions, load\n"
        "a = load(sys.argv[1], 'openvino', SessionOptions(threads=1))\n"
        "b = load(sys.argv[2], 'openvino', SessionOptions(threads=1))\n"
        "del a; gc.collect(); del b; gc.collect()\n"
        "got = []\n"
        "signal.signal(signal.SIGINT, lambda *_: got.append(1))\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print('handled', len(got))\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(run.artifact_path("onnx_fp32")),
                        str(run.artifact_path("onnx_int8_qdq"))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "handled 1" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_openvino_virtual_devices_with_their_targets_are_available() -> None:
    """openvino:AUTO:CPU, HETERO:CPU and MULTI:CPU compile fine in OpenVINO but were refused as "not found"."""
    from edgemap.evaluate import _combos
    from edgemap.runtime.sessions import available

    for spec in ("openvino:AUTO:CPU", "openvino:HETERO:CPU", "openvino:MULTI:CPU", "openvino:cpu"):
        assert available(spec) == (True, ""), spec
    assert available("openvino:NOSUCH")[0] is False
    assert _combos(("openvino:cpu", "openvino:CPU", "openvino", "openvino:"), ("fp32",)) == [("openvino", "fp32")]
    assert _combos(("cpu:", "cpu"), ("fp32",)) == [("cpu", "fp32")]  # one row each


@pytest.mark.parametrize("runtime", ["cpu", "openvino"])
def test_a_session_runs_the_bytes_it_was_given_not_the_file_again(trained_run, runtime: str) -> None:  # noqa: F811
    """Classifier.from_path hashed the file, then the runtime read the path again: a model swapped in between ran
    unchecked (2 of 11 checked loads in a race). load(data=...) runs exactly the checked bytes."""
    run, splits = trained_run
    fp32, int8 = run.artifact_path("onnx_fp32"), run.artifact_path("onnx_int8_qdq")
    x, _ = load_arrays(splits["test"][:8], run.contract)
    via_bytes = S.load(fp32, runtime, data=int8.read_bytes()).run(x)  # the path only names it
    np.testing.assert_array_equal(via_bytes, S.load(int8, runtime).run(x))
    assert not np.array_equal(via_bytes, S.load(fp32, runtime).run(x))


def test_a_ctrl_c_inside_a_runtimes_import_is_not_called_a_broken_install() -> None:
    """onnxruntime's native initialisation turns a Ctrl-C into "ImportError: initialization failed": eval then measured
    the other rows, exited 0, and told the user to reinstall onnxruntime."""
    from edgemap.runtime.sessions import _import_failure

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:
            raise ImportError("initialization failed") from ki
    except ImportError as e:
        wrapped = e
    with pytest.raises(KeyboardInterrupt):
        _import_failure(wrapped, "onnxruntime", "onnxruntime")
    assert "failed to import" in _import_failure(ImportError("initialization failed"), "onnxruntime", "onnxruntime")


def test_each_classifier_call_reports_its_own_images_pillow_warnings(trained_run, tmp_path) -> None:  # noqa: F811
    """The 20-image cap on Pillow-warning lines was per process: a device server that met 20 such images in its
    first requests logged none for any later request. Each call that decodes images now has its own budget.
    In a subprocess: pytest records warnings itself."""
    import subprocess

    from test_preprocess import _corrupt_exif_jpeg

    for i in range(23):
        _corrupt_exif_jpeg(tmp_path / f"img{i:02d}.jpg", i)
    script = (
        "import sys; from pathlib import Path; from edgemap.runtime import Classifier\n"
        "clf = Classifier.from_path(sys.argv[1])\n"
        "d = Path(sys.argv[2])\n"
        "clf.predict([str(d / f'img{i:02d}.jpg') for i in range(21)])\n"
        "print('--', file=sys.stderr, flush=True)\n"
        "clf.predict([str(d / 'img22.jpg'), str(d / 'img00.jpg')])\n"
    )
    run, _ = trained_run
    r = subprocess.run([sys.executable, "-c", script, str(run.path / "model.onnx"), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first, second = r.stderr.split("--\n")
    assert first.count("Tag data larger than file") == 20 and "not listed (20 shown)" in first, first
    assert "img22.jpg: Tag data larger than file" in second and "img00.jpg: Tag data" in second, second
