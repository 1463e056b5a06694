#!/usr/bin/env bash
# Fetch Fashion-MNIST's four IDX files into DIR without root, from Debian's archive (package
# dataset-fashion-mnist), for `rtl run fashion_mnist --data DIR`:
#
#   scripts/fetch_fashion_mnist.sh DIR
#
# With root, `apt-get install dataset-fashion-mnist` puts the same files in
# /usr/share/datasets/fashion-mnist, the config's default. This is a set-up step: runs never download.
set -euo pipefail
die() { echo "fetch_fashion_mnist: error: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: scripts/fetch_fashion_mnist.sh DIR (the folder to put the four .gz files in)"
command -v apt-get >/dev/null || die "needs apt-get (Debian/Ubuntu); elsewhere download the four *-ubyte.gz files \
from https://github.com/zalandoresearch/fashion-mnist into DIR"
mkdir -p "$1" || die "cannot create $1"
dir=$(cd "$1" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download dataset-fashion-mnist >/dev/null) || die "apt-get download dataset-fashion-mnist failed"
dpkg-deb -x "$work"/dataset-fashion-mnist_*.deb "$work/root"
found=$(ls "$work"/root/usr/share/datasets/fashion-mnist/*-ubyte* 2>/dev/null | wc -l)
[ "$found" -eq 4 ] || die "the package holds $found IDX files, expected 4"
cp "$work"/root/usr/share/datasets/fashion-mnist/*-ubyte* "$dir"/
echo "fetch_fashion_mnist: the four IDX files are in $dir (rtl run fashion_mnist --data $dir)"
