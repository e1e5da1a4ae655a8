#!/usr/bin/env bash
# Download, into .whl/ (ignored by git), the wheels that tools/device_check.sh installs on a GPU
# machine that has torch and lightning but not the rest of unitrain's stack, and cannot reach a
# package registry. Run it here, where pip can: `bash tools/device_wheels.sh`, then call the device
# tool's run with carry [".whl"] and the command `bash tools/device_check.sh` (docs/guide.md).
#
# Target: CPython 3.12, manylinux x86_64 (the device image's /opt/torch/.venv). Each wheel is
# fetched with --no-deps; the list below is the runtime Requires-Dist closure of torchrl, tensordict,
# gymnasium, ale-py and omegaconf minus what the device image already holds (torch, numpy,
# cloudpickle, packaging, pyyaml, typing-extensions, zipp: KINDS.md's package list). The versions are
# those of the project's development venv; the script checks that torchrl's and tensordict's
# metadata accept torch 2.11 (the device image's torch) and fails if not.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST=.whl
WHEELS=(
    torchrl==0.14.1
    tensordict==0.14.3
    hoptorch==0.1.4            # torchrl
    pyvers==0.2.3              # torchrl, tensordict
    orjson==3.13.0             # tensordict (python < 3.13)
    importlib-metadata==10.2.0 # tensordict
    lazy-importer==0.1.0       # importlib-metadata
    gymnasium==1.4.0
    farama-notifications==0.0.6  # gymnasium
    ale-py==0.12.1             # ships the Atari ROMs
    omegaconf==2.4.0           # needs only PyYAML (2.4 dropped antlr4-python3-runtime)
)
PLATFORMS=()
for n in 39 35 34 31 28 27 24 17 5; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

grep -qxF '/.whl/' .gitignore 2>/dev/null || grep -qxF '.whl/' .gitignore || echo '.whl/' >> .gitignore
rm -rf "$DEST"
mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" -d "$DEST" "$spec" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
done

# torch 2.11 on the device: the two packages that pin torch must accept it.
status=0
for w in "$DEST"/torchrl-*.whl "$DEST"/tensordict-*.whl "$DEST"/hoptorch-*.whl; do
    req=$(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist: torch' | grep -v extra || true)
    echo "$(basename "$w"): ${req:-no torch requirement}"
    if ! "$PY" - "$req" <<'EOF'
import sys
from packaging.requirements import Requirement
from packaging.version import Version
line = sys.argv[1].removeprefix("Requires-Dist: ").strip()
sys.exit(0 if not line or Version("2.11.0") in Requirement(line).specifier else 1)
EOF
    then
        echo "  -> does NOT accept torch 2.11: pick an older torchrl/tensordict pair" >&2
        status=1
    fi
done
echo
ls -l "$DEST" | awk 'NR>1 {printf "%8.2f MiB  %s\n", $5/1048576, $9}'
du -sb "$DEST" | awk '{printf "total %.2f MiB in %s\n", $1/1048576, $2}'
exit $status
