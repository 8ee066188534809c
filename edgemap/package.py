"""`edgemap package`: the last mapping, from a verified model to a wheel a device pip-installs.

The wheel is built by setuptools (``pip wheel --no-deps --no-build-isolation``, offline)
from a source tree generated in a temp folder:

    <module>/__init__.py      generated: ``load()``, ``main()``, ``Classifier``, ``Prediction``
    <module>/*.py             edgemap/runtime/*.py copied at build time, ``edgemap.runtime``
                              imports rewritten to ``<module>`` (one source of truth)
    <module>/model.onnx       the chosen artifact (not in ``--runtime-only`` wheels)
    <module>/model.json       file, sha256, classes, contract, precision, format, runtime, source run
    <module>/MODEL_CARD.md    classes, accuracy and latency from edgemap.json, input contract
    README.md                 the same model card, as the wheel's long description

It depends on numpy, Pillow and the chosen runtime only (never torch, never edgemap).
``--runtime-only`` builds ``edgemap-runtime``: the same module without a model, whose
console command takes the model file first (for over-the-air model updates).
"""

from __future__ import annotations

import contextlib
import json
import keyword
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemap.artifacts import current_results
from edgemap.errors import ManifestError, PackageError
from edgemap.fsutil import atomic_path, remove_stale_temps, sha256_file, writers_lock
from edgemap.manifest import RunDir, hand_back
from edgemap.metrics import score_text

#: the runtimes a wheel can target → (session runtime spec, pip requirement)
WHEEL_RUNTIMES = {
    "onnxruntime": ("cpu", "onnxruntime>=1.18.1"),
    "openvino": ("openvino", "openvino>=2024.4"),
    # onnxruntime-gpu, not onnxruntime: both install the one `onnxruntime` module, and a wheel asking for onnxruntime
    # made pip add the CPU build beside a device's GPU build (the later one's files win). fp32 only: the CUDA
    # execution provider has no int8 convolution kernels. 1.20: the first release on PyPI built for CUDA 12 + cuDNN 9.
    "cuda": ("cuda", "onnxruntime-gpu>=1.20"),
}
BASE_REQUIREMENTS = ("numpy>=1.24", "pillow>=11.2")  # 11.2: XMP-only orientation is honoured, as in training
RUNTIME_DIST = "edgemap-runtime"
MODEL_FILE = "model.onnx"
MODEL_CARD = "MODEL_CARD.md"
# The wheel's module must not shadow what it imports, what its runtimes import (onnxruntime: flatbuffers, packaging,
# protobuf (google.protobuf), and in older releases coloredlogs/humanfriendly and sympy/mpmath; openvino:
# openvino_telemetry; Pillow reads XMP with defusedxml when present) or what edgemap installs.
_RESERVED_MODULES = {"edgemap", "numpy", "pil", "pillow", "onnxruntime", "openvino", "onnx", "torch", "setuptools", "pip",
                     "packaging", "flatbuffers", "google", "protobuf", "coloredlogs", "humanfriendly", "sympy", "mpmath",
                     "openvino_telemetry", "defusedxml"}
_NAME_RE = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)  # PEP 508 / core metadata
_IMPORT_RE = re.compile(r"^(\s*)(from|import)\s+edgemap(\.runtime)?\b(.*)$", re.MULTILINE)
_PEP440_RE = re.compile(  # canonical public + local version (PEP 440 appendix B), used if packaging is absent
    r"^v?(?:(?:[0-9]+)!)?[0-9]+(?:\.[0-9]+)*(?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?[0-9]*)?"
    r"(?:-[0-9]+|[-_.]?(?:post|rev|r)[-_.]?[0-9]*)?(?:[-_.]?dev[-_.]?[0-9]*)?(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class PackageOptions:
    """Options of ``edgemap package`` (the single home of its defaults).

    Attributes:
        runtime: ``onnxruntime`` (ORT CPU; loads the QOperator int8 model), ``openvino`` (QDQ) or ``cuda``
            (ORT's CUDA execution provider, fp32; the wheel asks for ``onnxruntime-gpu``).
        precision: ``int8`` or ``fp32``; None = int8 when the run has an int8 model for this
            runtime, else fp32 (the result says which).
        name: distribution name (PEP 503); default ``<run dir name>-classifier`` (``run-<name>-classifier`` for a
            name that starts with a digit), with ``-openvino`` / ``-cuda`` added for those runtimes. It is also
            the console command; the module is the normalised name with ``_``.
        version: PEP 440 version of the wheel; default ``0.1.0.<export time>+<runtime>.m<model sha256, 12 hex>``
            (:func:`default_model_version`), so that two models' or runtimes' wheels never share a version (pip keeps
            an installed version: "Requirement already satisfied", and a device would go on running what it had) and
            ``pip install -U`` moves to the latest export. The runtime-only wheel's default is edgemap's version.
        out: folder the wheel lands in; default ``RUN_DIR/dist`` (``./dist`` for --runtime-only).
        runtime_only: build ``edgemap-runtime`` (no model) instead.
    """

    runtime: str = "onnxruntime"
    precision: str | None = None
    name: str | None = None
    version: str | None = None
    out: Path | None = None
    runtime_only: bool = False
    default_version: str = "0.1.0"

    def __post_init__(self) -> None:  # names checked when the options are made (a typo waited for package())
        if (self.runtime or "onnxruntime").strip().lower() not in WHEEL_RUNTIMES:
            raise PackageError(f"--runtime {self.runtime!r}: choose {' or '.join(WHEEL_RUNTIMES)}")
        if self.precision not in (None, "fp32", "int8"):
            raise PackageError(f"--precision {self.precision!r}: use int8 or fp32")


@dataclass
class PackageResult:
    """What was built, and how to install it."""

    wheel: Path
    name: str
    module: str
    version: str
    command: str
    runtime: str
    precision: str | None
    model_sha256: str | None
    model_bytes: int | None
    wheel_bytes: int
    requirements: list[str] = field(default_factory=list)
    replaced: bool = False  # a wheel of the same name and version with other contents was overwritten
    warnings: list[str] = field(default_factory=list)
    replaced_requirements: bool = False  # ... and the one overwritten asked for other packages
    named_after_run_folder: bool = False  # no --name given or recorded: a retrain in another folder gets another

    @property
    def overhead_bytes(self) -> int | None:
        """Wheel size minus model size (goal: <= 100 KB)."""
        return None if self.model_bytes is None else self.wheel_bytes - self.model_bytes

    @property
    def pip_install(self) -> str:
        """The install command (see :func:`pip_install_command`)."""
        return pip_install_command(self.wheel, self.replaced, self.runtime, self.replaced_requirements)

    def to_dict(self) -> dict[str, Any]:
        return {
            "wheel": str(self.wheel), "name": self.name, "module": self.module, "version": self.version,
            "command": self.command, "runtime": self.runtime, "precision": self.precision,
            "model_sha256": self.model_sha256, "model_bytes": self.model_bytes, "wheel_bytes": self.wheel_bytes,
            "overhead_bytes": self.overhead_bytes, "requirements": self.requirements, "replaced": self.replaced,
            "warnings": self.warnings,
        }


#: what a ``--runtime cuda`` wheel's install puts first: onnxruntime-gpu replaces onnxruntime (one module), and its
#: newest releases are CUDA 13 builds (1.27 on) that a CUDA 12 device cannot use, so the cap is the device's choice
CUDA12_ONNXRUNTIME_GPU = "onnxruntime-gpu>=1.20,<1.27"


def pip_install_command(wheel: str | Path, replaced: bool = False, runtime: str | None = None,
                        deps_changed: bool = False) -> str:
    """``pip install WHEEL``.

    ``pip install --force-reinstall --no-deps WHEEL`` when the build replaced a same-version wheel of other contents
    (pip keeps a version it already installed), followed by a plain ``pip install WHEEL`` when that wheel asked for
    other packages. A ``cuda`` wheel's command first takes out a CPU onnxruntime (with onnxruntime-gpu: they share
    files) and installs onnxruntime-gpu for CUDA 12 (see :data:`CUDA12_ONNXRUNTIME_GPU`; a CUDA 13 device takes
    ``onnxruntime-gpu>=1.27`` instead)."""
    w = shlex.quote(str(wheel))
    # --force-reinstall alone would also upgrade every dependency (onnxruntime-gpu past the CUDA 12 cap): the wheel
    # without its dependencies, then a plain install that adds only the ones it newly asks for
    install = (f"pip install --force-reinstall --no-deps {w}" + (f" && pip install {w}" if deps_changed else "")
               if replaced else f"pip install {w}")
    if runtime != "cuda":
        return install
    # a CPU onnxruntime is taken out with onnxruntime-gpu (they share files: removing one alone broke the other)
    return (f"if pip show -q onnxruntime; then pip uninstall -y onnxruntime onnxruntime-gpu; fi; "
            f"pip install {shlex.quote(CUDA12_ONNXRUNTIME_GPU)} && {install}")


def default_model_version(base: str, entry: dict[str, Any], runtime: str) -> str:
    """``<base>.<export time, UTC yyyymmddHHMMSS>+<runtime>.m<model sha256, 12 hex>`` (without the time when the
    artifact does not record one).

    Every model and runtime its own version, so pip never keeps another one as "already installed"; and a later
    export is a higher version, so ``pip install -U`` from a wheelhouse or an index moves to the newest model
    (a label alone sorted by its hex digits). The same model packaged again gets the same version.
    """
    stamp = re.sub(r"\D", "", str(entry.get("created", "")))[:14]
    public = f"{base}.{stamp}" if len(stamp) == 14 else base
    return f"{public}+{runtime}.m{entry['sha256'][:12]}"


# ---- validation ---------------------------------------------------------------------------
def normalize_name(name: str) -> str:
    """PEP 503 normalised form: runs of ``-_.`` become ``-``, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def validate_name(name: str, *, allow_reserved: bool = False) -> tuple[str, str]:
    """Check a distribution name; return (normalised name, module name) or raise PackageError.

    The name must be a valid PEP 508 project name ([A-Za-z0-9._-], alphanumeric at both
    ends, so no path characters), start with a letter (it becomes a Python module) and not
    shadow a module the wheel or edgemap relies on.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 100:
        raise PackageError(
            f"--name {name!r}: not a valid package name; use letters, digits and . _ - "
            "(starting and ending with a letter or digit), e.g. --name digits-classifier"
        )
    norm = normalize_name(name)
    module = norm.replace("-", "_")
    if not module[0].isalpha():
        raise PackageError(f"--name {name!r}: must start with a letter (it becomes the Python module {module!r})")
    if keyword.iskeyword(module) or not module.isidentifier():
        raise PackageError(f"--name {name!r}: {module!r} is not a usable Python module name; pick another --name")
    shadowed = module.lower() in _RESERVED_MODULES or module in getattr(sys, "stdlib_module_names", ())
    if (shadowed or norm == RUNTIME_DIST) and not allow_reserved:
        raise PackageError(f"--name {name!r}: the module {module!r} would shadow an existing package; pick another --name")
    return norm, module


def validate_version(version: str) -> str:
    """Check a PEP 440 version; return its normalised form or raise PackageError."""
    bad = PackageError(f"--version {version!r}: not a PEP 440 version; use e.g. 1.0.0, 1.0.0rc1 or 1.0.0+build.7")
    if not isinstance(version, str) or not version or version != version.strip():
        raise bad
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        if not _PEP440_RE.match(version):
            raise bad from None
        return version
    try:
        return str(Version(version))
    except InvalidVersion as e:
        raise bad from e


# ---- choosing the artifact -----------------------------------------------------------------
def _choose_artifact(run: RunDir, runtime: str, precision: str | None) -> tuple[str, str, Path, dict[str, Any]]:
    from edgemap.artifacts import key_for
    from edgemap.runtime.sessions import parse_runtime

    spec = WHEEL_RUNTIMES[runtime][0]
    has_int8 = parse_runtime(spec)[0].int8_format is not None
    if precision is None:
        precision = "int8" if has_int8 and key_for(spec, "int8") in run.artifacts else "fp32"
    if precision not in ("fp32", "int8"):
        raise PackageError(f"--precision {precision!r}: use int8 or fp32")
    if precision == "int8" and not has_int8:
        raise PackageError(f"--precision int8 --runtime {runtime}: ONNX Runtime's CUDA execution provider has no int8 "
                           "convolution kernels (an int8 model would run slower than fp32, partly on the CPU); package "
                           "--precision fp32 for the GPU, or --runtime onnxruntime / openvino for int8 on a CPU")
    try:
        key = key_for(spec, precision)
    except ManifestError as e:
        raise PackageError(f"--precision {precision} --runtime {runtime}: {e}") from e
    if key not in run.artifacts:
        fix = "edgemap export RUN_DIR --int8" if precision == "int8" else "edgemap export RUN_DIR"
        raise PackageError(
            f"{run.manifest_path}: no {precision} model for {runtime} (artifact '{key}'); run `{fix}` first"
            + (" or package with --precision fp32" if precision == "int8" else "")
        )
    path = run.artifact_path(key)  # refuses a file whose sha256 changed since export, or made from older inputs
    entry = run.artifacts[key]
    parity = (run.data.get("metrics") or {}).get("parity") or {}
    if not isinstance(parity, dict):  # [1]: an AttributeError traceback
        raise PackageError(f"{run.manifest_path}: metrics.parity is not what `edgemap export` writes; run `edgemap "
                           f"export {shlex.quote(str(run.path))}` again")
    if parity and not parity.get("passed", True):
        raise PackageError(f"{run.path}: model.onnx failed the parity check against PyTorch (metrics.parity); "
                           f"it must not be deployed. Re-run `edgemap export {shlex.quote(str(run.path))}`")
    return precision, key, path, entry


# ---- the generated source tree ----------------------------------------------------------
def runtime_sources() -> dict[str, str]:
    """edgemap/runtime/*.py (but __init__) with ``edgemap.runtime`` imports left as they are."""
    folder = Path(__file__).parent / "runtime"
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.py")) if p.name != "__init__.py"}


def vendor_source(text: str, module: str, filename: str) -> str:
    """Rewrite ``edgemap.runtime`` imports to ``module``; refuse imports of the rest of edgemap or torch."""

    def sub(m: re.Match[str]) -> str:
        indent, kw, runtime_part, rest = m.groups()
        if not runtime_part:
            raise PackageError(
                f"edgemap/runtime/{filename} imports edgemap{rest.split()[0] if rest.strip() else ''} outside "
                "edgemap.runtime; the device wheel cannot vendor it (a bug in edgemap: report it)"
            )
        return f"{indent}{kw} {module}{rest}"

    out = _IMPORT_RE.sub(sub, text)
    if re.search(r"^\s*(from|import)\s+torch\b", out, re.MULTILINE):
        raise PackageError(f"edgemap/runtime/{filename} imports torch; the device wheel must stay torch-free (a bug in edgemap)")
    return out


_INIT_TEMPLATE = '''"""{title}

Generated by ``edgemap package`` ({edgemap_version}); the other modules are edgemap's own
torch-free runtime, vendored. {usage}
"""

from __future__ import annotations

from pathlib import Path

from {module}.classifier import Classifier, PillowVersionWarning, Prediction
from {module}.errors import {errors}

__version__ = {version!r}
DIST_NAME = {name!r}
PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED = {embedded!r}
__all__ = ["Classifier", "Prediction", "PillowVersionWarning", "load", "main", {errors_all}]
{extra}

def main(argv: list[str] | None = None) -> int:
    """The console command ``{command}``."""
    from {module}.device_cli import main as _main

    return _main(argv, package_dir=PACKAGE_DIR if EMBEDDED else None, prog={command!r}, default_runtime={runtime!r})
'''

_LOAD_EMBEDDED = '''

def load(runtime: str | None = None, **kwargs) -> Classifier:
    """Load the embedded model (sha256 checked against model.json).

    Example:
        >>> clf = load()
        >>> clf.predict("photo.jpg", top_k=3)[0].label
    """
    return Classifier.from_package_dir(PACKAGE_DIR, runtime=runtime, **kwargs)
'''

_LOAD_GENERIC = '''

def load(model_file: str | Path, runtime: str = {runtime!r}, expected_sha256: str | None = None, **kwargs) -> Classifier:
    """Load any edgemap-exported model: ``Classifier.from_path``."""
    return Classifier.from_path(model_file, runtime=runtime, expected_sha256=expected_sha256, **kwargs)
'''


def _pyproject(name: str, version: str, module: str, requirements: list[str], description: str, data: list[str]) -> str:
    q = json.dumps  # a JSON string with ensure_ascii is a valid TOML basic string
    deps = ", ".join(q(r) for r in requirements)
    return (
        "[build-system]\n"
        'requires = ["setuptools>=68"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        "[project]\n"
        f"name = {q(name)}\nversion = {q(version)}\ndescription = {q(description)}\n"
        'readme = {file = "README.md", content-type = "text/markdown"}\n'
        'requires-python = ">=3.10"\n'
        f"dependencies = [{deps}]\n\n"
        "[project.scripts]\n"
        f"{q(name)} = {q(module + ':main')}\n\n"
        "[tool.setuptools]\n"
        f"packages = [{q(module)}]\n"
        "include-package-data = false\n"
        "zip-safe = false\n\n"
        "[tool.setuptools.package-data]\n"
        f"{module} = [{', '.join(q(d) for d in data)}]\n"
    )


def _pillow_requirement(meta: Any) -> str:
    """The Pillow series the model was exported with (``pillow>=13.0,<14``): Pillow decodes and resizes on the device,
    and its resampling changed between major releases (see ``onnx_meta.pillow_mismatch``)."""
    from edgemap.runtime.onnx_meta import exported_pillow, pillow_series

    floor = BASE_REQUIREMENTS[1]
    recorded = exported_pillow(meta)
    major = pillow_series(recorded) if recorded else None
    if major is None:
        return floor
    low = floor.split(">=")[1] if pillow_series(floor.split(">=")[1]) == major else f"{major}.0"
    return f"pillow>={low},<{major + 1}"


def _data_name(where: str) -> str:
    """eval's "/abs/path/DATA (val, 359 images)" → "DATA (val, 359 images)": no local path in a published wheel."""
    m = re.match(r"^(.*?)((?:, \d+ unreadable skipped)? \([^()]*\))$", where)
    path, rest = (m.group(1), m.group(2)) if m else (where, "")
    return (Path(path).name or path) + rest


#: markdown/HTML punctuation: the card is also the wheel's PyPI description, so a class name or a version string from
#: someone else's run must not become a heading, a link, a table break or an <img onerror=...>
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|!&{}()~])")


def _fmt(v: Any) -> str:
    """A value as literal markdown text (one line, markdown/HTML characters escaped)."""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"  # 33450 img/s, not 3.345e+04
    if v is None:
        return "—"
    if isinstance(v, (bool, int)):
        return str(v)
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(v).split()))


def _code(v: Any) -> str:
    """A value for inside `backticks` (a backtick would end the code span)."""
    return " ".join(str(v).split()).replace("`", "'")


def _table(rows: list[dict[str, Any]], preferred: tuple[str, ...], max_cols: int = 9) -> str:
    scalar = [k for r in rows for k, v in r.items() if isinstance(v, (str, int, float, bool)) or v is None]
    seen = list(dict.fromkeys(scalar))
    cols = [k for k in preferred if k in seen]
    if len(cols) < 3:  # rows of an unknown shape: show what they have
        cols += [k for k in seen if k not in preferred and k != "reason"]
    cols = cols[:max_cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in rows]
    return "\n".join(lines)


def _as_percent(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Eval rows as the CLI and the report show them: percentages, and ✗ where agreement left the tolerance."""
    out = []
    for r in rows:
        row = dict(r)
        for key in ("accuracy", "top5", "agreement"):
            v = r.get(key)  # a fraction; anything else (a hand-edited 4,000-digit number...) is shown as missing
            fraction = isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
            row[f"{key} %"] = score_text(100 * v, 2, 100) if fraction else None  # 1 error in 30,000: 99.99, not 100
        f1 = r.get("macro_f1")
        if isinstance(f1, int | float) and not isinstance(f1, bool) and 0 <= f1 <= 1:
            row["macro_f1"] = score_text(f1, 4, 1)
        if r.get("within_tolerance") is False:
            row["agreement %"] = f"{row['agreement %']} ✗"
        if r.get("status", "ok") != "ok":  # "n 0" read as measured on no images: it did not run
            row["n"] = None
        out.append(row)
    return out


def _known_format(fmt: Any, key: str) -> str:
    """The artifact's format, one edgemap writes (a run from elsewhere could put anything in edgemap.json)."""
    if fmt not in ("", "fp32", "qoperator", "qdq", "qdq_s8"):
        raise PackageError(f"artifact '{key}': unknown format {str(fmt)[:40]!r}; re-run `edgemap export`")
    return str(fmt)


def _kind(info: dict[str, Any]) -> str:
    p, f = _fmt(info["precision"]), _fmt(info.get("format") or "")
    return p if f in ("", p) else f"{p} {f}"


def _left_out(old: list[dict[str, Any]], stage: str) -> list[str]:
    if not old:
        return []
    return ["", f"{len(old)} result row(s) measured on an earlier model are left out; run `edgemap {stage} RUN_DIR` "
                "and package again to include the current models."]


_CUDA_NOTE = ("Runs on an NVIDIA GPU through ONNX Runtime's CUDA execution provider: onnxruntime-gpu replaces "
              "onnxruntime (never install both), and its release must match the device's CUDA and cuDNN (1.20–1.26: "
              "CUDA 12 + cuDNN 9; 1.27 on: CUDA 13). Without a usable GPU the command exits 2 with \"runtime 'cuda' "
              "unavailable: <reason>\"; `--runtime onnxruntime` runs it on the CPU instead.")


def model_card(run: RunDir | None, info: dict[str, Any], name: str, version: str, module: str) -> str:
    """The README/model card: use, classes, accuracy (eval), latency (bench), input contract."""
    lines = [f"# {name} {version}", ""]
    if run is None:
        lines += [
            "edgemap's torch-free device runtime without a model: it loads any model written by "
            "`edgemap export` (classes and preprocessing come from the model's metadata).", "",
            "## Use", "", "```sh", f"{name} model.onnx photo.jpg --top-k 3 [--json]", "```", "",
            "```python", f"from {module} import Classifier", 'clf = Classifier.from_path("model.onnx")',
            'print(clf.predict("photo.jpg", top_k=3)[0])', "```", "",
            f"Depends on: {', '.join(info['requirements'])}.", "",
        ]
        return "\n".join(lines)
    c = info["contract"]
    lines += [
        f"Image classifier packaged by edgemap from run `{_code(info['source_run'])}` "
        f"(backbone `{_code(info['backbone'])}`, {_kind(info)} model for {info['runtime']}).", "",
        "## Use", "", "```sh", pip_install_command(f"{module}-{version}-py3-none-any.whl", runtime=info["runtime"]),
        f"{name} photo.jpg more/photos/ --top-k 3 [--json]", "```", "",
        "```python", f"import {module}", f"clf = {module}.load()   # sha256 of the model checked here",
        'for p in clf.predict(["a.jpg", "b.png"], top_k=3):', "    print(p.label, p.prob, p.topk)", "```", "",
        f"Depends on: {', '.join(info['requirements'])} (no torch).", "",
        *([_CUDA_NOTE, ""] if info["runtime"] == "cuda" else []),
        f"## Classes ({len(info['classes'])})", "", "| index | class |", "|---|---|",
    ]
    lines += [f"| {i} | {_fmt(cname)} |" for i, cname in enumerate(info["classes"])]
    metrics = run.data.get("metrics", {}) or {}
    ev, ev_old = current_results(run, "eval")
    bench, bench_old = current_results(run, "bench")
    lines += ["", "## Accuracy (`edgemap eval`)", ""]
    where = (metrics.get("eval") or {}).get("data") if isinstance(metrics.get("eval"), dict) else None
    if ev and where:
        covered = next((sum(1 for c in r.get("per_class", []) if isinstance(c, dict) and c.get("support"))
                        for r in ev if r.get("per_class")), None)
        part = f", {covered} of {len(info['classes'])} classes" if covered and covered < len(info["classes"]) else ""
        lines += [f"Measured on {_fmt(_data_name(str(where)))}{part}.", ""]
    lines += [_table(_as_percent(ev), ("runtime", "precision", "n", "accuracy %", "top5 %", "macro_f1",
                                       "agreement %", "provider", "status")) if ev
              else "not measured (run `edgemap eval RUN_DIR` before packaging)"]
    if any(r.get("within_tolerance") is False for r in ev):
        lines += ["", "✗: predictions agree with the PyTorch reference less than edgemap's tolerance allows "
                      "(see edgemap's README, Eval tolerances)."]
    lines += _left_out(ev_old, "eval")
    lines += ["", "## Latency (`edgemap bench`)", ""]
    threads = (metrics.get("bench") or {}).get("threads") if isinstance(metrics.get("bench"), dict) else None
    if bench and threads:
        lines += [f"{threads} intra-op thread(s), on the machine that ran `edgemap bench`.", ""]
    lines += [_table(bench, ("runtime", "precision", "inference_precision", "batch", "p50_ms", "p90_ms", "p99_ms",
                             "throughput", "mode", "provider", "status"), max_cols=11)
              if bench else "not measured (run `edgemap bench RUN_DIR` before packaging)"]
    lines += _left_out(bench_old, "bench")
    lines += [
        "", "## Input contract", "",
        f"- input: `images`, uint8 RGB, layout NHWC, shape (N, {c['height']}, {c['width']}, 3), any batch size",
        f"- resize: `{c['resize']}`, crop_pct {c['crop_pct']}, interpolation `{c['interpolation']}`",
        f"- normalisation inside the graph: mean {c['mean']}, std {c['std']} (on 0–255 pixels)",
        "- decode: full decode, EXIF orientation applied, alpha composited over white, 16-bit keeps the top 8 bits",
        "", "## Model", "",
        f"- file: `{module}/{info['file']}` ({info['bytes']:,} bytes), sha256 `{info['sha256']}` (checked at load)",
        f"- precision {_fmt(info['precision'])}, format {_fmt(info['format'])}, runtime {_fmt(info['runtime'])}",
        f"- made with: {', '.join(f'{_fmt(k)} {_fmt(v)}' for k, v in sorted(info.get('versions', {}).items()))}", "",
    ]
    return "\n".join(lines)


def _write_tree(src: Path, *, name: str, module: str, version: str, requirements: list[str], runtime: str,
                model: Path | None, info: dict[str, Any] | None, card: str) -> None:
    from edgemap import __version__ as edgemap_version

    pkg = src / module
    pkg.mkdir(parents=True)
    for fname, text in runtime_sources().items():
        (pkg / fname).write_text(vendor_source(text, module, fname), encoding="utf-8")
    embedded = model is not None
    extra = _LOAD_EMBEDDED if embedded else _LOAD_GENERIC.format(runtime=runtime)
    title = (f"{name}: an image classifier packaged by edgemap (model embedded)." if embedded
             else "edgemap-runtime: edgemap's torch-free device runtime; loads any edgemap-exported model.")
    usage = ("``load()`` returns the Classifier of the embedded model." if embedded
             else "``Classifier.from_path(model_file)`` loads a model from its own metadata.")
    from edgemap.runtime import errors as runtime_errors

    errors = sorted(runtime_errors.__all__)  # every error class the runtime raises (a new one is in the wheel too)
    (pkg / "__init__.py").write_text(_INIT_TEMPLATE.format(
        errors=", ".join(errors), errors_all=", ".join(f'"{e}"' for e in errors),
        title=title, edgemap_version=f"edgemap {edgemap_version}", usage=usage, module=module, version=version,
        name=name, embedded=embedded, extra=extra, command=name, runtime=runtime), encoding="utf-8")
    data = [MODEL_CARD]
    if embedded:
        shutil.copyfile(model, pkg / MODEL_FILE)
        (pkg / "model.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        data += [MODEL_FILE, "model.json"]
    (pkg / MODEL_CARD).write_text(card, encoding="utf-8")
    (src / "README.md").write_text(card, encoding="utf-8")
    desc = (f"Image classifier ({info['precision']}, {len(info['classes'])} classes) packaged by edgemap" if embedded
            else "edgemap's torch-free device runtime: classify images with any edgemap-exported ONNX model")
    (src / "pyproject.toml").write_text(_pyproject(name, version, module, requirements, desc, data), encoding="utf-8")


def _build_wheel(src: Path, out: Path) -> Path:
    """setuptools via pip, offline: no index, no build isolation, no dependencies."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--no-cache-dir", "-q", "-w", str(out), str(src)]
    # its own session: a Ctrl-C reaches edgemap only, which then stops pip and its build backend together; they
    # used to get the signal too, and the backend still wrote into the temp folder as it was removed (a traceback)
    # pip's own temp folders inside ours (removed with it): pip killed on a Ctrl-C never removed its pip-unpack-*,
    # pip-wheel-*... in TMPDIR, one holding a copy of the wheel (the model) each time
    pip_tmp = src.parent / "pip-tmp"
    pip_tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(pip_tmp), "TEMP": str(pip_tmp), "TMP": str(pip_tmp)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=src,
                            start_new_session=True, env=env)
    try:
        stdout, stderr = proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError, AttributeError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        tail = (stderr or stdout).strip().splitlines()[-8:]
        raise PackageError("building the wheel failed (pip wheel + setuptools; is setuptools>=68 installed in this "
                           "environment? `pip install 'setuptools>=68'`):\n" + "\n".join(tail))
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise PackageError(f"expected one wheel from the build, found {[w.name for w in wheels]}")
    return wheels[0]


def _check_wheel(whl: Path, module: str, model_sha: str | None) -> None:
    """Every member stays inside the module or its dist-info; the embedded model is the artifact."""
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        for n in names:
            top = n.split("/")[0]
            if n.startswith("/") or "\\" in n or ".." in n.split("/") or not (top == module or top.endswith(".dist-info")):
                raise PackageError(f"{whl.name}: unexpected member {n!r} (the wheel must hold only {module}/ and its metadata)")
        if any("__pycache__" in n or n.endswith(".pyc") for n in names):
            raise PackageError(f"{whl.name}: contains compiled caches; a bug in edgemap's packager")
        if model_sha is not None:
            member = f"{module}/{MODEL_FILE}"
            if member not in names:
                raise PackageError(f"{whl.name}: the model is missing from the wheel")
            import hashlib

            if hashlib.sha256(z.read(member)).hexdigest() != model_sha:
                raise PackageError(f"{whl.name}: the embedded model differs from the exported artifact")


def package(run_dir: str | Path | RunDir | None, opts: PackageOptions | None = None) -> PackageResult:
    """Build the device wheel of a run (or the generic ``edgemap-runtime`` wheel).

    Args:
        run_dir: the run directory or its RunDir (ignored, and may be None, with ``runtime_only``).
        opts: PackageOptions.

    Returns:
        PackageResult with the wheel path, its size and the model's, and the console command.

    Raises:
        PackageError: bad name/version/runtime/precision, no such artifact, build failure.
        ModelIntegrityError: the artifact changed since export.

    Example:
        >>> r = package("models/digits", PackageOptions(runtime="onnxruntime", precision="int8"))
        >>> r.pip_install
        'pip install models/digits/dist/digits_classifier-0.1.0.20261130101500+onnxruntime.m3fa2b9c1d2e4-py3-none-any.whl'
    """
    opts = opts or PackageOptions()
    caller = run_dir
    if isinstance(run_dir, RunDir):  # as export, evaluate, bench and report take it (read again: see fresh_run)
        run_dir = run_dir.path
    runtime = (opts.runtime or "onnxruntime").strip().lower()
    if runtime not in WHEEL_RUNTIMES:
        raise PackageError(f"--runtime {opts.runtime!r}: choose {' or '.join(WHEEL_RUNTIMES)}")
    requirements = [*BASE_REQUIREMENTS, WHEEL_RUNTIMES[runtime][1]]
    run, name, module, version, out, by_folder = _target(run_dir, opts, runtime)
    precision = model = info = None
    if run is not None:
        precision, model, info = _model_info(run, opts, runtime, requirements, name, version)
        version = info["version"]
    card = model_card(run, info or {"requirements": requirements}, name, version, module)
    warnings = _package_warnings(run, opts, runtime, precision) if run is not None else []
    dest, replaced, deps_changed = _build_into(out, name=name, module=module, version=version, requirements=requirements,
                                               runtime=runtime, model=model, info=info, card=card)
    if info is not None and sha256_file(model) != info["sha256"]:  # changed while we were building
        dest.unlink(missing_ok=True)
        raise PackageError(f"{model}: changed while packaging; run `edgemap package` again")
    if run is not None:
        note = _record_package(run, opts, dest)
        if note:
            warnings.append(note)
        hand_back(caller, run)
    return PackageResult(
        wheel=dest, name=name, module=module, version=version, command=name, runtime=runtime, precision=precision,
        model_sha256=info["sha256"] if info else None, model_bytes=info["bytes"] if info else None,
        wheel_bytes=dest.stat().st_size, requirements=requirements, replaced=replaced, warnings=warnings,
        replaced_requirements=deps_changed, named_after_run_folder=by_folder,
    )


def _target(run_dir: str | Path | None, opts: PackageOptions,
            runtime: str) -> tuple[RunDir | None, str, str, str, Path, bool]:
    """(the run or None for --runtime-only, distribution name, module name, version, output folder, whether the
    name was made from the run folder: no --name given now nor recorded by `edgemap run` for this runtime)."""
    if opts.runtime_only:
        from edgemap import __version__ as edgemap_version

        name, module = validate_name(opts.name or RUNTIME_DIST, allow_reserved=True)
        if name != RUNTIME_DIST:
            raise PackageError(f"--runtime-only builds {RUNTIME_DIST}; drop --name {opts.name!r}")
        if opts.precision is not None:
            raise PackageError(f"--runtime-only builds {RUNTIME_DIST}, which holds no model; drop --precision {opts.precision}")
        version = validate_version(opts.version or edgemap_version)
        out = Path(opts.out) if opts.out is not None else Path(run_dir) / "dist" if run_dir is not None else Path("dist")
        return None, name, module, version, out, False
    if run_dir is None:
        raise PackageError("RUN_DIR is required (or pass --runtime-only for the generic runtime wheel)")
    run = RunDir.load(run_dir)
    default_name = re.sub(r"[^a-z0-9]+", "-", run.path.resolve().name.lower()).strip("-")
    if default_name[:1].isdigit():  # runs/2024: a module cannot start with a digit (run failed here, after training)
        default_name = f"run-{default_name}"
    # one name per runtime: wheels for CPU and CUDA of one fp32 model differ only in their version's label, which
    # pip compares as text: `pip install -U --find-links dist NAME` on a GPU device took the CPU wheel
    suffix = "" if runtime == "onnxruntime" else f"-{runtime}"
    recorded = ((run.data.get("options") or {}).get("run") or {}).get("package")
    kept = (recorded.get("name") if isinstance(recorded, dict) and isinstance(recorded.get("name"), str)
            and (recorded.get("runtime") or "onnxruntime") == runtime else None)  # `run --name myapp`'s, same runtime
    name, module = validate_name(opts.name or kept or f"{default_name or 'edgemap'}-classifier{suffix}")
    by_folder = not (opts.name or kept)
    version = validate_version(opts.version or opts.default_version)  # checked now; the model's label comes later
    out = Path(opts.out) if opts.out is not None else run.own_folder("dist")
    return run, name, module, version, out, by_folder


def _model_info(run: RunDir, opts: PackageOptions, runtime: str, requirements: list[str], name: str,
                version: str) -> tuple[str, Path, dict[str, Any]]:
    """(precision, model file, model.json) of the artifact the wheel embeds; sets the runtime's and Pillow's
    requirement in ``requirements`` to what this model needs."""
    from edgemap.artifacts import model_run_mismatch
    from edgemap.runtime.onnx_meta import read_model_meta

    precision, key, model, entry = _choose_artifact(run, runtime, opts.precision)
    meta = read_model_meta(model)  # refuses external data / missing metadata before we ship it
    if runtime in ("onnxruntime", "cuda"):  # what this model needs: an opset-23 model fails to load on 1.18
        from edgemap.runtime.onnx_meta import onnxruntime_floor, parse_model_bytes

        dist, least = WHEEL_RUNTIMES[runtime][1].split(">=")
        floor = onnxruntime_floor(parse_model_bytes(model.read_bytes(), str(model)))
        requirements[-1] = f"{dist}>={max(floor, least, key=lambda v: tuple(map(int, v.split('.'))))}"
    requirements[1] = _pillow_requirement(meta)
    mismatch = model_run_mismatch(run, model)  # the card and model.json must say what the model does
    if mismatch:
        raise PackageError(mismatch)
    if opts.version is None:
        version = validate_version(default_model_version(opts.default_version, entry, runtime))
    return precision, model, {
        "file": MODEL_FILE,
        "sha256": entry["sha256"],
        "bytes": model.stat().st_size,
        "runtime": runtime,
        "precision": precision,
        "format": _known_format(entry.get("format", meta.format or ("fp32" if precision == "fp32" else "")), key),
        "artifact": key,
        "classes": run.classes,
        "contract": run.contract.to_dict(),
        "max_pixels": run.max_pixels,  # the decompression-bomb limit the model was trained with
        "backbone": run.backbone,
        "source_run": run.path.resolve().name,
        "versions": {k: v for k, v in run.data.get("versions", {}).items() if isinstance(v, str)},
        "requirements": requirements,
        "name": name,
        "version": version,
    }


def _package_warnings(run: RunDir, opts: PackageOptions, runtime: str, precision: str | None) -> list[str]:
    """What the wheel leaves out: int8 models made for other runtimes only, results of an earlier model."""
    warnings = []
    if (opts.precision is None and precision == "fp32" and any(k.startswith("onnx_int8_") for k in run.artifacts)
            and WHEEL_RUNTIMES[runtime][0] != "cuda"):  # int8 was exported, but not for this runtime: said, not silent
        warnings.append(f"packaged the fp32 model: the run has int8 models, but none for {runtime} (export --targets "
                        f"named others); `edgemap export {shlex.quote(str(run.path))} --int8 --targets "
                        f"{WHEEL_RUNTIMES[runtime][0]}` makes it")
    for stage in ("eval", "bench"):
        old = current_results(run, stage)[1]
        if old:
            warnings.append(f"{len(old)} {stage} result row(s) were measured on an earlier model and are left out of "
                            f"the model card; run `edgemap {stage} {shlex.quote(str(run.path))}` and package again")
    return warnings


def _build_into(out: Path, *, name: str, module: str, version: str, requirements: list[str], runtime: str,
                model: Path | None, info: dict[str, Any] | None, card: str) -> tuple[Path, bool, bool]:
    """Build the wheel and copy it into ``out``: (its path there, whether it replaced a wheel of other contents,
    and whether that one asked for other packages)."""
    with tempfile.TemporaryDirectory(prefix="edgemap-package-", ignore_cleanup_errors=True) as tmp:
        src, built = Path(tmp) / "src", Path(tmp) / "wheel"
        _write_tree(src, name=name, module=module, version=version, requirements=requirements,
                    runtime=runtime, model=model, info=info, card=card)
        whl = _build_wheel(src, built)
        _check_wheel(whl, module, info["sha256"] if info else None)
        out.mkdir(parents=True, exist_ok=True)
        with writers_lock(out):  # another package command writing into this folder (a shared wheelhouse) goes first
            remove_stale_temps(out)  # a wheel copy cut short by a kill -9 (no other writer can hold a temp now)
            dest = out / whl.name
            if dest.resolve().parent != out.resolve():
                raise PackageError(f"wheel name {whl.name!r} would land outside {out}")
            replaced = dest.is_file() and _contents(dest) != _contents(whl)
            deps_changed = replaced and _requires(dest) != _requires(whl)
            with atomic_path(dest) as tmp_dest:
                shutil.copyfile(whl, tmp_dest)
                os.chmod(tmp_dest, 0o644)  # mkstemp makes 0600; a wheel is meant to be shared
    return dest, replaced, deps_changed


def _record_package(run: RunDir, opts: PackageOptions, wheel: Path) -> str | None:
    """Record the wheel and the options it was built with, as `edgemap run` records its package stage: a later
    `edgemap run` on this run then advertises this wheel and rebuilds with this --name/--version (it knew only its
    own, and built and printed a wheel of the default name). A warning when the run cannot be written."""
    import dataclasses

    from edgemap.errors import EdgemapError
    from edgemap.manifest import fresh_run, run_lock, run_relative

    try:
        with run_lock(run.path, "package"):
            now = fresh_run(run)
            now.set_stage("package", "done", save=False, wheel=run_relative(now.path, wheel))
            given = json.loads(json.dumps(dataclasses.asdict(opts), default=str))
            if opts.out is not None:  # a relative --out is this command's working directory's, not a later one's
                given["out"] = str(Path(opts.out).absolute())
            recorded = now.data.setdefault("options", {}).setdefault("run", {})
            old = recorded.get("package") if isinstance(recorded.get("package"), dict) else {}
            if (old.get("runtime") or "onnxruntime") != given["runtime"]:  # a name is one runtime's (see _target)
                old = {k: v for k, v in old.items() if k not in ("name", "version")}
            # what this command was not given keeps the run's recorded value (a bare `edgemap package` erased the
            # --name an `edgemap run` had been given, and the next run rebuilt the default name)
            recorded["package"] = {**old, **{k: v for k, v in given.items() if v is not None or k not in old}}
            now.save()
            hand_back(run, now)
    except (OSError, EdgemapError) as e:
        return (f"the wheel was not recorded in the run ({' '.join(str(e).split())}): `edgemap run` on it will "
                "not know this wheel or its --name")
    return None


def _requires(wheel: Path) -> list[str] | None:
    """A wheel's Requires-Dist lines (None: unreadable)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            return sorted(line for line in z.read(meta).decode("utf-8", "replace").splitlines()
                          if line.startswith("Requires-Dist:"))
    except (OSError, zipfile.BadZipFile, StopIteration, KeyError):
        return None


def _contents(wheel: Path) -> dict[str, int] | None:
    """A wheel's files and their CRC-32 (builds differ in timestamps only when nothing changed)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return {i.filename: i.CRC for i in z.infolist()}
    except (OSError, zipfile.BadZipFile):
        return None
