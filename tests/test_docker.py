"""docker/Dockerfile.* cannot rot: each is parsed and its install and run steps are replayed.

No docker engine runs here, so a tiny interpreter replays a Dockerfile in a fresh venv
(``python -m venv``, never ``--system-site-packages``) standing for the image's Python:

- ``FROM`` is checked against the expected base; ``ARG``/``ENV`` become the environment of the
  steps (``--build-arg`` values given by the test); ``USER`` is recorded.
- ``COPY`` copies from the build context (the wheel's folder) into a temp "image root"; the
  image paths ``/wheels`` and ``/opt/venv`` are mapped to that root and to the venv. A step
  naming any other absolute path (but ``/dev/null``) fails the replay, so nothing touches
  this machine outside the temp folders.
- ``RUN`` steps run with ``/bin/sh -c``, the venv's bin first on PATH, except two kinds that
  describe the base image and are documented as skipped: ``apt-get`` (system packages:
  python3 itself) and ``python3 -m venv /opt/venv`` (the replay's fresh venv *is* that venv).
- ``ENTRYPOINT`` + ``CMD`` (exec form) are run with the test's arguments.

The CUDA file is replayed with ``onnxruntime`` in place of ``onnxruntime-gpu``: the GPU
build is a ~300 MB download that needs CUDA/cuDNN libraries no test machine has, and both
builds provide the same ``onnxruntime`` module. Its wheel is likewise the ``--runtime onnxruntime``
fp32 wheel, which differs from the ``--runtime cuda`` one only in asking for ``onnxruntime``
(tests/test_package.py checks the cuda wheel itself). The replay therefore checks that the file
parses, that its install steps and the ``--help`` smoke step work, and that its entrypoint
(which asks for ``--runtime cuda``) exits 2 with "unavailable: <reason>" and no traceback.
The image's Python differs too (Ubuntu 24.04's 3.12 there, this machine's 3.11 here).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_package_support import PROB_TOL, PROB_TOL_OPENVINO, fresh_venv, make_exported_run

from edgemap.package import PackageOptions, package
from edgemap.runtime.classifier import Classifier

DOCKER = Path(__file__).resolve().parents[1] / "docker"
BASES = {
    "Dockerfile.cpu": r"python:3\.11-slim",
    "Dockerfile.openvino": r"python:3\.11-slim",
    "Dockerfile.cuda": r"nvidia/cuda:12\.[0-9.]+-cudnn-runtime-ubuntu[0-9.]+",
}
KNOWN = {"FROM", "ARG", "ENV", "COPY", "RUN", "USER", "ENTRYPOINT", "CMD", "LABEL", "WORKDIR"}
SKIPPED_RUN = (re.compile(r"^apt-get\b"), re.compile(r"^python3? -m venv /opt/venv$"))
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; comments dropped, ``\\`` continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def expand(text: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), text)


@dataclass
class Replay:
    """Replays one Dockerfile: ``build()`` runs its steps, ``run(args)`` its entrypoint."""

    dockerfile: Path
    context: Path
    build_args: dict[str, str]
    work: Path
    substitute: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    base: str = ""
    user: str = ""
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = self.work / "image-root"
        self.root.mkdir(parents=True)
        self.py = fresh_venv(self.work / "venv")
        self.venv = self.py.parent.parent
        self.map = {"/opt/venv": str(self.venv), "/wheels": str(self.root / "wheels")}
        self.env = {"PATH": f"{self.py.parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.work), "LANG": "C.UTF-8"}
        # how this machine reaches the package index (an image has its own); the Dockerfile's ENV still wins
        self.env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})

    def map_paths(self, text: str) -> str:
        for img, real in self.map.items():
            text = re.sub(rf"(?<![\w./-]){re.escape(img)}(?=/|\b|$)", lambda _m, r=real: r, text)
        return text

    def check_paths(self, text: str) -> None:
        allowed = (str(self.work), "/dev/null")
        for m in re.finditer(r"(?<![\w.$}/-])/[\w.-]+(?:/[\w.-]*)*", text):
            assert m.group(0).startswith(allowed), f"replay refuses an unmapped image path {m.group(0)!r} in: {text}"

    def build(self) -> None:
        for instr, rest in parse_dockerfile(self.dockerfile.read_text(encoding="utf-8")):
            assert instr in KNOWN, f"{self.dockerfile.name}: teach the replay about {instr}"
            getattr(self, f"_{instr.lower()}")(rest)

    def _from(self, rest: str) -> None:
        self.base = rest

    def _arg(self, rest: str) -> None:
        name, _, default = rest.partition("=")
        value = self.build_args.get(name, default)
        assert value, f"{self.dockerfile.name}: build arg {name} needs a value"
        self.env[name] = value

    def _env(self, rest: str) -> None:
        for pair in shlex.split(rest):
            k, _, v = pair.partition("=")
            self.env[k] = self.map_paths(expand(v, self.env))

    def _copy(self, rest: str) -> None:
        src, dest = (expand(x, self.env) for x in shlex.split(rest))
        real = Path(self.map_paths(dest))
        self.check_paths(str(real))
        if dest.endswith("/"):
            real.mkdir(parents=True, exist_ok=True)
            real = real / Path(src).name
        shutil.copyfile(self.context / src, real)

    def _run(self, rest: str) -> None:
        if any(p.match(rest) for p in SKIPPED_RUN):
            self.skipped.append(rest)
            return
        for old, new in self.substitute.items():
            rest = rest.replace(old, new)
        script = self.map_paths(rest)
        self.check_paths(script)
        proc = subprocess.run(["/bin/sh", "-c", script], env=self.env, capture_output=True, text=True, cwd=self.work)
        assert proc.returncode == 0, f"RUN {rest}\n{proc.stdout}\n{proc.stderr}"

    def _user(self, rest: str) -> None:
        self.user = rest

    def _entrypoint(self, rest: str) -> None:
        self.entrypoint = json.loads(rest)

    def _cmd(self, rest: str) -> None:
        self.cmd = json.loads(rest)

    def _label(self, rest: str) -> None:
        pass

    def _workdir(self, rest: str) -> None:
        pass

    def run(self, args: list[str] | None = None) -> subprocess.CompletedProcess:
        """``docker run IMAGE [args]``: entrypoint + (args or CMD)."""
        argv = self.entrypoint + (self.cmd if args is None else args)
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, cwd=self.work)


# ---- parsing (fast) ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BASES))
def test_dockerfile_parses(name: str) -> None:
    steps = parse_dockerfile((DOCKER / name).read_text(encoding="utf-8"))
    instrs = [i for i, _ in steps]
    assert set(instrs) <= KNOWN and instrs[0] == "FROM"
    assert re.fullmatch(BASES[name], steps[0][1]), steps[0][1]
    args = {r.partition("=")[0] for i, r in steps if i == "ARG"}
    assert {"WHEEL", "COMMAND"} <= args
    runs = " && ".join(r for i, r in steps if i == "RUN")
    assert "pip install" in runs and "${WHEEL}" in runs and "torch" not in runs
    ep = json.loads(next(r for i, r in steps if i == "ENTRYPOINT"))
    assert ep[:2] == ["/bin/sh", "-c"] and "EDGEMAP_COMMAND" in ep[2]
    assert json.loads(next(r for i, r in steps if i == "CMD")) == ["--help"]
    assert ("USER", "nobody") in steps
    if name == "Dockerfile.cuda":
        # the `--runtime cuda` wheel asks for onnxruntime-gpu itself: installed after it (capped for the base's CUDA),
        # with its own requirements (its Pillow series: --no-deps installed whatever Pillow was newest)
        assert "--runtime cuda" in ep[2] and "--no-deps" not in runs
        assert -1 < runs.index('"onnxruntime-gpu') < runs.index("${WHEEL}"), runs
        assert "edgemap package models/digits --runtime cuda " in (DOCKER / name).read_text(encoding="utf-8")
        # the CUDA major of the base and of onnxruntime-gpu agree: 1.27+ are CUDA 13 builds (their PyPI metadata)
        cuda_major = int(re.match(r"nvidia/cuda:(\d+)\.", steps[0][1]).group(1))
        spec = re.search(r'"onnxruntime-gpu([^"]*)"', runs).group(1)
        assert ("<1.27" in spec) == (cuda_major == 12), (steps[0][1], spec)


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = "# c\nFROM x\nRUN a \\\n  && b\n\n# d\nCMD [\"y\"]\n"
    assert parse_dockerfile(text) == [("FROM", "x"), ("RUN", "a && b"), ("CMD", '["y"]')]


# ---- replays in fresh venvs (slow) ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny run trained briefly and exported by `edgemap export --int8` (fp32, QOperator, QDQ)."""
    root = tmp_path_factory.mktemp("docker") / "ctx é 日本"
    root.mkdir()
    run, val = make_exported_run(root)
    return {"root": root, "run": run, "val": val}


def _replay(tiny: dict, tmp_path: Path, dockerfile: str, opts: PackageOptions, substitute: dict | None = None) -> Replay:
    r = package(tiny["run"].path, opts)
    rp = Replay(DOCKER / dockerfile, r.wheel.parent, {"WHEEL": r.wheel.name, "COMMAND": r.command}, tmp_path,
                substitute or {})
    rp.build()
    return rp


def _check_predictions(rp: Replay, tiny: dict, runtime: str, key: str, tol: float) -> None:
    out = rp.run([*map(str, tiny["val"]), "--json", "--top-k", "3"])
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    clf = Classifier.from_path(tiny["run"].artifact_path(key), runtime=runtime)
    preds = clf.predict(tiny["val"], top_k=3)
    assert [r["label"] for r in rows] == [p.label for p in preds]
    assert max(abs(r["prob"] - p.prob) for r, p in zip(rows, preds, strict=True)) <= tol
    help_ = rp.run()  # the image's default CMD
    assert help_.returncode == 0 and "IMAGE" in help_.stdout


@pytest.mark.slow
def test_replay_cpu(tiny: dict, tmp_path: Path) -> None:
    rp = _replay(tiny, tmp_path, "Dockerfile.cpu", PackageOptions(runtime="onnxruntime", name="dock-cpu", out=tmp_path / "dist"))
    assert rp.skipped == [] and rp.user == "nobody"
    _check_predictions(rp, tiny, "onnxruntime", "onnx_int8_qoperator", PROB_TOL)
    r = subprocess.run([str(rp.py), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0


@pytest.mark.slow
@pytest.mark.openvino
def test_replay_openvino(tiny: dict, tmp_path: Path) -> None:
    rp = _replay(tiny, tmp_path, "Dockerfile.openvino",
                 PackageOptions(runtime="openvino", precision="int8", name="dock-ov", out=tmp_path / "dist"))
    r = subprocess.run([str(rp.py), "-c", "import openvino, importlib.util as u; print(u.find_spec('onnxruntime'))"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "None", "the openvino wheel must not pull onnxruntime"
    _check_predictions(rp, tiny, "openvino", "onnx_int8_qdq", PROB_TOL_OPENVINO)


@pytest.mark.slow
def test_replay_cuda_reports_unavailable(tiny: dict, tmp_path: Path) -> None:
    # the stand-in for the --runtime cuda wheel (see the module's docstring)
    rp = _replay(tiny, tmp_path, "Dockerfile.cuda",
                 PackageOptions(runtime="onnxruntime", precision="fp32", name="dock-cuda", out=tmp_path / "dist"),
                 substitute={"onnxruntime-gpu": "onnxruntime"})
    assert len(rp.skipped) == 2  # apt-get (python3) and the venv the replay already made
    out = rp.run([str(tiny["val"][0])])
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "runtime 'cuda' unavailable:" in out.stderr and "Traceback" not in out.stderr
