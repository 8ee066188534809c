"""The run directory and its ``edgemap.json``: the only thing later stages read.

Layout of a run directory::

    RUN_DIR/
      edgemap.json                manifest (this module)
      metrics.jsonl               one JSON line per epoch
      weights/best.safetensors    best weights (by validation accuracy)
      weights/last.safetensors    last weights
      state/                      resumable training state (safetensors + JSON)
      model.onnx, model.int8.*    export artifacts

Every artifact is recorded with its sha256 and the stage that wrote it; loading an
artifact whose bytes changed is refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import platform
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edgemap.errors import ManifestError, ModelIntegrityError, RunBusyError, RunNotWritableError
from edgemap.fsutil import (
    FolderBusy,
    FolderNotWritable,
    UnsafeLockFile,
    atomic_path,
    atomic_write_bytes,
    folder_lock,
    json_text,
    sha256_file,
)
from edgemap.runtime.preprocess import DEFAULT_MAX_PIXELS, PreprocessContract
from edgemap.runtime.text import has_control_chars, printable

MANIFEST_NAME = "edgemap.json"
STAGE_ORDER = ("finetune", "export", "eval", "bench", "package", "report")  # each stage reads what the ones before made
SCHEMA_VERSION = 1
MAX_IMG_SIZE = 8192  # the largest model input side a run may record (finetune refuses more before it starts)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_PACKAGES = ("edgemap", "torch", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino")

# key -> (type, required)
_TOP_LEVEL: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "schema": (int, True),
    "backbone": (dict, True),
    "classes": (list, True),
    "preprocess": (dict, True),
    "artifacts": (dict, True),
    "stages": (dict, True),
    "options": (dict, False),
    "dataset": (dict, False),
    "metrics": (dict, False),
    "versions": (dict, False),
    "created": (str, False),
    "pending": (dict, False),  # artifacts being replaced (RunDir.write_artifact's journal)
}


def run_relative(run_path: str | Path, made: str | Path) -> str:
    """How a run records a file it made (a wheel, a report): relative to the run directory when inside it (the run
    can move), else absolute."""
    p = Path(made).absolute()
    try:
        return str(p.relative_to(Path(run_path).absolute()))
    except ValueError:
        return str(p)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape artifacts (missing ones are left out)."""
    out = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@contextlib.contextmanager
def run_lock(path: str | Path, command: str, create: bool = False) -> Iterator[None]:
    """Hold the run directory for one writing command (finetune, export, eval, bench, run).

    Two commands writing one run directory would delete each other's temp files and
    overwrite each other's ``edgemap.json`` updates; the second one is refused at once.
    Only a run directory (one with ``edgemap.json``) is locked, or, with ``create``, the
    folder finetune is about to make one in: no lock file lands in any other folder.

    Raises:
        RunBusyError: another process holds the run directory (its pid and command are named).
    """
    p = Path(path)
    if not (p / MANIFEST_NAME).is_file() and not (create and p.is_dir()):
        yield  # not a run directory: loading it reports that
        return
    try:
        with folder_lock(path, f"edgemap {command}"):
            yield
    except FolderNotWritable as e:
        where = shlex.quote(str(e.folder))
        fix = (f"The file system is read-only (chmod cannot help): copy the run (cp -r {where} COPY) and work on the copy"
               if "read-only file system" in str(e.why).lower() else
               f"Make it writable (chmod -R u+w {where}) or work on a copy (cp -r)")
        raise RunNotWritableError(
            f"{e.folder}: cannot write in this run directory ({e.why}); `edgemap {command}` records its results there. "
            + fix) from None
    except UnsafeLockFile as e:
        raise RunNotWritableError(
            f"{e.path} is a symlink (or not a plain file); edgemap never writes through it, since a run directory from "
            f"elsewhere could point it at one of your files. Remove it (rm {shlex.quote(str(e.path))}) and run "
            f"`edgemap {command}` again"
        ) from None
    except FolderBusy as e:
        raise RunBusyError(
            f"{e.folder} is in use by {e.holder or 'another edgemap process'}; wait until it finishes, then run "
            f"`edgemap {command}` again (two commands writing one run directory would lose each other's results)"
        ) from None


def _safe_rel_path(rel: str) -> bool:
    """A relative POSIX path that stays inside its folder: no '..', not absolute, no NUL, of a sane length."""
    if not rel or len(rel) > 1024 or "\0" in rel or "\\" in rel or rel.startswith("/") or ":" in rel.split("/")[0]:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _dataset_problems(ds: Any) -> list[str]:
    """The recorded dataset's shape: what rescans, the report and the model card read from it."""
    if ds is None:
        return []
    if not isinstance(ds, dict):
        return ["'dataset' must be an object"]
    problems = [f"'dataset.{k}' must be a string" for k in ("root", "layout", "fingerprint")
                if k in ds and not isinstance(ds[k], str)]
    counts = ds.get("counts", {})
    if not (isinstance(counts, dict) and all(
            isinstance(split, dict) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                            for n in split.values()) for split in counts.values())):
        problems.append("'dataset.counts' must map each split to {class: number of images}")
    skipped = ds.get("skipped", [])
    if not (isinstance(skipped, list) and all(isinstance(item, list) and item and all(isinstance(x, str) for x in item)
                                              for item in skipped)):
        problems.append("'dataset.skipped' must list [file, reason] pairs")
    ignored = ds.get("ignored", {})
    if not (isinstance(ignored, dict) and all(isinstance(n, int) for n in ignored.values())):
        problems.append("'dataset.ignored' must map file extensions to counts")
    return problems


def _class_problems(data: dict[str, Any]) -> list[str]:
    classes = data["classes"]
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        return ["'classes' must list at least two non-empty class names"]
    if len(set(classes)) != len(classes):
        return ["'classes' has duplicates"]
    if any(has_control_chars(c) for c in classes):
        return ["'classes' has a name with control characters (tab, newline, escape...)"]
    trained = data["dataset"].get("classes") if isinstance(data.get("dataset"), dict) else None
    if isinstance(trained, list) and trained != classes:  # reordered or renamed by hand: export's gate still
        # passed (it scores by index) and the models carried the wrong names
        return ["'classes' is not the class list the weights were trained with ('dataset.classes', in "
                "that order): the models would name the wrong classes; restore it"]
    return []


def _contract_problems(preprocess: Any) -> list[str]:
    try:
        c = PreprocessContract.from_dict(preprocess)
    except Exception as e:  # noqa: BLE001 - reported as a manifest problem
        return [f"'preprocess' invalid: {e}"]
    if not (8 <= c.height <= MAX_IMG_SIZE and 8 <= c.width <= MAX_IMG_SIZE):
        return [f"'preprocess' size {c.height}x{c.width} is outside 8..{MAX_IMG_SIZE}"]
    return []


def _option_problems(options: dict[str, Any]) -> list[str]:
    problems = [f"'options.{sub}' must be an object" for sub, value in options.items() if not isinstance(value, dict)]
    ft_options = options.get("finetune")
    dropout = ft_options.get("dropout", 0.2) if isinstance(ft_options, dict) else 0.2  # the model is built with it
    if not (isinstance(dropout, int | float) and not isinstance(dropout, bool) and 0 <= dropout <= 1):
        problems.append(f"'options.finetune.dropout' {str(dropout)[:20]!r} must be a number in [0, 1]")
    return problems


def _artifact_problems(name: str, art: Any) -> list[str]:
    if not isinstance(art, dict):
        return [f"artifact '{name}' must be an object"]
    problems = []
    if not isinstance(art.get("path"), str):
        problems.append(f"artifact '{name}'.path must be a string")
    elif not _safe_rel_path(art["path"]):  # a run from elsewhere must not make edgemap rename files outside
        problems.append(f"artifact '{name}'.path {art['path'][:80]!r} must be a relative path inside the run "
                        "directory (no '..', no absolute path)")
    if not isinstance(art.get("sha256"), str) or not _SHA_RE.match(art["sha256"]):
        problems.append(f"artifact '{name}'.sha256 must be 64 lowercase hex characters")
    if "bytes" in art and (not isinstance(art["bytes"], int) or isinstance(art["bytes"], bool) or art["bytes"] < 0):
        problems.append(f"artifact '{name}'.bytes must be a whole number of bytes")
    problems += [f"artifact '{name}'.{k} must be a string" for k in ("stage", "format", "precision", "created")
                 if k in art and not isinstance(art[k], str)]
    if isinstance(art.get("stage"), str) and art["stage"] not in STAGE_ORDER:  # printed in commands to run
        problems.append(f"artifact '{name}'.stage {art['stage'][:40]!r} is not one of {', '.join(STAGE_ORDER)}")
    if "runtimes" in art and not (isinstance(art["runtimes"], list) and all(isinstance(r, str) for r in art["runtimes"])):
        problems.append(f"artifact '{name}'.runtimes must be a list of runtime names")
    return problems


def validate_manifest(data: Any, where: str = MANIFEST_NAME) -> dict[str, Any]:
    """Check types and required keys of a manifest; raise ManifestError listing every problem."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: top level must be a JSON object, got {type(data).__name__}")
    problems: list[str] = []
    for key, (typ, required) in _TOP_LEVEL.items():
        if key not in data:
            if required:
                problems.append(f"missing key '{key}'")
            continue
        if not isinstance(data[key], typ) or isinstance(data[key], bool) and typ is int:
            problems.append(f"'{key}' must be {getattr(typ, '__name__', typ)}, got {type(data[key]).__name__}")
    if not problems:
        if data["schema"] > SCHEMA_VERSION:
            problems.append(f"schema {data['schema']} is newer than this edgemap understands ({SCHEMA_VERSION})")
        if not isinstance(data["backbone"].get("name"), str):
            problems.append("'backbone.name' must be a string")
        problems += _class_problems(data)
        problems += _contract_problems(data["preprocess"])
        problems += _option_problems(data.get("options") or {})
        problems += _dataset_problems(data.get("dataset"))
        finetune = (data.get("metrics") or {}).get("finetune")
        if finetune is not None and not (isinstance(finetune, dict) and isinstance(finetune.get("best", {}), dict)):
            problems.append("'metrics.finetune' (and its 'best') must be an object")
        for name, art in [*data["artifacts"].items(), *data.get("pending", {}).items()]:
            problems += _artifact_problems(name, art)
        for stage, info in data["stages"].items():
            if not isinstance(info, dict):
                problems.append(f"'stages.{stage}' must be an object")
                continue
            problems += [f"'stages.{stage}.{k}' must be a string" for k in ("status", "reason", "updated", "wheel", "html")
                         if k in info and not isinstance(info[k], str)]
    if problems:
        raise ManifestError(f"{where}: " + "; ".join(problems) + ". Re-create the run with `edgemap finetune`.")
    return data


def fresh_run(run_dir: str | Path | RunDir) -> RunDir:
    """The run as it is on disk now. A RunDir a caller passes is read again: it may predate another command's write,
    and saving it would put old records back (or be refused); :func:`hand_back` gives the caller the result."""
    return RunDir.load(run_dir.path if isinstance(run_dir, RunDir) else run_dir)


def hand_back(caller: object, run: RunDir) -> None:
    """A RunDir the caller passed (read again by :func:`fresh_run`) now holds what the stage saved, when that is
    still what is on disk (another thread may have saved since: its newer records are not replaced by older ones).
    Edits the caller made to its object without saving are dropped, as a fresh load would."""
    if isinstance(caller, RunDir) and caller is not run and run._seen == _file_sha256(run.manifest_path):
        caller.data, caller._seen = run.data, run._seen


def _file_sha256(path: Path) -> str | None:
    """sha256 of a (small) file's bytes, None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _keep_created(old: dict[str, Any] | None, entry: dict[str, Any]) -> None:
    """The same bytes at the same path again: the same artifact, made when it first was (the wheel's default version
    comes from this time: re-exporting an unchanged model gave its wheel a new one)."""
    if old and (old.get("sha256"), old.get("path")) == (entry["sha256"], entry["path"]) and old.get("created"):
        entry["created"] = old["created"]


@dataclass
class RunDir:
    """A run directory and its parsed manifest.

    Example:
        >>> run = RunDir.load("models/digits")
        >>> run.classes[:3], run.contract.height
    """

    path: Path
    data: dict[str, Any]
    #: sha256 of edgemap.json as this object last read or wrote it: :meth:`save` refuses to write over what another
    #: command (or another RunDir of the same run) wrote since, whose records would be lost
    _seen: str | None = field(default=None, repr=False, compare=False)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        backbone: dict[str, Any],
        classes: list[str],
        contract: PreprocessContract,
        options: dict[str, Any] | None = None,
        dataset: dict[str, Any] | None = None,
    ) -> RunDir:
        path = Path(path).absolute()  # artifact paths are recorded relative to it, whatever the CWD
        path.mkdir(parents=True, exist_ok=True)
        data = {
            "schema": SCHEMA_VERSION,
            "created": now_iso(),
            "backbone": backbone,
            "classes": list(classes),
            "preprocess": contract.to_dict(),
            "options": options or {},
            "dataset": dataset or {},
            "metrics": {},
            "artifacts": {},
            "stages": {},
            "versions": package_versions(),
        }
        run = cls(path, validate_manifest(data))
        run.save()
        return run

    @classmethod
    def load(cls, path: str | Path) -> RunDir:
        path = Path(path).absolute()
        mf = path / MANIFEST_NAME
        if path.is_file():
            raise ManifestError(f"{path}: is a file, not a run directory (the folder `edgemap finetune --out` made)")
        if not path.is_dir():
            raise ManifestError(f"{path}: no such run directory; create one with "
                                f"`edgemap finetune DATA --out {shlex.quote(str(path))}`")
        if not mf.is_file():
            raise ManifestError(f"{mf}: missing; {path} is not an edgemap run directory (run `edgemap finetune` first)")
        raw = mf.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON or a 5000-digit number
            raise ManifestError(f"{mf}: not valid JSON ({str(e)[:200]})") from None
        run = cls(path, validate_manifest(data, str(mf)), hashlib.sha256(raw).hexdigest())
        run._settle_pending()
        return run

    def _settle_pending(self) -> None:
        """Finish what a process killed inside :meth:`write_artifact` left journaled.

        A pending entry whose file is in place (the rename happened, the manifest update
        did not) becomes the artifact; otherwise the old file and entry are still current.
        """
        for key, entry in (self.data.pop("pending", None) or {}).items():
            try:
                p = self._inside(entry["path"])
            except ManifestError:
                continue
            if p.is_file() and sha256_file(p) == entry["sha256"]:
                self.artifacts[key] = entry

    def save(self) -> None:
        """Write edgemap.json atomically; refused (ManifestError, nothing written) when the file changed on disk
        since this object read or wrote it: load the run again and redo the change on what is there now."""
        self.data["versions"] = {**self.data.get("versions", {}), **package_versions()}
        validate_manifest(self.data, str(self.manifest_path))
        if self._seen is not None:
            if _file_sha256(self.manifest_path) != self._seen:
                raise ManifestError(
                    f"{self.manifest_path}: changed since this run was loaded (another edgemap command, or another "
                    "loaded RunDir of the same run, wrote it); nothing was written over it. Load the run again "
                    "(RunDir.load) and repeat the step")
        raw = json_text(self.data).encode("utf-8")
        atomic_write_bytes(self.manifest_path, raw)
        self._seen = hashlib.sha256(raw).hexdigest()

    # ---- accessors ----------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def contract(self) -> PreprocessContract:
        return PreprocessContract.from_dict(self.data["preprocess"])

    @property
    def max_pixels(self) -> int | None:
        """The decompression-bomb limit the run's dataset was scanned with: later stages decode with it too."""
        recorded = (self.data.get("dataset") or {}).get("options") or {}
        return recorded.get("max_pixels", DEFAULT_MAX_PIXELS) if isinstance(recorded, dict) else DEFAULT_MAX_PIXELS

    @property
    def backbone(self) -> str:
        return self.data["backbone"]["name"]

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return self.data["artifacts"]

    # ---- artifacts ----------------------------------------------------------------
    def own_folder(self, name: str) -> Path:
        """``RUN/name`` (dist, report) for edgemap to write into; refused when it is a symlink or leads outside the
        run (a run directory from someone else would make edgemap write, and clean temp files, elsewhere)."""
        folder = self.path / name
        if folder.is_symlink() or (folder.exists() and self._inside(name) != folder.resolve()):
            raise ManifestError(f"{folder}: is a symlink; edgemap writes its {name}/ files inside the run directory. "
                                f"Remove the link, or give another folder with --out")
        return folder

    def _inside(self, rel: str) -> Path:
        try:
            p = (self.path / rel).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # a name too long, a NUL byte, a symlink loop
            raise ManifestError(f"{self.manifest_path}: artifact path {rel[:80]!r} cannot be used ({e})") from None
        root = self.path.resolve()
        if p != root and root not in p.parents:
            raise ManifestError(f"{self.manifest_path}: artifact path {rel!r} escapes the run directory")
        return p

    def add_artifact(self, key: str, path: str | Path, *, stage: str, save: bool = True, **meta: Any) -> dict[str, Any]:
        """Record a file (inside the run dir) with its sha256, size and the stage that made it."""
        p = Path(path)
        rel = str(p.resolve().relative_to(self.path.resolve())) if p.is_absolute() else str(p)
        full = self._inside(rel)
        entry = {
            "path": rel.replace("\\", "/"),
            "sha256": sha256_file(full),
            "bytes": full.stat().st_size,
            "stage": stage,
            "created": now_iso(),
            **meta,
        }
        _keep_created(self.artifacts.get(key), entry)
        self.artifacts[key] = entry
        if save:
            self.save()
        return entry

    @contextlib.contextmanager
    def write_artifact(self, key: str, path: str | Path, *, stage: str, save: bool = True, **meta: Any) -> Iterator[Path]:
        """Write an artifact atomically and record it: edgemap.json and the file never disagree.

        Yields a temp path beside ``path`` to write. Once it is complete, its sha256 is
        journaled in the manifest (``pending``) *before* it replaces the old file, then
        recorded as the artifact. A kill at any point leaves either the old file with its
        old entry, or the new file whose pending entry :meth:`load` promotes.

        Example:
            >>> with run.write_artifact("onnx_fp32", run.path / "model.onnx", stage="export") as tmp:
            ...     tmp.write_bytes(data)
        """
        p = Path(path)
        rel = str(p.resolve().relative_to(self.path.resolve())) if p.is_absolute() else str(p)
        self._inside(rel)
        with atomic_path(self.path / rel) as tmp:
            yield tmp
            entry = {"path": rel.replace("\\", "/"), "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size,
                     "stage": stage, "created": now_iso(), **meta}
            _keep_created(self.artifacts.get(key), entry)
            self.data.setdefault("pending", {})[key] = entry
            self.save()
        self.data["pending"].pop(key, None)
        if not self.data["pending"]:
            del self.data["pending"]
        self.artifacts[key] = entry
        if save:
            self.save()

    def has_artifact(self, key: str) -> bool:
        return key in self.artifacts and self._inside(self.artifacts[key]["path"]).is_file()

    def artifact_path(self, key: str, verify: bool = True) -> Path:
        """Path of a recorded artifact; refused when missing, when its sha256 changed, or (an exported model)
        when it was made from other weights than the run's current ones."""
        if key not in self.artifacts:
            raise ManifestError(f"{self.manifest_path}: no artifact '{key}' recorded; run the stage that makes it")
        entry = self.artifacts[key]
        p = self._inside(entry["path"])
        if not p.is_file():
            raise ManifestError(f"{p}: recorded as artifact '{key}' but missing; {self.remake_hint(key)}")
        older = self.made_from_older_weights(key)
        if older:
            raise ManifestError(f"{p}: {older}; its results would not be this run's model. Export again: "
                                f"edgemap export {shlex.quote(str(self.path))}" + ("" if key == "onnx_fp32" else " --int8"))
        if verify:
            self.check_sha256(key, p, sha256_file(p))
        return p

    def artifact_bytes(self, key: str) -> tuple[Path, bytes]:
        """A recorded artifact's path and its bytes, read once and checked: a caller that runs these bytes runs
        exactly what was checked (reading the path again could meet a file swapped in between)."""
        p = self.artifact_path(key, verify=False)
        data = p.read_bytes()
        self.check_sha256(key, p, hashlib.sha256(data).hexdigest())
        return p, data

    def check_sha256(self, key: str, p: Path, actual: str) -> None:
        entry = self.artifacts[key]
        if actual != entry["sha256"]:
            raise ModelIntegrityError(
                f"{p}: sha256 mismatch with {MANIFEST_NAME} (file {actual[:12]}…, recorded "
                f"{entry['sha256'][:12]}…); refusing a file changed after it was made: {self.remake_hint(key)}"
            )

    def remake_hint(self, key: str) -> str:
        """What makes a recorded artifact again, as a user types it (fine-tuning needs its dataset as DATA, and a new
        folder); the stage is never a manifest's free text."""
        entry = self.artifacts.get(key) or {}
        stage = entry.get("stage") if entry.get("stage") in STAGE_ORDER else "export"
        if stage == "finetune":
            data = shlex.quote(printable(str((self.data.get("dataset") or {}).get("root", "DATA"))))
            return f"restore it from a copy of the run, or fine-tune again into a new folder: `edgemap finetune {data} --out NEW_RUN`"
        return f"re-run `edgemap {stage} {shlex.quote(str(self.path))}{' --int8' if key.startswith('onnx_int8') else ''}`"

    def made_from_older_weights(self, key: str) -> str | None:
        """Why the exported model ``key`` does not come from the run's current weights (None when it does)."""
        if not key.startswith("onnx_"):
            return None
        fp32 = self.artifacts.get("onnx_fp32") or {}
        weights = (self.artifacts.get("weights_best") or {}).get("sha256")
        if weights and fp32.get("weights_sha256") not in (None, weights):
            return "exported from earlier weights (fine-tuning ran again since)"
        source = (self.artifacts.get(key) or {}).get("source_sha256")
        if key != "onnx_fp32" and source not in (None, fp32.get("sha256")):
            return "quantized from an earlier model.onnx"
        return None

    def set_stage(self, stage: str, status: str, save: bool = True, **info: Any) -> None:
        self.data["stages"][stage] = {"status": status, "updated": now_iso(), **info}
        if save:
            self.save()

    def outdate_after(self, stage: str, reason: str, save: bool = True) -> list[str]:
        """Mark the recorded stages after ``stage`` "outdated": what they made came from older inputs."""
        return self.outdate(STAGE_ORDER[STAGE_ORDER.index(stage) + 1:], reason, save)

    def outdate(self, stages: Any, reason: str, save: bool = True) -> list[str]:
        """Mark those of ``stages`` recorded done "outdated"; returns them."""
        hit = [s for s in stages if self.data["stages"].get(s, {}).get("status") == "done"]
        for s in hit:
            self.data["stages"][s] = {"status": "outdated", "updated": now_iso(), "reason": reason}
        if hit and save:
            self.save()
        return hit

    def stage_done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("status") == "done"
