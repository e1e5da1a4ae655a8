#!/usr/bin/env bash
# One check of a GPU machine (the device tool's H100/H200 image: torch with CUDA and lightning, no
# network): install the rest of unitrain's stack from the wheels in .whl/ (tools/device_wheels.sh
# fetches them), check that it imports against that torch, run the CUDA tests
# (tests/test_cuda.py, marker cuda) and time GPU against CPU (tools/bench_device.py). It ends
# with ONE table, printed and, when $OUT is set, written to $OUT/device_check.md beside the logs.
#
#   bash tools/device_check.sh            # the full check, planned for under 4 minutes
#   bash tools/device_check.sh --quick    # tiny benchmark sizes
#
# Environment: PYTHON (default python3), UNITRAIN_DEVICE_CHECK_NO_INSTALL=1 (use what is
# importable already: no wheel install), TESTS_TIMEOUT / BENCH_TIMEOUT (seconds; 120 / 150).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
QUICK=""
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK="--quick" ;;
        *) echo "device_check.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
export PYTHONUNBUFFERED=1 RL_WARNINGS=0 PYTHONWARNINGS=ignore
WORK="$(mktemp -d)"
ROWS="$WORK/rows.md"
LOGS="${OUT:-$WORK}"
mkdir -p "$LOGS"
start=$SECONDS
add() { echo "| $1 | $2 | ${3:--} | ${4:--} |" >> "$ROWS"; }

# 1. The wheels: installed into /tmp/site, ahead of the image's packages.
if [ -n "${UNITRAIN_DEVICE_CHECK_NO_INSTALL:-}" ]; then
    add "wheels" "not installed (UNITRAIN_DEVICE_CHECK_NO_INSTALL)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif compgen -G ".whl/*.whl" > /dev/null; then
    n=$(ls .whl/*.whl | wc -l)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl > "$LOGS/install.log" 2>&1; then
        add "wheels" "$n installed from .whl/ into /tmp/site"
    else
        add "wheels" "install FAILED (install.log): $(tail -1 "$LOGS/install.log" | tr '|' '/')"
    fi
    export PYTHONPATH="/tmp/site:$PWD"
else
    add "wheels" "none in .whl/ (run tools/device_wheels.sh, carry .whl)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. Imports and versions; the compiled parts of torchrl and tensordict against this torch.
"$PY" - "$ROWS" <<'EOF'
import importlib, sys, traceback
rows = open(sys.argv[1], "a")
def add(what, result):
    rows.write(f"| {what} | {str(result).replace('|', '/')} | - | - |\n")
import torch
cuda = torch.cuda.is_available()
add("torch", f"{torch.__version__}, CUDA {torch.version.cuda}; "
    + (f"{torch.cuda.get_device_name(0)}" if cuda else "no CUDA device"))
for name in ["torchrl", "tensordict", "gymnasium", "ale_py", "omegaconf", "lightning",
             "unitrain"]:
    try:
        mod = importlib.import_module(name)
        add(f"import {name}", getattr(mod, "__version__", "ok"))
    except Exception as e:
        add(f"import {name}", f"FAILED: {type(e).__name__}: {e}"[:200])
# tensordict's _C (pybind11 only) is imported by tensordict itself; torchrl's _torchrl links
# libtorch and is built against one torch: torchrl imports without it (only prioritized replay,
# unused by unitrain, needs it).
for ext in ["tensordict._C", "torchrl._torchrl"]:
    try:
        importlib.import_module(ext)
        add(f"compiled {ext}", f"loads against torch {torch.__version__}")
    except Exception as e:
        unused = " (unitrain does not use it)" if ext == "torchrl._torchrl" else ""
        add(f"compiled {ext}", f"does NOT load{unused}: {type(e).__name__}: {e}"[:220])
try:
    import gymnasium as gym, ale_py
    gym.register_envs(ale_py)
    env = gym.make("ALE/Pong-v5")
    env.reset(seed=0)
    env.close()
    add("ALE/Pong-v5 (ROMs shipped by ale-py)", "makes and resets")
except Exception as e:
    add("ALE/Pong-v5", f"FAILED: {type(e).__name__}: {e}"[:200])
EOF

# 3. The CUDA tests (skipped, and so reported, where CUDA is absent).
timeout -k 10 "${TESTS_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py \
    --junitxml="$WORK/junit.xml" > "$LOGS/pytest.log" 2>&1
rc=$?
{ [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && add "tests/test_cuda.py" "stopped at ${TESTS_TIMEOUT:-120} s (pytest.log)"
"$PY" - "$WORK/junit.xml" "$ROWS" "$rc" <<'EOF'
import os, sys
import xml.etree.ElementTree as ET
path, rows, rc = sys.argv[1], open(sys.argv[2], "a"), sys.argv[3]
if not os.path.exists(path):
    rows.write(f"| tests/test_cuda.py | no report (pytest exit {rc}; pytest.log) | - | - |\n")
    sys.exit()
for case in ET.parse(path).getroot().iter("testcase"):
    outcome = "passed"
    for tag in ("failure", "error", "skipped"):
        el = case.find(tag)
        if el is not None:
            msg = (el.get("message") or "").splitlines()[0][:150] if el.get("message") else ""
            outcome = f"{'SKIPPED' if tag == 'skipped' else tag.upper()}: {msg}"
            break
    secs = float(case.get("time", 0))
    rows.write(f"| test {case.get('name')} | {outcome.replace('|', '/')} ({secs:.0f} s) | - | - |\n")
EOF

# 4. GPU against CPU (rows appended as they are measured, so a stop part way keeps them).
timeout -k 10 "${BENCH_TIMEOUT:-150}" "$PY" tools/bench_device.py $QUICK --rows "$ROWS" \
    > "$LOGS/bench.log" 2>&1
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    add "bench_device.py" "stopped at ${BENCH_TIMEOUT:-150} s: rows above are those it finished"
elif [ "$rc" -ne 0 ]; then
    add "bench_device.py" "FAILED (exit $rc): $(grep -v '^\[' "$LOGS/bench.log" | tail -1 | tr '|' '/')"
fi
add "device_check.sh wall time" "$((SECONDS - start)) s"

# 5. The one table.
{
    echo "| what | GPU (or result) | CPU | GPU/CPU |"
    echo "| --- | --- | --- | --- |"
    cat "$ROWS"
} > "$WORK/device_check.md"
[ -n "${OUT:-}" ] && cp "$WORK/device_check.md" "$OUT/device_check.md"
echo
cat "$WORK/device_check.md"
