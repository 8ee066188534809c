#!/usr/bin/env bash
# The whole mapping on the bundled digits demo, end to end, on a CPU, with no network until step 7 (the device
# venv installs numpy, Pillow and onnxruntime from your package index, or a wheelhouse: PIP_FIND_LINKS=DIR):
#
#   datasets digits → finetune → export --int8 → eval → bench → package
#   → pip install the wheel into a fresh venv WITHOUT torch → classify images with it.
#
# Usage (from the repository root, in edgemap's environment):
#   bash examples/digits_end_to_end.sh [WORK_DIR]          # default WORK_DIR: ./digits-demo
#   EPOCHS=2 IMG_SIZE=64 BACKBONE=efficientnet_lite0 bash examples/digits_end_to_end.sh
#
# Every step prints the next one; this script just runs them in order and stops at the
# first failure (set -e). Paths may contain spaces.
set -euo pipefail

WORK="${1:-digits-demo}"
EPOCHS="${EPOCHS:-3}"
IMG_SIZE="${IMG_SIZE:-64}"           # EfficientNet-Lite wants multiples of 32; digits are 8x8 anyway
BACKBONE="${BACKBONE:-efficientnet_lite0}"
PYTHON="${PYTHON:-python3}"          # the interpreter of the device-side venv
DATA="$WORK/data"
RUN="$WORK/run"

if [ -e "$RUN" ]; then
    echo "$RUN already exists: remove it (rm -rf \"$WORK\") or pass another WORK_DIR" >&2
    exit 1
fi
mkdir -p "$WORK"
echo "== 1. dataset: scikit-learn's 1,797 digits as DATA/train|val/<digit>/*.png"
edgemap datasets digits "$DATA" --force

echo "== 2. finetune $BACKBONE at ${IMG_SIZE}px for $EPOCHS epochs (digits: no flips)"
edgemap finetune "$DATA" --out "$RUN" --backbone "$BACKBONE" --img-size "$IMG_SIZE" --epochs "$EPOCHS" --no-flip

echo "== 3. export: model.onnx + int8 (QOperator for ONNX Runtime, QDQ for OpenVINO), parity + accuracy gate"
PRECISION=int8
if ! edgemap export "$RUN" --int8; then
    # The gate refused every int8 attempt (an under-trained model quantizes badly: raise EPOCHS /
    # IMG_SIZE). fp32 model.onnx was written and verified before the gate: deploy that instead.
    echo "int8 accuracy gate failed: continuing with the fp32 model" >&2
    PRECISION=fp32
fi

echo "== 4. eval: accuracy of every runtime x precision on the validation split"
edgemap eval "$RUN" --runtime torch,cpu,openvino --precision fp32,int8

echo "== 5. bench: latency at batch 1"
edgemap bench "$RUN" --runtime cpu,openvino --precision fp32,int8 --batch 1 --iters 50

echo "== 6. package: a torch-free wheel with the $PRECISION model (ONNX Runtime CPU)"
edgemap package "$RUN" --runtime onnxruntime --precision "$PRECISION" --name digits-classifier --version 1.0.0 --out "$WORK/dist"
WHEEL="$(ls "$WORK"/dist/digits_classifier-1.0.0-py3-none-any.whl)"

echo "== 7. device side: a fresh venv (no torch, no edgemap), pip install the wheel"
rm -rf "$WORK/device-venv"
"$PYTHON" -m venv "$WORK/device-venv"
"$WORK/device-venv/bin/python" -m pip install -q "$WHEEL"
if "$WORK/device-venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "torch is importable in the device venv: unexpected" >&2; exit 1
fi

echo "== 8. classify: three validation images, then a whole folder to CSV"
mapfile -t SOME < <(find "$DATA/val/3" "$DATA/val/7" -name '*.png' | sort | head -n 3)
"$WORK/device-venv/bin/digits-classifier" "${SOME[@]}" --top-k 2
"$WORK/device-venv/bin/python" examples/device_classify_folder.py "$DATA/val/7" "$WORK/val7.csv" --module digits_classifier
echo "wrote $WORK/val7.csv ($(($(wc -l < "$WORK/val7.csv") - 1)) rows)"
