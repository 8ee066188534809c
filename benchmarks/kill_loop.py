"""Fault injection: SIGKILL every writing stage at random points and check nothing good is lost.

For each stage that writes (finetune checkpoints, export, export --int8, package) the stage
runs as a subprocess (``python -m edgemap ...``, ``tiny`` backbone at 32 px, a generated
3-class PNG dataset) and is killed with SIGKILL either after a random delay or the moment a
temp file (``*.edgemap-tmp``) appears, i.e. mid-write. After every kill:

- ``edgemap.json`` parses (``RunDir.load``) and every artifact it names exists with the
  recorded sha256 (``RunDir.artifact_path`` on each); ONNX artifacts load in ONNX Runtime;
  the training state loads (``checkpoint.read_state``); wheels are valid zips whose model
  hashes to the sha256 in their ``model.json``;
- the previous good artifacts (recorded before the kill) are intact: each one is either
  unchanged or replaced by a newer one that passes the same checks;
- a temp file may remain (the kill landed mid-write, by design) but is never named as an
  artifact, and the next run of the stage removes it;
- re-running the stage completes (the last run of every stage is left to finish).

Usage::

    python benchmarks/kill_loop.py --kills 60              # >= 50 kills across the stages
    python benchmarks/kill_loop.py --kills 8 --json out.json

Prints the kills per stage and the number of lost/corrupt artifacts (must be 0); exits 1
when any check failed. Columns: mid-write / after-replace = kills at those points (the rest
after a random delay); completed = runs that finished before their kill or as the final
re-run; temps left = temp files present right after a kill (one that survives several
kills, because the next run was killed before its cleanup, counts each time); removed next
= of those, gone after the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TMP_SUFFIX = ".edgemap-tmp"
STAGES = ("finetune", "export", "quantize", "package")
FINETUNE_ARGS = ["--backbone", "tiny", "--img-size", "32", "--epochs", "4", "--freeze-epochs", "1", "--no-flip",
                 "--threads", "1", "--batch-size", "16", "--checkpoint-every", "3"]
# export --int8 alternates calibration sizes so that re-runs write different int8 bytes:
# a kill between the file replace and the manifest update would then show as a mismatch.
QUANT_ARGS = (["--int8", "--targets", "cpu,openvino", "--calib-size", "24"],
              ["--int8", "--targets", "cpu,openvino", "--calib-size", "30"])


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------
def write_dataset(root: Path, n_train: int = 24, n_val: int = 8, seed: int = 0) -> Path:
    """DATA/train|val/<class>/*.png: three brightness classes with noise (learnable in seconds)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(("bright", "dark", "mid")):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            lo = (175, 15, 95)[label]
            for i in range(n):
                img = rng.integers(lo, lo + 50, (32, 32, 1)) + rng.integers(-20, 21, (32, 32, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def edgemap_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgemap", *args]


def run_to_end(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------
def temp_files(folder: Path) -> list[Path]:
    """Temp files under ``folder`` while a process may be deleting its work folders (os.walk skips a vanished one;
    Path.rglob raised FileNotFoundError when an `.export-work-*` folder went away mid-listing)."""
    return sorted(Path(root) / name for root, _dirs, files in os.walk(folder) for name in files if name.endswith(TMP_SUFFIX))


def work_dirs(folder: Path) -> list[Path]:
    """Temp folders export makes inside the run dir (quantization work, calibration)."""
    return sorted(p for p in folder.glob(".export-work-*")) if folder.exists() else []


def check_run(run_path: Path) -> tuple[dict[str, str], list[str]]:
    """Validate a run directory; return (artifact key → sha256, problems)."""
    from edgemap.errors import EdgemapError
    from edgemap.manifest import MANIFEST_NAME, RunDir

    problems: list[str] = []
    shas: dict[str, str] = {}
    if not (run_path / MANIFEST_NAME).exists():
        return shas, problems
    try:
        json.loads((run_path / MANIFEST_NAME).read_text(encoding="utf-8"))
        run = RunDir.load(run_path)
    except (EdgemapError, ValueError) as e:
        return shas, [f"manifest unreadable: {e}"]
    for key, entry in run.artifacts.items():
        if entry["path"].endswith(TMP_SUFFIX):
            problems.append(f"artifact {key} names a temp file {entry['path']}")
        try:
            p = run.artifact_path(key)
        except EdgemapError as e:
            problems.append(f"artifact {key}: {e}")
            continue
        shas[key] = entry["sha256"]
        if p.suffix == ".onnx":
            problems += _check_onnx(p)
        elif p.suffix == ".safetensors":
            problems += _check_safetensors(p)
    return shas, problems


def _check_onnx(p: Path) -> list[str]:
    from edgemap.runtime.sessions import SessionOptions, load

    try:
        s = load(p, "cpu", SessionOptions(threads=1))
        s.run(np.zeros((1, 32, 32, 3), np.uint8))
    except Exception as e:  # noqa: BLE001 - any failure is a corrupt artifact
        return [f"{p.name}: does not load in ONNX Runtime ({e})"]
    return []


def _check_safetensors(p: Path) -> list[str]:
    from safetensors.torch import load_file

    try:
        load_file(str(p))
    except Exception as e:  # noqa: BLE001
        return [f"{p.name}: does not load ({e})"]
    return []


def check_state(run_path: Path) -> list[str]:
    from edgemap.errors import EdgemapError
    from edgemap.train import checkpoint as ckpt

    if not (run_path / ckpt.STATE_FILE).exists():
        return []
    try:
        ckpt.read_state(run_path)
    except EdgemapError as e:
        return [f"training state: {e}"]
    return []


def check_wheels(dist: Path) -> tuple[dict[str, str], list[str]]:
    """Every wheel in ``dist`` is a valid zip whose model hashes to its model.json sha256."""
    import hashlib

    problems: list[str] = []
    shas: dict[str, str] = {}
    for whl in sorted(dist.glob("*.whl")) if dist.exists() else []:
        try:
            with zipfile.ZipFile(whl) as z:
                bad = z.testzip()
                if bad:
                    problems.append(f"{whl.name}: corrupt member {bad}")
                    continue
                mj = next(n for n in z.namelist() if n.endswith("/model.json"))
                info = json.loads(z.read(mj))
                model = z.read(mj.rsplit("/", 1)[0] + "/" + info["file"])
                if hashlib.sha256(model).hexdigest() != info["sha256"]:
                    problems.append(f"{whl.name}: embedded model does not match model.json")
        except (zipfile.BadZipFile, StopIteration, KeyError, ValueError, OSError) as e:
            problems.append(f"{whl.name}: not a valid wheel ({type(e).__name__}: {e})")
            continue
        shas[whl.name] = hashlib.sha256(whl.read_bytes()).hexdigest()
    return shas, problems


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
@dataclass
class StageStats:
    kills: int = 0
    mid_write_kills: int = 0
    after_replace_kills: int = 0
    completed_runs: int = 0
    temps_left_by_kill: int = 0
    temps_removed_by_next_run: int = 0
    lost_or_corrupt: int = 0
    problems: list[str] = field(default_factory=list)


def _stamps(folder: Path, suffixes: tuple[str, ...] = (".onnx", ".safetensors", ".whl")) -> dict[Path, tuple[int, int]]:
    out = {}
    for p in folder.rglob("*") if folder.exists() else []:
        if p.suffix in suffixes:
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out[p] = (st.st_mtime_ns, st.st_ino)
    return out


def spawn_and_kill(cmd: list[str], watch: Path, delay: float, mode: str, timeout: float = 300) -> tuple[bool, int]:
    """Run ``cmd`` and SIGKILL it; return (killed, returncode), killed False when it finished first.

    ``mode``: ``random`` kills after ``delay`` s; ``mid-write`` the moment a new temp file
    appears under ``watch``; ``after-replace`` the moment an artifact file under ``watch`` was
    replaced (the window between ``os.replace`` and the manifest update).
    """
    old = set(temp_files(watch))  # left by an earlier kill: the run is expected to remove them
    stamps = _stamps(watch) if mode == "after-replace" else {}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + (delay if mode == "random" else timeout)
    try:
        while proc.poll() is None:
            hit = time.monotonic() >= deadline
            if mode == "mid-write":
                hit = hit or bool(set(temp_files(watch)) - old)
            elif mode == "after-replace":
                now = _stamps(watch)
                hit = hit or any(k in stamps and v != stamps[k] for k, v in now.items())
                stamps.update({k: v for k, v in now.items() if k not in stamps})  # new files: wait for their next replace
            if hit:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True, proc.returncode
            time.sleep(0.01 if mode == "random" else 0.001)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False, proc.returncode


MODES = ("random", "mid-write", "after-replace")


class Loop:
    """State shared by the stages: the work folder, the dataset, the good run."""

    def __init__(self, work: Path, seed: int, log: Callable[[str], None] = print):
        self.work, self.rng, self.log = work, random.Random(seed), log
        self.data = write_dataset(work / "data set é")
        self.good = work / "good run 日本"
        self.stats = {s: StageStats() for s in STAGES}
        self.durations: dict[str, float] = {}
        self.seen: set[str] = set()

    # ---- baseline -------------------------------------------------------------------------
    def prepare(self, stages: tuple[str, ...]) -> None:
        """Make the good artifacts the loops must not lose, timing each stage once."""
        steps = [("finetune", edgemap_cmd("finetune", str(self.data), "--out", str(self.good), *FINETUNE_ARGS)),
                 ("export", edgemap_cmd("export", str(self.good))),
                 ("quantize", edgemap_cmd("export", str(self.good), *QUANT_ARGS[0])),
                 ("package", edgemap_cmd("package", str(self.good), "--out", str(self.good / "dist")))]
        need = max(STAGES.index(s) for s in stages)
        for name, cmd in steps[: need + 1]:
            t0 = time.monotonic()
            run_to_end(cmd)
            self.durations[name] = time.monotonic() - t0
            self.log(f"baseline {name}: {self.durations[name]:.1f} s")

    def _delay(self, stage: str) -> float:
        return self.rng.uniform(0.05, 1.05) * self.durations[stage]

    def _record(self, st: StageStats, problems: list[str], where: str) -> None:
        """Count each distinct problem once (a broken artifact stays broken over several kills)."""
        new = [p for p in problems if p not in self.seen]
        self.seen.update(new)
        if new:
            st.lost_or_corrupt += len(new)
            st.problems += [f"{where}: {p}" for p in new]
            self.log(f"  !! {where}: {new}")

    # ---- finetune -------------------------------------------------------------------------
    def _finetune_cmd(self, out: Path) -> list[str]:
        from edgemap.manifest import MANIFEST_NAME

        resume = ["--resume"] if (out / MANIFEST_NAME).exists() else []  # a killed run continues
        return edgemap_cmd("finetune", str(self.data), "--out", str(out), *FINETUNE_ARGS, *resume)

    def finetune(self, kills: int) -> None:
        from edgemap.manifest import MANIFEST_NAME, RunDir

        st = self.stats["finetune"]
        n_run = 0
        out = self.work / f"ft {n_run}"
        good_shas: dict[str, str] = {}
        leftovers: list[Path] = []
        while st.kills < kills:
            if (out / MANIFEST_NAME).exists() and RunDir.load(out).stage_done("finetune"):
                n_run += 1
                out, good_shas = self.work / f"ft {n_run}", {}
            mode = self.rng.choice(MODES)
            killed, rc = spawn_and_kill(self._finetune_cmd(out), out, self._delay("finetune"), mode)
            st.kills += killed
            st.mid_write_kills += killed and mode == "mid-write"
            st.after_replace_kills += killed and mode == "after-replace"
            if not killed:
                st.completed_runs += rc == 0
                if rc != 0:
                    self._record(st, [f"run exited {rc} instead of completing"], f"finetune run {n_run}")
            shas, problems = check_run(out)
            problems += check_state(out)
            problems += self._lost(good_shas, shas)
            self._record(st, problems, f"finetune kill {st.kills}")
            st.temps_removed_by_next_run += sum(not p.exists() for p in leftovers)
            leftovers = temp_files(out)
            st.temps_left_by_kill += len(leftovers)
            good_shas = shas
        if not ((out / MANIFEST_NAME).exists() and RunDir.load(out).stage_done("finetune")):
            self._complete("finetune", self._finetune_cmd(out), out, leftovers)

    @staticmethod
    def _lost(before: dict[str, str], after: dict[str, str]) -> list[str]:
        """A good artifact recorded before the kill must still be recorded (same or a newer verified file)."""
        return [f"artifact {k} lost (was {v[:12]}…)" for k, v in before.items() if k not in after]

    # ---- export / quantize ----------------------------------------------------------------
    def export(self, stage: str, kills: int) -> None:
        st = self.stats[stage]
        before, problems = check_run(self.good)
        if problems:
            raise RuntimeError(f"the good run is already broken: {problems}")
        leftovers: list[Path] = []
        i = 0
        while st.kills < kills:
            args = QUANT_ARGS[i % 2] if stage == "quantize" else []
            i += 1
            mode = self.rng.choice(MODES)
            killed, rc = spawn_and_kill(edgemap_cmd("export", str(self.good), *args), self.good, self._delay(stage), mode)
            st.kills += killed
            st.mid_write_kills += killed and mode == "mid-write"
            st.after_replace_kills += killed and mode == "after-replace"
            if not killed:
                st.completed_runs += rc == 0
            shas, problems = check_run(self.good)
            problems += self._lost(before, shas)
            self._record(st, problems, f"{stage} kill {st.kills}")
            st.temps_removed_by_next_run += sum(not p.exists() for p in leftovers)
            leftovers = temp_files(self.good) + work_dirs(self.good)
            st.temps_left_by_kill += len(leftovers)
            before = shas
        args = QUANT_ARGS[i % 2] if stage == "quantize" else []
        self._complete(stage, edgemap_cmd("export", str(self.good), *args), self.good, leftovers)

    # ---- package --------------------------------------------------------------------------
    def package(self, kills: int) -> None:
        st = self.stats["package"]
        dist = self.good / "dist"
        before, problems = check_wheels(dist)
        if problems or not before:
            raise RuntimeError(f"no good wheel to protect: {problems}")
        leftovers: list[Path] = []
        cmd = edgemap_cmd("package", str(self.good), "--out", str(dist))
        while st.kills < kills:
            mode = self.rng.choice(MODES)
            killed, rc = spawn_and_kill(cmd, dist, self._delay("package"), mode)
            st.kills += killed
            st.mid_write_kills += killed and mode == "mid-write"
            st.after_replace_kills += killed and mode == "after-replace"
            if not killed:
                st.completed_runs += rc == 0
            shas, problems = check_wheels(dist)
            problems += [f"wheel {k} lost" for k in before if k not in shas]
            _, run_problems = check_run(self.good)
            self._record(st, problems + run_problems, f"package kill {st.kills}")
            st.temps_removed_by_next_run += sum(not p.exists() for p in leftovers)
            leftovers = temp_files(dist)
            st.temps_left_by_kill += len(leftovers)
            before = shas
        self._complete("package", cmd, dist, leftovers)

    # ---- the run that must finish -----------------------------------------------------------
    def _complete(self, stage: str, cmd: list[str], folder: Path, leftovers: list[Path]) -> None:
        st = self.stats[stage]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
        if r.returncode != 0:
            self._record(st, [f"re-run did not complete ({r.returncode}): {r.stderr.strip()[-300:]}"], f"{stage} re-run")
            return
        st.completed_runs += r.returncode == 0
        st.temps_removed_by_next_run += sum(not p.exists() for p in leftovers)
        left = temp_files(folder) + (work_dirs(folder) if stage in ("export", "quantize") else [])
        if left:
            self._record(st, [f"temp files remain after a completed run: {[p.name for p in left]}"], f"{stage} re-run")
        _, problems = check_run(self.good if stage != "finetune" else folder)
        self._record(st, problems, f"{stage} re-run")


def run_loop(kills: int, stages: tuple[str, ...] = STAGES, seed: int = 0, work: Path | None = None,
             log: Callable[[str], None] = print) -> dict[str, StageStats]:
    """Run the kill loop; ``kills`` is the total, spread evenly over ``stages``."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="edgemap-kill-loop-")) if own else work
    try:
        loop = Loop(work, seed, log)
        loop.prepare(stages)
        per = [kills // len(stages) + (i < kills % len(stages)) for i in range(len(stages))]
        for stage, n in zip(stages, per):
            t0 = time.monotonic()
            if stage == "finetune":
                loop.finetune(n)
            elif stage == "package":
                loop.package(n)
            else:
                loop.export(stage, n)
            s = loop.stats[stage]
            log(f"{stage}: {s.kills} kills ({s.mid_write_kills} mid-write, {s.after_replace_kills} after-replace) in {time.monotonic() - t0:.0f} s, "
                f"lost/corrupt {s.lost_or_corrupt}")
        return {s: loop.stats[s] for s in stages}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=60, help="total SIGKILLs, spread over the stages (default 60)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    a = ap.parse_args()
    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip())
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}")
    t0 = time.monotonic()
    stats = run_loop(a.kills, stages, a.seed)
    total = sum(s.kills for s in stats.values())
    lost = sum(s.lost_or_corrupt for s in stats.values())
    print(f"\n{'stage':<10}{'kills':>7}{'mid-write':>11}{'after-repl':>11}{'completed':>11}{'temps left':>12}"
          f"{'removed next':>14}{'lost/corrupt':>14}")
    for name, s in stats.items():
        print(f"{name:<10}{s.kills:>7}{s.mid_write_kills:>11}{s.after_replace_kills:>11}{s.completed_runs:>11}"
              f"{s.temps_left_by_kill:>12}{s.temps_removed_by_next_run:>14}{s.lost_or_corrupt:>14}")
    print(f"{'total':<10}{total:>7}{'':>11}{'':>11}{'':>11}{'':>12}{'':>14}{lost:>14}   ({time.monotonic() - t0:.0f} s)")
    for name, s in stats.items():
        for p in s.problems:
            print(f"  {name}: {p}")
    if a.json:
        a.json.write_text(json.dumps({k: {**vars(v)} for k, v in stats.items()}, indent=2))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
