#!/usr/bin/env bash
# Downloads into .whl/ every wheel the GPU machine's image lacks (CPython 3.12,
# manylinux x86_64; the pins of benchmarks/accelerator_wheels.txt), builds the wheels of
# packages published only as source archives, then checks the set is complete:
# `python -m benchmarks.accelerator_wheels check` (pip's resolver, offline, over kexue's
# requirements with .whl/ and the image's packages as the only candidates).
#
#   bash benchmarks/accelerator_wheels.sh            # from any directory
#   PYTHON=.venv/bin/python bash benchmarks/accelerator_wheels.sh
#
# The machine's own pip configuration (extra indexes, find-links, constraints) is
# ignored so that only the pins decide; PIP_CERT is kept for the network.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PINS=benchmarks/accelerator_wheels.txt
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_CONSTRAINT PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_NO_INDEX || true

binary=()
build=()
while IFS= read -r line; do
  spec=${line%%#*}
  spec=${spec//[[:space:]]/}
  [[ -z $spec ]] && continue
  if [[ $line == *"# build"* ]]; then build+=("$spec"); else binary+=("$spec"); fi
done <"$PINS"

platforms=()
for tag in manylinux1_x86_64 manylinux2010_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done

rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d .whl "${binary[@]}"
for spec in "${build[@]}"; do
  "$PYTHON" -m pip wheel --quiet --no-deps --no-binary "${spec%%==*}" -w .whl "$spec"
done
ls -l .whl
"$PYTHON" -m benchmarks.accelerator_wheels check
