#!/bin/bash
# The wheels benchmarks/speed.py needs on a lent GPU machine, whose Python 3.12 has torch,
# transformers, scipy, scikit-learn and torch-geometric but not crslab, loguru, fuzzywuzzy, nltk,
# defusedxml or faiss (without them speed.py measures the simulator only). About 20 MB.
#
# Usage (here, once): benchmarks/gpu_wheels.sh [DIR]      (default DIR: .whl at the repository root;
#   keep it out of git: echo /.whl/ >> .git/info/exclude). PYTHON names the interpreter whose pip
#   downloads (default: python3).
# The device command then carries DIR (carry: [".whl"]) and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
#   PYTHONUNBUFFERED=1 python3 benchmarks/speed.py --device cuda --arch bert-base --out $OUT/speed.md
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$repo/.whl}
python=${PYTHON:-python3}
mkdir -p "$dest"
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dest" \
  crslab==0.1.2 loguru==0.7.3 fuzzywuzzy==0.18.0 nltk==3.10.4 defusedxml==0.7.1 faiss-cpu==1.15.1
ls -la "$dest"
