"""Cold start of the device wheel vs a bare ``import onnxruntime``, and wheel size vs model size.

Cold start = a new interpreter + ``import <wheel module>`` + model load (sha256 check,
metadata read, session creation) + the first prediction on one image file. It is compared
with ``python -c "import onnxruntime"`` in the same fresh venv (the floor every ORT-based
device program pays). Goal: <= 0.3 s above that floor; wheel size <= model size + 100 KB.

Each command runs once untimed (page cache), then ``--runs`` times, alternating the
commands so that load from other processes hits them alike; medians are reported.

By default the model is EfficientNet-Lite0 (ImageNet weights, random 10-class head) at
224 px, exported int8 by ``edgemap.export`` (built the way benchmarks/bench_vs_benchmark_app.py
builds it); ``--run RUN_DIR`` uses an existing exported run instead.

Usage:
    python benchmarks/cold_start.py [--run RUN_DIR] [--runtime onnxruntime|openvino] [--runs 9] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="an exported run dir (default: build a Lite0 int8 run in a temp dir)")
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"])
    ap.add_argument("--precision", default=None, choices=["int8", "fp32"])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()

    from edgemap.package import PackageOptions, package

    with tempfile.TemporaryDirectory(prefix="edgemap-cold-start-") as tmp_s:
        tmp = Path(tmp_s)
        if args.run is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_vs_benchmark_app import build_run

            print("building an EfficientNet-Lite0 int8 run (224 px) ...", flush=True)
            run = build_run(tmp / "lite0")
            run_dir = run.path
        else:
            run_dir = args.run
        res = package(run_dir, PackageOptions(runtime=args.runtime, precision=args.precision, name="cold-start-clf",
                                              out=tmp / "dist"))
        print(f"wheel {res.wheel.name}: {res.wheel_bytes:,} bytes; model ({res.precision}) {res.model_bytes:,} bytes; "
              f"overhead {res.overhead_bytes:,} bytes ({res.overhead_bytes / 1024:.1f} KiB; goal <= 100 KiB)", flush=True)

        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = venv / "bin" / "python"
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(res.wheel)], check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

        from PIL import Image

        from edgemap.manifest import RunDir

        c = RunDir.load(run_dir).contract
        img = tmp / "photo.jpg"
        Image.new("RGB", (c.width * 2, c.height * 2), (120, 80, 40)).save(img, quality=90)
        engine = "onnxruntime" if args.runtime == "onnxruntime" else "openvino"
        cmds = {
            "python -c pass": [str(py), "-c", "pass"],
            f"import {engine}": [str(py), "-c", f"import {engine}"],
            "import + load + first predict": [str(py), "-c",
                                              f"import cold_start_clf as m; m.load().predict({str(img)!r})"],
            "console command": [str(venv / "bin" / res.command), str(img)],
        }
        for argv in cmds.values():  # untimed: page cache, .pyc compilation
            timed(argv, env)
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(args.runs):
            for k, argv in cmds.items():
                times[k].append(timed(argv, env))
        med = {k: statistics.median(v) for k, v in times.items()}
        floor = med[f"import {engine}"]
        print(f"\ncold start, median of {args.runs} runs ({os.cpu_count()} CPUs visible):")
        for k, v in med.items():
            extra = f"  (+{v - floor:.3f} s over import {engine})" if k not in ("python -c pass", f"import {engine}") else ""
            print(f"  {k:32s} {v:.3f} s{extra}")
        over = med["import + load + first predict"] - floor
        print(f"\ngoal: <= 0.300 s above `import {engine}`: {'met' if over <= 0.3 else 'NOT met'} ({over:.3f} s)")
        print(f"goal: wheel <= model + 100 KiB: {'met' if res.overhead_bytes <= 100 * 1024 else 'NOT met'}")
        if args.json:
            args.json.write_text(json.dumps({
                "runs": args.runs, "median_s": med, "over_import_s": over, "wheel_bytes": res.wheel_bytes,
                "model_bytes": res.model_bytes, "overhead_bytes": res.overhead_bytes, "runtime": args.runtime,
                "precision": res.precision,
            }, indent=2) + "\n")


if __name__ == "__main__":
    main()
