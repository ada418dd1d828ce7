#!/usr/bin/env bash
# Installs CRSLab 0.1.2 and lotcrs_plugin on today's Python stack.
#   bash install.sh          install into the active virtual environment, or into ./.venv
#   bash install.sh --test   the same, plus what the test suite needs
# CRSLab's 2021 pins cannot be resolved on Python 3.11, so it is installed with --no-deps and the
# modern versions of what it imports come from setup.cfg. A torch that is already installed
# (a user's CUDA build, say) is kept; without one, the CPU build torch==2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")"
extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    *) echo "install.sh: unknown option '$arg' (known: --test)" >&2; exit 2 ;;
  esac
done
if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]]; then
  py=python
else
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  py=.venv/bin/python
fi
pip=("$py" -m pip install --quiet --disable-pip-version-check)
if "$py" -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
else
  "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" ".${extras}"
# last, so that pip does not list CRSLab's unmet 2021 pins as conflicts
"${pip[@]}" --no-deps "crslab==0.1.2"
echo "install.sh: installed into $("$py" -c 'import sys; print(sys.prefix)')"
