#!/usr/bin/env bash
# Create .venv and install routing-lottery into it (with test extras when given "test").
#
# torch: an unpinned `pip install torch` on Linux pulls a multi-GB CUDA build. If torch is already
# importable in .venv it is kept (bring your own CUDA build that way). Otherwise we install a CPU
# build: a locally cached CPU wheel when pip's find-links holds one (fast, offline), else the
# newest CPU build from PyTorch's CPU index. Any torch >= 2.2 works.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
python3 -m venv .venv
py=.venv/bin/python
pip_install() { "$py" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
  links=$("$py" -m pip config get global.find-links 2>/dev/null || echo "${PIP_FIND_LINKS:-}")
  wheel=""
  for dir in $links; do
    wheel=$(ls "$dir"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$wheel" ] && break
  done
  if [ -n "$wheel" ]; then
    echo "setup: torch from the cached CPU wheel $(basename "$wheel")"
    pip_install "$wheel"
  else
    echo "setup: torch (CPU build) from https://download.pytorch.org/whl/cpu"
    pip_install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# WordNet 3.0 for the semantic diagnostics, read offline from Debian's packages.
if [ ! -f /usr/share/wordnet/data.noun ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  echo "setup: WordNet 3.0 (Debian wordnet-base, wordnet-sense-index)"
  { $sudo apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null 2>&1 \
    || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null 2>&1; }; } \
    || echo "setup: could not install WordNet; semantic diagnostics will say how to install it"
fi
if [ "$extras" = "test" ]; then pip_install -e ".[contexts,test]"; else pip_install -e ".[contexts]"; fi
echo "setup: done ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
