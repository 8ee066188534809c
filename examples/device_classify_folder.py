"""Device-side script: classify every image in a folder with an installed edgemap wheel, write a CSV.

Runs where only the wheel is installed (numpy, Pillow, onnxruntime or openvino; no torch,
no edgemap). The model loads once (its sha256 is checked), images go through in batches,
and an unreadable image becomes a CSV row with its error instead of stopping the run.

Usage:
    python device_classify_folder.py FOLDER OUT.csv --module digits_classifier [--top-k 3] [--batch 32]
    python device_classify_folder.py FOLDER OUT.csv --model model.onnx   # with the edgemap-runtime wheel

CSV columns: path, label, prob, then label_2, prob_2 ... up to --top-k, and error.
Exit code: 0 all classified, 1 some images could not be read (their rows say why), 2 nothing ran
(bad arguments, the wheel not installed, a model that cannot be loaded: one "error:" line).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import os
import sys
from pathlib import Path


class LoadFailed(Exception):
    """The model could not be loaded: nothing can be classified (exit 2)."""


def load_classifier(module: str | None, model: Path | None, runtime: str | None):  # noqa: ANN201
    """The embedded model of wheel ``module`` (or ``model`` through the edgemap-runtime wheel), and the
    wheel's command-line module, which lists folders exactly as training listed class folders.

    Raises:
        LoadFailed: with one line when the wheel is not installed or the model cannot be loaded (a changed
            model file, a missing runtime); ``EDGEMAP_DEBUG=1`` shows the traceback instead.
    """
    # the distribution/command name works too: pip and the console command say run-classifier, Python run_classifier
    name = "edgemap_runtime" if model is not None else module.replace("-", "_").replace(".", "_")
    try:
        pkg = importlib.import_module(name)
    except ImportError as e:
        if e.name != name:  # the wheel is there but one of its dependencies is not
            raise LoadFailed(f"{name} is installed but cannot be imported: {e}") from None
        wheel = "the edgemap-runtime wheel" if model is not None else f"the model's wheel (import name {name})"
        raise LoadFailed(f"no module named {name!r}: pip install {wheel} first") from None
    if not (hasattr(pkg, "load") and isinstance(getattr(pkg, "EdgemapError", None), type)):
        raise LoadFailed(f"{name!r} is not a wheel made by `edgemap package` (it has no load() / EdgemapError)")
    try:
        if model is not None:  # load() defaults to the wheel's runtime
            clf = pkg.load(model, runtime=runtime) if runtime else pkg.load(model)
        else:
            clf = pkg.load(runtime=runtime)
    except pkg.EdgemapError as e:
        if os.environ.get("EDGEMAP_DEBUG"):
            raise
        cli = importlib.import_module(f"{name}.device_cli")
        raise LoadFailed(cli.printable(str(e))) from None
    return clf, importlib.import_module(f"{name}.device_cli")


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("out", type=Path, help="CSV file to write")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--module", help="import name of the installed model wheel (e.g. digits_classifier)")
    src.add_argument("--model", type=Path, help="an .onnx model, loaded with the edgemap-runtime wheel")
    ap.add_argument("--runtime", default=None, help="override the wheel's runtime (onnxruntime, openvino, cuda)")
    ap.add_argument("--top-k", type=positive, default=1)
    ap.add_argument("--batch", type=positive, default=32)
    args = ap.parse_args(argv)

    try:
        clf, cli = load_classifier(args.module, args.model, args.runtime)
    except LoadFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.folder.is_dir():
        print(cli.printable(f"error: {args.folder}: no such folder"), file=sys.stderr)
        return 2
    # recursive, symlinked folders followed once, hidden entries and __MACOSX skipped, as in training
    listing = cli.list_images([args.folder])
    if listing.skipped_note():
        print(cli.printable(listing.skipped_note()), file=sys.stderr)
    paths = listing.images
    unlisted = [(where, why) for where, why in listing.problems if "cannot list" in why]
    if not paths:
        why = unlisted[0][1] if unlisted else f"{args.folder}: no images"
        print(cli.printable(f"error: {why}"), file=sys.stderr)
        return 2
    header = ["path", "label", "prob"]
    for k in range(2, args.top_k + 1):
        header += [f"label_{k}", f"prob_{k}"]
    header.append("error")
    tmp = args.out.with_name(args.out.name + ".tmp")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        errors = write_csv(tmp, header, paths, unlisted, clf, cli, args.top_k, args.batch)
        os.replace(tmp, args.out)  # never a half-written CSV where a good one was
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        print(cli.printable(f"error: {args.out}: cannot write ({e.strerror or e})"), file=sys.stderr)
        return 2
    print(cli.printable(f"{args.out}: {len(paths)} images, {errors} errors"))
    return 1 if errors else 0


def write_csv(tmp: Path, header: list[str], paths: list[Path], unlisted: list[tuple[Path, str]], clf, cli,  # noqa: ANN001
              top_k: int, batch: int) -> int:
    """Classify ``paths`` in batches into the CSV ``tmp``; returns the number of error rows (a folder that could not
    be listed is one of them)."""
    errors = 0
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for where, why in unlisted:  # its images could not even be found
            errors += 1
            w.writerow([cli.printable(str(where))] + [""] * (len(header) - 2) + [cli.printable(why)])
        for i in range(0, len(paths), batch):
            chunk = paths[i:i + batch]
            try:
                preds = clf.predict(chunk, top_k=top_k)
            except Exception:  # noqa: BLE001 - one bad file: retry the chunk image by image
                preds = []
                for p in chunk:
                    try:
                        preds.append(clf.predict(p, top_k=top_k)[0])
                    except Exception as e:  # noqa: BLE001 - reported in the CSV
                        preds.append(e)
            for path, pred in zip(chunk, preds, strict=True):
                if isinstance(pred, Exception):
                    errors += 1
                    w.writerow([cli.printable(str(path))] + [""] * (len(header) - 2) + [cli.printable(str(pred))])
                    continue
                row = [cli.printable(str(path))]  # a file name that is not UTF-8: \\xNN escapes
                for lab, prob in pred.topk:
                    row += [lab, f"{prob:.6f}"]
                row += [""] * (len(header) - 1 - len(row)) + [""]
                w.writerow(row)
    return errors


if __name__ == "__main__":
    sys.exit(main())
