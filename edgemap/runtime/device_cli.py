"""The device wheel's console command (argparse: the wheel depends on numpy, Pillow, a runtime).

Two forms, one code path:

- a model wheel (``edgemap package``): ``NAME IMAGE... [--top-k K] [--json]``, model embedded;
- the generic runtime wheel: ``edgemap-runtime MODEL IMAGE... [--top-k K] [--json]``.

A folder given as IMAGE is searched (recursively, hidden entries skipped) for image files.
Output: one tab-separated line per image (``path  label prob``, then further top-k pairs),
or with ``--json`` one JSON array of ``{"image", "label", "index", "prob", "topk"}`` objects.
An image that cannot be decoded is reported on stderr (and as ``{"image", "error"}`` in the
JSON) and the others are still classified; the exit code is then 1. A model or runtime
problem exits 2 with one ``error:`` line (``EDGEMAP_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgemap.runtime.classifier import Classifier, Prediction, read_model_json
from edgemap.runtime.errors import EdgemapError, ImageError
from edgemap.runtime.preprocess import IMAGE_EXTENSIONS, is_hidden


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from e
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def build_parser(prog: str, embedded: bool, default_runtime: str = "onnxruntime") -> argparse.ArgumentParser:
    """The argument parser of either form (``embedded``: the model is inside the package)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=("Classify images with the model embedded in this package." if embedded else
                     "Classify images with an edgemap-exported ONNX model (classes and preprocessing "
                     "are read from the model's metadata)."),
    )
    if not embedded:
        p.add_argument("model", type=Path, help="the .onnx model written by `edgemap export`")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--top-k", type=_positive, default=1, metavar="K", help="classes to show per image (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON array instead of text lines")
    p.add_argument("--runtime", default=default_runtime,
                   help=f"onnxruntime, openvino[:DEVICE], cuda or tensorrt (default {default_runtime})")
    p.add_argument("--threads", type=_positive, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--batch-size", type=_positive, default=16, help="images per inference call (default 16)")
    p.add_argument("--max-pixels", type=_positive, default=None, metavar="N",
                   help="decompression-bomb limit per image, in pixels (default: the model's, else ~89 M)")
    if not embedded:
        p.add_argument("--sha256", default=None, help="refuse the model unless it has this sha256")
    return p


def expand_images(paths: list[Path]) -> list[Path]:
    """Files as given; folders → their image files, listed as training lists a class folder:
    recursive, sorted, symlinked folders followed (each real folder once), hidden entries and
    other extensions skipped."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = []
            seen: set[tuple[int, int]] = set()
            for root, dirs, files in os.walk(p, followlinks=True):
                st = os.stat(root)
                if (st.st_dev, st.st_ino) in seen:  # a link back into the tree: once is enough
                    dirs[:] = []
                    continue
                seen.add((st.st_dev, st.st_ino))
                dirs[:] = sorted(d for d in dirs if not is_hidden(d))
                found += [Path(root) / f for f in sorted(files)
                          if not is_hidden(f) and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                raise ImageError(f"{p}: folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            out += found
        else:
            out.append(p)
    return out


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
                arrays.append(clf.preprocess([path])[0])
                good.append(j)
            except ImageError as e:
                slots[j] = str(e)
        if arrays:
            preds = clf.decode(clf.probabilities(np.stack(arrays)), top_k)
            for j, pred in zip(good, preds, strict=False):
                slots[j] = pred
        yield list(zip(chunk, slots, strict=False))


def _write_lines(results: list[tuple[Path, Prediction | str]], prog: str) -> None:
    for path, r in results:
        if isinstance(r, Prediction):
            sys.stdout.write("\t".join([str(path)] + [f"{lab}\t{p:.4f}" for lab, p in r.topk]) + "\n")
        else:
            sys.stderr.write(f"{prog}: error: {r}\n")
    sys.stdout.flush()


def _write_json(results: list[tuple[Path, Prediction | str]], prog: str) -> None:
    rows: list[dict[str, Any]] = []
    for path, r in results:
        rows.append({"image": str(path), **r.to_dict()} if isinstance(r, Prediction) else {"image": str(path), "error": r})
    sys.stdout.write(json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    sys.stdout.flush()
    for _, r in results:
        if not isinstance(r, Prediction):
            sys.stderr.write(f"{prog}: error: {r}\n")


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
    failed = 0
    try:
        info = read_model_json(package_dir) if embedded else {}
        args = build_parser(prog, embedded, info.get("runtime", default_runtime)).parse_args(argv)
        limit = {"max_pixels": args.max_pixels} if args.max_pixels else {}
        if embedded:
            clf = Classifier.from_package_dir(package_dir, runtime=args.runtime, threads=args.threads, **limit)
        else:
            clf = Classifier.from_path(args.model, runtime=args.runtime, expected_sha256=args.sha256, threads=args.threads,
                                       **limit)
        done: list[tuple[Path, Prediction | str]] = []
        for batch in classify_paths(clf, expand_images(args.images), args.top_k, args.batch_size):
            failed += sum(not isinstance(r, Prediction) for _, r in batch)
            if args.json:
                done += batch  # one JSON document at the end
            else:
                _write_lines(batch, prog)
        if args.json:
            _write_json(done, prog)
    except EdgemapError as e:
        if os.environ.get("EDGEMAP_DEBUG"):
            raise
        sys.stderr.write(f"{prog}: error: {e}\n")
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
