"""``edgemap report`` on a real run: digits → finetune (tiny, 32 px) → export --int8 → eval → bench.

The page is also opened in a real headless browser (Debian's ``chromium``, driven over the
DevTools protocol on ``--remote-debugging-pipe``: no Python package beyond the standard
library): it must load without console errors or exceptions, request nothing but itself,
and every ``<img>`` must decode to the size of the PNG it embeds. Set
``EDGEMAP_REPORT_SHOTS=DIR`` to keep the screenshots it takes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgemap.errors import ManifestError
from edgemap.manifest import RunDir
from edgemap.report import ReportOptions, read_metrics, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ---- a finished run, built once ----------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    from edgemap.bench import BenchOptions, bench
    from edgemap.data.digits import write_digits
    from edgemap.evaluate import EvalOptions, evaluate
    from edgemap.export import ExportOptions, export
    from edgemap.train.finetune import FinetuneOptions, finetune

    root = tmp_path_factory.mktemp("report") / "my run é 日本"
    write_digits(root / "digits")
    finetune(root / "digits", root / "run", FinetuneOptions(backbone="tiny", img_size=32, epochs=2, freeze_epochs=1,
                                                             flip=False))
    export(root / "run", ExportOptions(int8=True))
    evaluate(root / "run", EvalOptions(runtimes=("torch", "cpu", "openvino")))
    bench(root / "run", BenchOptions(runtimes=("torch", "cpu", "openvino"), batches=(1,), iters=10, warmup=2))
    return RunDir.load(root / "run")


def _copy_run(run: RunDir, dest: Path) -> RunDir:
    shutil.copytree(run.path, dest)
    return RunDir.load(dest)


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


# ---- the report on a finished run --------------------------------------------------------------
def test_full_run_has_every_section(finished_run: RunDir) -> None:
    res = report(finished_run)
    assert res.html == finished_run.path / "report" / "report.html"
    assert res.sections == dict.fromkeys(res.sections, "ok"), res.sections
    assert set(res.sections) >= {"training", "confusion", "accuracy_latency", "misclassified", "int8_gate", "eval",
                                 "bench", "parity", "dataset", "artifacts"}
    assert set(res.images) == {"training_curves", "confusion_fp32", "confusion_int8", "accuracy_vs_latency",
                               "misclassified"}
    assert not res.warnings
    page = res.html.read_text(encoding="utf-8")
    for name, path in res.images.items():
        assert path.parent == finished_run.path / "report"
        w, h = _png_size(path)
        assert w > 100 and h > 100, name
        # the page embeds exactly the bytes written beside it
        assert base64.b64encode(path.read_bytes()).decode() in page, name
    # self-contained: no script, no remote or relative resource
    low = page.lower()
    assert "<script" not in low and "http://" not in low and "https://" not in low
    assert low.count("<img ") == len(res.images) and low.count('src="data:image/png;base64,') == len(res.images)
    # the numbers a user wants first come first, then the plots
    assert page.index("accuracy fp32 → int8") < page.index('id="accuracy-latency"') < page.index('id="training"')
    for cls in finished_run.classes:
        assert f"<td>{cls}</td>" in page


def test_misclassified_counts_match_eval(finished_run: RunDir) -> None:
    """The report predicts the validation split itself: same models, same preprocessing → eval's numbers."""
    res = report(finished_run)
    ev = {(r["runtime"], r["precision"]): r for r in finished_run.data["metrics"]["eval"]["rows"]}
    n = finished_run.data["metrics"]["eval"]["n"]
    assert res.checked == n == sum(finished_run.data["dataset"]["counts"]["val"].values())
    for precision in ("fp32", "int8"):
        row = ev[("cpu", precision)]
        assert res.misclassified[precision] == n - round(row["accuracy"] * n)
        assert np.trace(np.asarray(row["confusion"])) == n - res.misclassified[precision]
    page = res.html.read_text(encoding="utf-8")
    assert f"got {res.misclassified['fp32']} of {n} wrong" in page


def test_max_images_bounds_the_work_across_classes(finished_run: RunDir, tmp_path: Path) -> None:
    res = report(finished_run, ReportOptions(max_images=25, grid=6, out=tmp_path / "small.html"))
    assert res.checked == 25
    assert res.html == tmp_path / "small.html" and res.html.is_file()
    assert "Showing 6 of" in res.html.read_text(encoding="utf-8") or res.misclassified["fp32"] <= 6


def test_options_are_checked(finished_run: RunDir, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="--max-images"):
        report(finished_run, ReportOptions(max_images=0))
    with pytest.raises(ManifestError, match="not an edgemap run directory"):
        report(tmp_path)
    # --out a folder (existing, or new with a trailing slash): report.html in it (was: refused / a file named like it)
    folder = tmp_path / "existing"
    folder.mkdir()
    assert report(finished_run, ReportOptions(out=folder, predict=False)).html == folder / "report.html"
    new = report(finished_run, ReportOptions(out=f"{tmp_path / 'new'}/", predict=False))
    assert new.html == tmp_path / "new" / "report.html" and new.html.is_file()
    # a path through a file: one line (was a NotADirectoryError traceback)
    with pytest.raises(ManifestError, match="cannot make the folder .*Not a directory"):
        report(finished_run, ReportOptions(out=finished_run.manifest_path / "x.html", predict=False))
    # a pipe (or /dev/stdout) is refused, not replaced by a file with a *_files folder beside it
    fifo = tmp_path / "pipe.html"
    os.mkfifo(fifo)
    with pytest.raises(ManifestError, match="not a file or folder path"):
        report(finished_run, ReportOptions(out=fifo, predict=False))
    assert fifo.is_fifo() and not (tmp_path / "pipe_files").exists()


# ---- missing stages, missing data, changed models ------------------------------------------------
def test_partial_run_names_the_missing_commands(finished_run: RunDir, odd_tmp: Path) -> None:
    run = _copy_run(finished_run, odd_tmp / "only trained")
    for key in [k for k in run.artifacts if k.startswith("onnx")]:
        (run.path / run.artifacts.pop(key)["path"]).unlink()
    for section in ("eval", "bench", "int8_gate", "parity"):
        run.data["metrics"].pop(section)
    run.data["stages"].pop("export")
    run.save()
    res = report(run.path)
    assert res.sections["training"] == "ok" and res.sections["dataset"] == "ok"
    assert res.sections["eval"] == f"not run yet: edgemap eval {shlex.quote(str(run.path))}"
    assert res.sections["bench"] == f"not run yet: edgemap bench {shlex.quote(str(run.path))}"
    assert res.sections["int8_gate"] == f"not run yet: edgemap export {shlex.quote(str(run.path))} --int8"
    assert res.sections["misclassified"] == f"not run yet: edgemap export {shlex.quote(str(run.path))} --int8"
    assert set(res.images) == {"training_curves"}
    page = res.html.read_text(encoding="utf-8")
    assert f"<code>edgemap export {shlex.quote(str(run.path))} --int8</code>" in page.replace("&#x27;", "'")
    assert "export: not run" in page


def test_untrained_run_without_metrics(finished_run: RunDir, tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path / "bare")
    (run.path / "metrics.jsonl").unlink()
    run.data["metrics"] = {}
    run.save()
    res = report(run, ReportOptions(predict=False))
    assert res.sections["training"].startswith("no metrics.jsonl")
    assert res.sections["misclassified"] == "turned off (--no-predict)"
    assert res.images == {} and res.html.is_file()


def test_dataset_gone_still_reports(finished_run: RunDir, tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path / "moved")
    run.data["dataset"]["root"] = str(tmp_path / "nowhere")
    run.save()
    res = report(run)
    assert any("dataset this run was trained on is gone" in w for w in res.warnings), res.warnings
    assert "confusion_int8" in res.images  # from metrics.eval, no images needed
    assert "misclassified" not in res.images
    assert "is gone" in res.html.read_text(encoding="utf-8")


def test_changed_model_is_refused_not_run(finished_run: RunDir, tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path / "tampered")
    with open(run.path / run.artifacts["onnx_int8_qoperator"]["path"], "ab") as f:
        f.write(b"\0")
    res = report(run)
    assert any("sha256 mismatch" in w for w in res.warnings), res.warnings
    assert "misclassified" not in res.images


def test_a_deleted_artifact_is_shown_missing_not_present(finished_run: RunDir, tmp_path: Path) -> None:
    """The artifacts table listed a deleted model with its size and sha256, and the report said "ok"."""
    run = _copy_run(finished_run, tmp_path / "deleted")
    (run.path / run.artifacts["onnx_int8_qdq"]["path"]).unlink()
    res = report(run, ReportOptions(predict=False))
    assert res.sections["artifacts"] == "1 file(s) missing or changed", res.sections
    assert any("model.int8.qdq.onnx (artifact onnx_int8_qdq) is missing" in w and "--int8" in w
               for w in res.warnings), res.warnings
    assert '<span class="pill bad">missing</span>' in res.html.read_text(encoding="utf-8")


def test_report_out_folder_with_a_slash(finished_run: RunDir, tmp_path: Path) -> None:
    """`report --out outs/dir/` wrote a file named dir (typer's Path drops the trailing slash)."""
    from edgemap.cli import app

    r = CliRunner().invoke(app, ["report", str(finished_run.path), "--no-predict", "--out", f"{tmp_path}/outs/dir/"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "outs" / "dir" / "report.html").is_file()
    # a new name without a suffix is a folder too (it became an HTML file named "plain" with plain_files/ beside it)
    r = CliRunner().invoke(app, ["report", str(finished_run.path), "--no-predict", "--out", f"{tmp_path}/outs/plain"])
    assert r.exit_code == 0 and (tmp_path / "outs" / "plain" / "report.html").is_file(), r.output


def test_read_metrics_skips_a_cut_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 2, "val_acc": 0.5}\n{"epoch": 1, "val_acc": 0.25}\n{"epoch": 3, "va',
                                            encoding="utf-8")
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    assert read_metrics(tmp_path / "missing") == []


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_json_and_next_step(finished_run: RunDir, tmp_path: Path) -> None:
    from edgemap.cli import app

    runner = CliRunner()
    out = tmp_path / "r.html"
    r = runner.invoke(app, ["report", str(finished_run.path), "--out", str(out), "--json", "-", "--max-images", "40"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["html"] == str(out) and out.is_file() and data["checked"] == 40
    r = runner.invoke(app, ["report", str(finished_run.path), "--no-predict", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output.replace("\n", "")
    assert f"next: edgemap package {shlex.quote(str(finished_run.path))}" in r.output.replace("\n", "")
    r = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code != 0 and "no such run directory" in r.output


# ---- a real browser --------------------------------------------------------------------------------
def _high_fd(fd: int) -> int:
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return new


class _Pipe:
    """Chrome DevTools protocol over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-framed JSON)."""

    def __init__(self, args: list[str]):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()
        # the browser expects the pipes exactly on fds 3 and 4: move the child's ends above them first
        to_r, from_w = (_high_fd(fd) for fd in (to_r, from_w))
        script = f'exec "$0" "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-'
        self.proc = subprocess.Popen(["bash", "-c", script, *args], pass_fds=(to_r, from_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_r)
        os.close(from_w)
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_r, 1 << 16)
            if not chunk:
                self._q.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self._q.put(json.loads(msg))

    def _next(self, deadline: float) -> dict[str, Any]:
        try:
            msg = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("chromium did not answer in time") from None
        if msg is None:
            raise RuntimeError("chromium closed the DevTools pipe: " + self.proc.stderr.read().decode(errors="replace")[-2000:])
        return msg

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for m in self.events:
            if m.get("method") == method:
                return m
        while True:
            m = self._next(deadline)
            self.events.append(m)
            if m.get("method") == method:
                return m

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)


_DECODE_ALL = """Promise.all(Array.from(document.images).map(img => img.decode().then(
    () => ({alt: img.alt, width: img.naturalWidth, height: img.naturalHeight, error: null}),
    e => ({alt: img.alt, width: img.naturalWidth, height: img.naturalHeight, error: String(e)}))))"""


def open_in_chromium(page: Path, shot: Path, width: int = 1280) -> dict[str, Any]:
    """Load ``page`` in headless chromium; return console problems, requests, decoded images; save a screenshot."""
    assert CHROMIUM, "chromium is not installed"
    profile = tempfile.mkdtemp(prefix="edgemap-chromium-")
    browser = _Pipe([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                     "--disable-component-update", "--hide-scrollbars", f"--user-data-dir={profile}",
                     "--remote-debugging-pipe", "about:blank"])
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session=sid)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        url = page.resolve().as_uri()
        nav = browser.call("Page.navigate", {"url": url}, session=sid)
        if nav.get("errorText"):
            raise RuntimeError(f"navigation failed: {nav['errorText']}")
        browser.wait_event("Page.loadEventFired")
        images = browser.call("Runtime.evaluate", {"expression": _DECODE_ALL, "awaitPromise": True,
                                                   "returnByValue": True}, session=sid)["result"]["value"]
        title = browser.call("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                             session=sid)["result"]["value"]
        png = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                           session=sid, timeout=60)["data"]
        shot.write_bytes(base64.b64decode(png))
        ev = browser.events
        problems = [e["params"] for e in ev if e.get("method") == "Runtime.exceptionThrown"]
        problems += [e["params"] for e in ev if e.get("method") == "Runtime.consoleAPICalled"
                     and e["params"].get("type") in ("error", "assert", "warning")]
        problems += [e["params"]["entry"] for e in ev if e.get("method") == "Log.entryAdded"
                     and e["params"]["entry"].get("level") in ("error", "warning")]
        problems += [e["params"] for e in ev if e.get("method") == "Network.loadingFailed"]
        requests = [e["params"]["request"]["url"] for e in ev if e.get("method") == "Network.requestWillBeSent"]
        return {"url": url, "title": title, "images": images, "problems": problems, "requests": requests}
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed here (`apt-get install -y chromium`; .ci/run installs it)")
def test_report_renders_in_a_real_browser(finished_run: RunDir, tmp_path: Path) -> None:
    res = report(finished_run)
    shot = tmp_path / "report.png"
    seen = open_in_chromium(res.html, shot)
    assert seen["problems"] == [], seen["problems"]
    assert seen["title"] == f"edgemap report · {finished_run.path.name}"
    # nothing fetched but the page itself (data: URIs are not requests)
    assert [u for u in seen["requests"] if not u.startswith("data:")] == [seen["url"]], seen["requests"]
    sizes = {_png_size(p) for p in res.images.values()}
    assert len(seen["images"]) == len(res.images)
    for img in seen["images"]:
        assert img["error"] is None and img["width"] > 0 and img["height"] > 0, img
        assert (img["width"], img["height"]) in sizes, img
    w, h = _png_size(shot)
    assert w == 1280 and h > 2000  # the full page, not just the viewport
    if os.environ.get("EDGEMAP_REPORT_SHOTS"):
        dest = Path(os.environ["EDGEMAP_REPORT_SHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "report_full.png")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed here (`apt-get install -y chromium`; .ci/run installs it)")
def test_partial_report_renders_in_a_real_browser(finished_run: RunDir, tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path / "partial")
    for section in ("eval", "bench"):
        run.data["metrics"].pop(section)
    run.save()
    res = report(run, ReportOptions(predict=False))
    seen = open_in_chromium(res.html, tmp_path / "partial.png", width=800)
    assert seen["problems"] == [], seen["problems"]
    assert len(seen["images"]) == len(res.images) >= 1
    assert all(i["error"] is None and i["width"] > 0 for i in seen["images"])
    if os.environ.get("EDGEMAP_REPORT_SHOTS"):
        shutil.copy(tmp_path / "partial.png", Path(os.environ["EDGEMAP_REPORT_SHOTS"]) / "report_partial.png")


def test_confusion_without_eval_comes_from_own_predictions(finished_run: RunDir, tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path / "no eval")
    eval_rows = run.data["metrics"].pop("eval")["rows"]
    run.save()
    res = report(run)
    assert {"confusion_fp32", "confusion_int8", "misclassified"} <= set(res.images)
    assert res.sections["confusion"] == "ok" and res.sections["eval"].startswith("not run yet")
    cpu = {r["precision"]: r for r in eval_rows if r["runtime"] == "cpu"}
    n = res.checked
    for precision in ("fp32", "int8"):  # the same matrices eval stored, recomputed from the report's predictions
        assert n - res.misclassified[precision] == np.trace(np.asarray(cpu[precision]["confusion"]))


def test_plots_scale_to_many_long_class_names() -> None:
    from edgemap.report import plot_confusion

    classes = [f"a rather long class name {i:02d}" for i in range(60)]
    cm = np.random.default_rng(0).integers(0, 5, (60, 60))
    png = plot_confusion(cm, classes, "fp32", dpi=40)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_class_names_that_look_like_tex_are_plain_text() -> None:
    """A class folder named "$\\bad{$" made `edgemap report` (and `edgemap run`'s last stage) crash in mathtext."""
    from edgemap.report import plot_confusion

    assert plot_confusion(np.array([[3, 1], [0, 4]]), ["$\\bad{$", "$x^2$"], "fp32", dpi=40).startswith(b"\x89PNG")


def test_an_imperfect_accuracy_is_never_shown_as_100_percent() -> None:
    from edgemap.report import _pct

    assert _pct(1999 / 2000) == "99.95%" and _pct(0.99999) == "99.99%" and _pct(1.0) == "100.00%"
    assert _pct(0.96667) == "96.67%" and _pct(None) == "—"
    # the same rule everywhere a score is shown: the model card, `edgemap eval` and `edgemap run` (and the plots) said
    # 100 / 1 for 1 error in 30,000 while the report's table said 99.99%
    from edgemap.cli.cmd_eval import _f1
    from edgemap.cli.cmd_eval import _pct as eval_pct
    from edgemap.cli.cmd_run import _fmt
    from edgemap.metrics import score_text
    from edgemap.package import _as_percent

    acc = 29999 / 30000
    assert eval_pct(acc) == "99.99" and _fmt(acc, True) == "99.99" and _f1(0.99997) == "0.999"
    row = _as_percent([{"accuracy": acc, "top5": 1.0, "agreement": acc, "macro_f1": 0.99997}])[0]
    assert (row["accuracy %"], row["top5 %"], row["macro_f1"]) == ("99.99", "100.00", "0.9999"), row
    assert score_text(99.996, 2, 100) == "99.99" and score_text(100.0, 2, 100) == "100.00"
    assert score_text(0.5, 2, 1) == "0.50" and score_text(-0.004, 2, 1) == "-0.00"


def test_the_training_plot_stars_the_epoch_training_kept() -> None:
    """Tied validation accuracy: training keeps the later epoch with the lower loss; the plot starred the first."""
    from edgemap.report import _best_index

    epochs, acc = [1, 2, 3, 4], [50.0, 96.7, 96.7, 96.7]
    assert _best_index(epochs, acc, 4) == 3
    assert _best_index(epochs, acc, None) == 1  # no record of the kept epoch: the first best
    assert _best_index(epochs, [float("nan")] * 4, None) is None


def test_class_names_the_plot_font_lacks_are_one_report_warning(finished_run: RunDir, tmp_path: Path) -> None:
    """Class folders named in CJK printed one matplotlib UserWarning per glyph and plot (dozens of lines) and the
    report itself said nothing of the boxes in its plots."""
    import warnings

    from edgemap.report import ReportOptions, _Builder, plot_confusion

    b = _Builder(finished_run, ReportOptions(), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b.plot("cm1", plot_confusion, np.array([[3, 1], [0, 4]]), ["猫", "犬"], "fp32")
        b.plot("cm2", plot_confusion, np.array([[3, 1], [0, 4]]), ["猫", "cat"], "int8")
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
    b.glyph_warning()
    assert len(b.warnings) == 1 and "has no glyph for 2 character(s) of the class names (犬 猫)" in b.warnings[0], b.warnings
    assert "DejaVu Sans" in b.warnings[0]
    b2 = _Builder(finished_run, ReportOptions(), tmp_path)  # Latin names: no warning
    b2.plot("cm3", plot_confusion, np.array([[3, 1], [0, 4]]), ["cat", "dog"], "fp32")
    b2.glyph_warning()
    assert b2.warnings == []


def test_a_run_with_int8_models_but_no_int8_eval_row_is_sent_to_eval_not_export(finished_run: RunDir,
                                                                                 tmp_path: Path) -> None:
    """`eval --precision fp32` on a run with int8 models, then `report --no-predict`: the page said "no int8 model yet"
    and told the user to export --int8 again."""
    from edgemap.report import ReportOptions

    run = _copy_run(finished_run, tmp_path / "run")
    stored = run.data["metrics"]["eval"]
    stored["rows"] = [r for r in stored["rows"] if r.get("precision") == "fp32"]
    run.save()
    res = report(run.path, ReportOptions(predict=False))
    rd = shlex.quote(str(run.path))
    assert res.sections["confusion"] == "fp32 only (no current int8 eval row)", res.sections["confusion"]
    page = res.html.read_text(encoding="utf-8").replace("&#x27;", "'")
    assert f"edgemap eval {rd} --precision int8" in page and "no int8 model yet" not in page


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # matplotlib's overflow warnings on the planted 1e308s
@pytest.mark.parametrize("edit", ["batch_x", "p50_huge", "acc_huge", "confusion_huge", "epoch_huge"])
def test_hand_edited_figures_leave_a_section_out_not_a_traceback(finished_run: RunDir, tmp_path: Path,
                                                                 edit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values edgemap never writes (a batch of "x", 1e308 ms or accuracy, a 400-digit confusion count, epoch 1e308 in
    metrics.jsonl) crashed `edgemap report` with a traceback."""
    import json

    monkeypatch.delenv("EDGEMAP_REPORT_STRICT")

    from edgemap.report import ReportOptions

    run = _copy_run(finished_run, tmp_path / "run")
    m = run.data["metrics"]
    if edit == "batch_x":
        m["bench"]["rows"][0]["batch"] = "x"
    elif edit == "p50_huge":
        m["bench"]["rows"][0]["p50_ms"] = 1e308
    elif edit == "acc_huge":
        m["eval"]["rows"][1]["accuracy"] = 1e308
    elif edit == "confusion_huge":
        n = len(run.classes)
        m["eval"]["rows"][1]["confusion"] = [[10**400] * n] * n
    else:
        lines = (run.path / "metrics.jsonl").read_text().splitlines()
        first = json.loads(lines[0])
        first["epoch"] = 1e308
        (run.path / "metrics.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    run.save()
    res = report(run.path, ReportOptions(predict=False))  # raised before
    assert res.html.is_file()
    left_out = [k for k, v in res.sections.items() if v.startswith("left out: unreadable values")]
    expected = {"p50_huge": ["accuracy_latency"], "acc_huge": ["accuracy_latency"], "confusion_huge": ["confusion"]}
    assert left_out == expected.get(edit, []), (left_out, res.warnings)
    assert all(any(f"the {k} section is left out" in w for w in res.warnings) for k in left_out), res.warnings


def test_the_headline_compares_latencies_of_one_batch_size(finished_run: RunDir, tmp_path: Path) -> None:
    """With torch benched at batch 8 only, the card said "29.3× PyTorch eager": one call of 8 images against one
    of 1 image (per image, 3.7×)."""
    from edgemap.report import ReportOptions

    run = _copy_run(finished_run, tmp_path / "run")
    rows = run.data["metrics"]["bench"]["rows"]
    ref = next(r for r in rows if r["runtime"] == "torch" and r["precision"] == "fp32" and r["batch"] == 1)
    fastest = min((r for r in rows if r["status"] == "ok" and r["runtime"] != "torch"), key=lambda r: r["p50_ms"])
    page = report(run.path, ReportOptions(predict=False)).html.read_text(encoding="utf-8")
    ratio = ref["p50_ms"] / fastest["p50_ms"]
    assert f"{ratio:.1f}× PyTorch eager" in page  # one batch size: compared
    ref["batch"], ref["p50_ms"] = 8, ref["p50_ms"] * 8
    run.save()
    page = report(run.path, ReportOptions(predict=False)).html.read_text(encoding="utf-8")
    assert "× PyTorch eager" not in page


def test_a_class_name_with_a_direction_override_stays_inside_its_name(finished_run: RunDir, tmp_path: Path) -> None:
    """A class folder named "\\u202egnp.exe" reversed the rest of the header line after it (the other names)."""
    from edgemap.report import ReportOptions

    run = _copy_run(finished_run, tmp_path / "run")
    run.data["classes"][0] = run.data["dataset"]["classes"][0] = "\u202egnp.exe"
    run.save()
    page = report(run.path, ReportOptions(predict=False)).html.read_text(encoding="utf-8")
    assert "(<bdi>\u202egnp.exe</bdi>, <bdi>1</bdi>," in page


def test_eval_bench_and_report_clear_temps_a_kill_left(finished_run: RunDir, tmp_path: Path) -> None:
    """A kill -9 while eval, bench or report saved left .*.edgemap-tmp files that only finetune or export removed
    (report/'s never)."""
    from edgemap.bench import BenchOptions, bench
    from edgemap.evaluate import EvalOptions, evaluate
    from edgemap.report import ReportOptions

    run = _copy_run(finished_run, tmp_path / "run")
    stale = [run.path / ".edgemap.json.0123456789ab.edgemap-tmp", run.path / "report" / ".report.html.0123456789ab.edgemap-tmp"]
    for p in stale:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"cut short")
    report(run.path, ReportOptions(predict=False))
    assert not stale[1].exists() and stale[0].exists()  # report cleans its own folder
    evaluate(run.path, EvalOptions(runtimes=("cpu",), precisions=("fp32",)))
    assert not stale[0].exists()
    stale[0].write_bytes(b"cut short")
    bench(run.path, BenchOptions(runtimes=("cpu",), precisions=("fp32",), batches=(1,), iters=2, warmup=0))
    assert not stale[0].exists()
