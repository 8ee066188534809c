"""edgemap.api: the stage functions and their options from one import, loaded when first used."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_every_api_name_resolves_to_its_stage() -> None:
    import edgemap.api as api
    from edgemap.export import export
    from edgemap.train.finetune import FinetuneOptions

    assert api.__all__ == sorted(api._WHERE) and dir(api) == api.__all__
    for name in api.__all__:
        assert getattr(api, name).__name__ == name, name
    assert api.export is export and api.FinetuneOptions is FinetuneOptions
    with pytest.raises(AttributeError, match="has no attribute 'exprot'"):
        api.exprot  # noqa: B018


def test_importing_the_api_loads_no_engine() -> None:
    """The stage functions are imported when first used: `import edgemap.api` is for scripts and notebooks that
    may only package or report."""
    code = ("import sys, edgemap.api\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'openvino', 'onnx') if m in sys.modules))\n"
            "from edgemap.api import ReportOptions\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "False"], out
