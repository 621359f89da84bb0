#!/usr/bin/env bash
# Prepares, on a CPU machine, what bench/gpu_check.py needs on the lent GPU machine (Python 3.12 with
# torch, triton, transformers and peft, but no bitsandbytes): a slim bitsandbytes in .gpu/site (its
# Python package and only the CUDA 13.0 and CPU libraries, ~5 MB instead of a 41 MB wheel).
# Then, with the device tool: run(carry=[".gpu"], timeout_s=540, command=
#   "PYTHONUNBUFFERED=1 PYTHONPATH=.gpu/site:. timeout 480 python3 -m bench.gpu_check --out $OUT")
set -euo pipefail
cd "$(dirname "$0")/.."
# the version make install locks (constraints.txt), unless BNB_VERSION says otherwise
BNB_VERSION="${BNB_VERSION:-$(sed -n 's/^bitsandbytes==//p' constraints.txt)}"
[ -n "$BNB_VERSION" ] || { echo "no bitsandbytes pin in constraints.txt" >&2; exit 1; }
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu /tmp/gpu_prep_wheels
mkdir -p .gpu/site /tmp/gpu_prep_wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d /tmp/gpu_prep_wheels "bitsandbytes==${BNB_VERSION}"
python3 -m zipfile -e /tmp/gpu_prep_wheels/bitsandbytes-*.whl .gpu/site
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*' ! -name '*cuda130*' ! -name '*_cpu*' -delete
du -sh .gpu
