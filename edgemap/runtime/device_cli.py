"""The device wheel's console command (argparse: the wheel depends on numpy, Pillow, a runtime).

Two forms, one code path:

- a model wheel (``edgemap package``): ``NAME IMAGE... [--top-k K] [--json]``, model embedded;
- the generic runtime wheel: ``edgemap-runtime MODEL IMAGE... [--top-k K] [--json]``.

A folder given as IMAGE is searched (recursively, hidden entries skipped) for image files; files
with other extensions are counted in one note on stderr. ``-`` reads one image from stdin.
Output: one tab-separated line per image (``path  label prob``, then further top-k pairs),
or with ``--json`` one JSON array of ``{"image", "label", "index", "prob", "topk"}`` objects.
An image that cannot be decoded, or a folder without images, is reported on stderr (and as
``{"image", "error"}`` in the JSON) and the others are still classified; the exit code is then 1.
A model or runtime problem exits 2 with one ``error:`` line (``EDGEMAP_DEBUG=1`` shows the
traceback). File names that are not UTF-8 are printed with ``\\xNN`` escapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemap.runtime.classifier import (
    DEVICE_RUNTIMES,
    Classifier,
    PillowVersionWarning,
    Prediction,
    read_model_json,
    runtimes_for,
)
from edgemap.runtime.errors import EdgemapError, ImageError
from edgemap.runtime.preprocess import IMAGE_EXTENSIONS, is_hidden
from edgemap.runtime.text import printable


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from e
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


class _Stdin(type(Path())):  # type: ignore[misc]
    """The IMAGE argument ``-``: one image read from stdin (a file named ``-`` is ``./-``)."""


STDIN = _Stdin("-")


def build_parser(prog: str, embedded: bool, default_runtime: str = "onnxruntime",
                 runtimes: tuple[str, ...] = DEVICE_RUNTIMES) -> argparse.ArgumentParser:
    """The argument parser of either form (``embedded``: the model is inside the package; ``runtimes``: those
    that can run it)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=("Classify images with the model embedded in this package." if embedded else
                     "Classify images with an edgemap-exported ONNX model (classes and preprocessing "
                     "are read from the model's metadata)."),
    )
    if not embedded:
        p.add_argument("model", type=Path, help="the .onnx model written by `edgemap export`")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help=f"image files, folders of images (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}),"
                        " or - for one image read from stdin")
    p.add_argument("--top-k", type=_positive, default=1, metavar="K", help="classes to show per image (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON array instead of text lines")
    p.add_argument("--runtime", default=default_runtime,
                   help=f"{', '.join(runtimes)} (default {default_runtime})")
    p.add_argument("--threads", type=_positive, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--batch-size", type=_positive, default=16, help="images per inference call (default 16)")
    p.add_argument("--max-pixels", type=_positive, default=None, metavar="N",
                   help="decompression-bomb limit per image, in pixels (default: the model's, else ~89 M)")
    if not embedded:
        p.add_argument("--sha256", default=None, help="refuse the model unless it has this sha256")
    return p


@dataclass
class Listing:
    """What the IMAGE arguments name: the images, folders without any, and files skipped for their extension."""

    images: list[Path] = field(default_factory=list)
    #: (where it falls among the images: how many images the arguments before it named, (path, message)), so that
    #: results keep the order of the arguments
    placed_problems: list[tuple[int, tuple[Path, str]]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # extension -> files in the folders that have it
    #: image-named entries in the folders that are no regular file (a FIFO, a socket, a device): reading one could
    #: wait forever for a writer
    not_regular: int = 0
    #: links to the folder given or a folder above it ("loop -> .."): followed, they listed the folder's parent tree
    upward_links: int = 0

    @property
    def problems(self) -> list[tuple[Path, str]]:
        """(path, message) of each argument that names no image."""
        return [problem for _, problem in self.placed_problems]

    def in_order(self, results: list[tuple[Path, Prediction | str]]) -> list[tuple[Path, Prediction | str]]:
        """The results of :attr:`images` (in their order) with the problems put back where their arguments were."""
        out = list(results)
        for at, problem in reversed(self.placed_problems):
            out.insert(at, problem)  # from the last: earlier positions stay valid
        return out

    def skipped_note(self) -> str:
        """One line on the skipped files ("" if none)."""
        notes = []
        if self.skipped:
            n = sum(self.skipped.values())
            kinds = ", ".join(f"{ext or '(none)'} {c}" for ext, c in sorted(self.skipped.items()))
            notes.append(f"{n} file(s) in the folders skipped: not an image extension ({kinds}); images are "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))} (give a file by name to classify it anyway)")
        if self.not_regular:
            notes.append(f"{self.not_regular} entr{'y' if self.not_regular == 1 else 'ies'} with an image name in the "
                         "folders skipped: not a regular file (a FIFO, socket or device; give it by name to read it)")
        if self.upward_links:
            notes.append(f"{self.upward_links} link(s) to the folder itself or a folder above it skipped (they would "
                         "list the images around it, as training skips them)")
        return "; ".join(notes)


def list_images(paths: list[Path]) -> Listing:
    """Files as given; folders → their image files, listed much as training lists a class folder: recursive,
    sorted, symlinked folders followed (each real folder once), hidden entries skipped; other extensions are counted,
    and a folder without images is a problem of its own (the others still run). Unlike training, a link into another
    folder is followed wherever it points: training skips one into another class or split (its images would count
    twice), and here there are no classes."""
    out = Listing()
    for p in paths:
        if p is STDIN or not p.is_dir():
            out.images.append(p)
            continue
        found = []
        top = os.path.realpath(p)
        seen: set[tuple[int, int]] = set()
        unlisted: list[OSError] = []  # a folder that cannot be listed: its images were dropped without a word
        for root, dirs, files in os.walk(p, followlinks=True, onerror=unlisted.append):
            st = os.stat(root)
            if (st.st_dev, st.st_ino) in seen:  # a link back into the tree: once is enough
                dirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs[:] = sorted(d for d in dirs if not is_hidden(d) and not _upward(os.path.join(root, d), top, out))
            for f in sorted(files):
                if is_hidden(f):
                    continue
                ext = Path(f).suffix.lower()
                if ext in IMAGE_EXTENSIONS:
                    if not _regular_or_unreadable(Path(root) / f):
                        out.not_regular += 1
                        continue
                    found.append(Path(root) / f)
                else:
                    out.skipped[ext] = out.skipped.get(ext, 0) + 1
        for e in unlisted:
            where = Path(e.filename) if e.filename else p
            out.placed_problems.append((len(out.images), (where, f"{where}: cannot list folder ({e.strerror or e})")))
        if not found and not unlisted:
            out.placed_problems.append(
                (len(out.images), (p, f"{p}: folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")))
        out.images += found
    return out


def _upward(path: str, top: str, out: Listing) -> bool:
    """A link to ``top`` (the folder given) or a folder above it: counted in ``out``, not entered."""
    if not os.path.islink(path):
        return False
    real = os.path.realpath(path)
    if top == real or top.startswith(real.rstrip(os.sep) + os.sep):
        out.upward_links += 1
        return True
    return False


def _regular_or_unreadable(path: Path) -> bool:
    """False only for an entry that is there and is no regular file (a FIFO would block the read); a dangling link
    stays in, to be reported as unreadable with the others."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def expand_images(paths: list[Path]) -> list[Path]:
    """The image files ``paths`` name (see :func:`list_images`)."""
    return list_images(paths).images


def classify_paths(clf: Classifier, paths: list[Path], top_k: int, batch_size: int) -> Iterator[list[tuple[Path, Prediction | str]]]:
    """Classify files in batches, yielding each batch's results when done (so output streams);
    an unreadable image yields its error text instead of a Prediction."""
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        arrays: list[np.ndarray] = []
        good: list[int] = []
        slots: list[Prediction | str] = [""] * len(chunk)
        for j, path in enumerate(chunk):
            try:
                arrays.append(clf.preprocess([sys.stdin.buffer.read() if path is STDIN else path])[0])
                good.append(j)
            except ImageError as e:  # stdin is "-" in the error too, as in the result line
                slots[j] = str(e).replace("<bytes>", "-", 1) if path is STDIN else str(e)
        if arrays:
            preds = clf.decode(clf.probabilities(np.stack(arrays)), top_k)
            for j, pred in zip(good, preds, strict=False):
                slots[j] = pred
        yield list(zip(chunk, slots, strict=False))


def _write_lines(results: list[tuple[Path, Prediction | str]], prog: str) -> None:
    for path, r in results:
        if isinstance(r, Prediction):
            sys.stdout.write("\t".join([printable(str(path))] + [f"{printable(lab)}\t{p:.4f}" for lab, p in r.topk]) + "\n")
        else:
            sys.stderr.write(f"{prog}: error: {printable(r)}\n")
    sys.stdout.flush()


def _write_json(results: list[tuple[Path, Prediction | str]], prog: str) -> None:
    rows: list[dict[str, Any]] = []
    for path, r in results:
        name = printable(str(path), controls=False)  # the real path back (JSON escapes control characters itself)
        rows.append({"image": name, **r.to_dict()} if isinstance(r, Prediction)
                    else {"image": name, "error": printable(r, controls=False)})
    # \u escapes where stdout cannot hold a character (a cp1252 Windows pipe, an ascii locale): backslashreplace
    # made Python-style "\xe9" there, which is not JSON
    utf = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig")
    text = json.dumps(rows, ensure_ascii=not utf, indent=1) + "\n"
    for i in range(0, len(text), 1 << 15):  # in pieces: one 2 MB write into a closed pipe (| head) ended short with no
        sys.stdout.write(text[i:i + (1 << 15)])  # error (exit 0); a piece's write raises BrokenPipeError (exit 141)
    sys.stdout.flush()
    for _, r in results:
        if not isinstance(r, Prediction):
            sys.stderr.write(f"{prog}: error: {printable(r)}\n")


def main(argv: list[str] | None = None, *, package_dir: str | Path | None = None, prog: str | None = None,
         default_runtime: str = "onnxruntime") -> int:
    """Entry point of both forms; returns the exit code (0 ok, 1 some images failed, 2 error).

    Lines are printed as each batch is classified; a closed pipe (``| head``) stops the work
    quietly with the shell's code for it, 141.

    Args:
        argv: arguments (default ``sys.argv[1:]``).
        package_dir: folder with model.json and the model, for a model wheel; None for
            the generic form that takes MODEL as its first argument.
        prog: the command name shown in help and errors.
        default_runtime: the generic form's --runtime default (the runtime its wheel installs).
    """
    embedded = package_dir is not None
    prog = prog or ("edgemap-runtime" if not embedded else Path(sys.argv[0]).name)
    for stream in (sys.stdout, sys.stderr):  # a label or message the locale cannot encode: escaped, not a crash
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    failed = 0
    try:
        info: dict[str, Any] = {}
        broken: EdgemapError | None = None
        if embedded:
            try:
                info = read_model_json(package_dir)
            except EdgemapError as e:  # said after --help, which still works
                broken = e
        runtimes = runtimes_for(info.get("precision", ""), info.get("format", "")) if info else DEVICE_RUNTIMES
        args = build_parser(prog, embedded, info.get("runtime", default_runtime), runtimes).parse_args(argv)
        if broken is not None:
            raise broken
        if args.images.count("-") > 1:
            raise EdgemapError("- (stdin) can be given once")
        limit = {"max_pixels": args.max_pixels} if args.max_pixels else {}
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", PillowVersionWarning)
            if embedded:
                clf = Classifier.from_package_dir(package_dir, runtime=args.runtime, threads=args.threads, **limit)
            else:
                clf = Classifier.from_path(args.model, runtime=args.runtime, expected_sha256=args.sha256,
                                           threads=args.threads, **limit)
        for w in said:  # one line, not Python's "file:line: UserWarning" (other warnings as Python shows them)
            if isinstance(w.message, PillowVersionWarning):
                sys.stderr.write(f"{prog}: warning: {printable(str(w.message))}\n")
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        # a literal "-" is stdin (Path("./-") would also print as "-"); anything else is a path
        listing = list_images([STDIN if a == "-" else Path(a) for a in args.images])
        if listing.skipped_note():
            sys.stderr.write(f"{prog}: note: {printable(listing.skipped_note())}\n")
        failed += len(listing.problems)  # folders without images: reported like unreadable images, the rest still run
        done: list[tuple[Path, Prediction | str]] = []
        if not args.json:
            _write_lines(listing.problems, prog)  # type: ignore[arg-type]
        for batch in classify_paths(clf, listing.images, args.top_k, args.batch_size):
            failed += sum(not isinstance(r, Prediction) for _, r in batch)
            if args.json:
                done += batch  # one JSON document at the end
            else:
                _write_lines(batch, prog)
        if args.json:
            _write_json(listing.in_order(done), prog)
    except EdgemapError as e:
        if os.environ.get("EDGEMAP_DEBUG"):
            raise
        sys.stderr.write(f"{prog}: error: {printable(str(e))}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop; no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 1 if failed else 0


if __name__ == "__main__":  # python -m edgemap.runtime.device_cli MODEL IMAGE...
    sys.exit(main())
