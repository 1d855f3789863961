#!/usr/bin/env bash
# The device check on the GPU machine (issue 42.5), in at most 8 minutes, three phases each under
# its own time limit:
#   1. install: a venv over the image's packages (torch 2.11, transformers 5.17, peft, ...) plus the
#      wheels carried in .gpu-wheels/ (fill it here first: bash bench/fetch_gpu_wheels.sh);
#   2. check:   bench/gpu_check.py            -> gpu_check.json (and check.log)
#   3. tests:   pytest -m gpu                 -> gpu_tests.xml  (and tests.log)
# Results go under $OUT (the folder the GPU machine sends back), else bench/results/gpu-check/;
# phases.json there records which phases ran, their exit codes and times.
#
#   bash bench/gpu_check.sh                  # on the GPU machine (carry .gpu-wheels)
#   bash bench/gpu_check.sh --device cpu     # here: a dry run at tiny sizes with .venv, nothing installed
#
# Options: --device cuda|cpu; --out DIR; --python PY (run with PY as it is: no venv, no install);
# --sections a,b and --steps N are passed to gpu_check.py. Exit status: 0 when every phase passed.
# BASE_PYTHON (default python3, the image's python with torch) is what the venv is made from.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda
OUTDIR="${OUT:-$REPO/bench/results/gpu-check}"
PY=""
CHECK_ARGS=()
# 60 + 340 + 50 = 450 s, and at most 10 s more for each phase to die after its limit: inside the 8 minutes.
INSTALL_LIMIT=60
CHECK_LIMIT=340
TESTS_LIMIT=50

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --out) OUTDIR="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --sections | --steps) CHECK_ARGS+=("$1" "$2"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "error: unknown option $1 (see bash $0 --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in
    cuda | cpu) ;;
    *) echo "error: --device $DEVICE: use cuda (the GPU machine) or cpu (a dry run)" >&2; exit 2 ;;
esac
mkdir -p "$OUTDIR"
cd "$REPO" || exit 2
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=true PIP_DISABLE_PIP_VERSION_CHECK=1

PHASES=()
FAILED=0
# record NAME RAN RC SECONDS LIMIT: phases.json is rewritten after every phase, so a run cut short keeps it.
record() {
    PHASES+=("{\"phase\": \"$1\", \"ran\": $2, \"rc\": $3, \"seconds\": $4, \"limit_s\": $5}")
    if [ "$2" = true ] && [ "$3" != 0 ]; then FAILED=1; fi
    local IFS=,
    printf '{"device": "%s", "phases": [%s]}\n' "$DEVICE" "${PHASES[*]}" >"$OUTDIR/phases.json"
}

# run_phase NAME LIMIT LOG COMMAND...: the command under `timeout`, its output in LOG and on the terminal.
run_phase() {
    local name=$1 limit=$2 log=$3 started rc
    shift 3
    started=$(date +%s)
    echo "== $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "== $name: stopped at its ${limit} s limit"
    record "$name" true "$rc" $(($(date +%s) - started)) "$limit"
    return "$rc"
}

# The venv: the image's python may itself be a venv (/opt/torch/.venv), and then
# --system-site-packages shows the base interpreter's packages, not the image's torch; a .pth file
# adds the image's site-packages after the venv's own, so the carried wheels come first.
make_venv() {
    local base=$1 venv=$2
    rm -rf "$venv"
    "$base" -m venv --system-site-packages --without-pip "$venv" || return
    "$base" -c 'import site; print("\n".join(site.getsitepackages()))' >"$(site_of "$venv")/_image_site_packages.pth"
}

site_of() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

install() {
    local venv=$1 wheels="$REPO/.gpu-wheels"
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "error: no wheels in $wheels: run bash bench/fetch_gpu_wheels.sh on a machine that reaches PyPI," \
            "then carry .gpu-wheels to the GPU machine" >&2
        return 3
    fi
    make_venv "${BASE_PYTHON:-python3}" "$venv" || return
    if ! "$venv/bin/python" -c 'import pip' 2>/dev/null; then
        # A wheel is a zip of what goes into site-packages: without pip, unpack them (no dependency check).
        echo "warning: the image has no pip; unpacking the carried wheels into the venv" >&2
        for wheel in "$wheels"/*.whl; do "$venv/bin/python" -m zipfile -e "$wheel" "$(site_of "$venv")" || return; done
        "$venv/bin/python" -c 'import pydantic, datasets, trl' && return
    fi
    local pip=("$venv/bin/python" -m pip install --no-index --find-links "$wheels" --no-cache-dir --quiet)
    # With dependencies checked against the image first; if the image's versions do not fit (an old
    # pyarrow for datasets, say), every carried wheel without the check, which mostly still imports.
    if ! "${pip[@]}" trl datasets pydantic; then
        echo "warning: the carried wheels' dependencies do not fit the image; installing them without the check" >&2
        "${pip[@]}" --no-deps "$wheels"/*.whl || return
    fi
    "$venv/bin/python" -c 'import torch, transformers, peft, pydantic, datasets, trl
print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'
}

DRY=()
if [ -n "$PY" ]; then
    record install false 0 0 "$INSTALL_LIMIT"
elif [ "$DEVICE" = cpu ]; then
    # Here: the project's own environment has everything; one thread is fastest for tiny models.
    PY="$REPO/.venv/bin/python"
    [ -x "$PY" ] || PY=python3
    record install false 0 0 "$INSTALL_LIMIT"
else
    VENV="${TMPDIR:-/tmp}/grpo-gpu-venv"
    export REPO
    export -f install make_venv site_of  # `timeout` runs commands, not functions: a child bash runs them
    run_phase install "$INSTALL_LIMIT" install.log bash -c 'install "$0"' "$VENV"
    PY="$VENV/bin/python"
    [ -x "$PY" ] || PY="${BASE_PYTHON:-python3}"
fi
[ "$DEVICE" = cpu ] && DRY=(--dry-run --threads 1)

run_phase check "$CHECK_LIMIT" check.log \
    "$PY" bench/gpu_check.py --device "$DEVICE" --out "$OUTDIR" "${DRY[@]}" "${CHECK_ARGS[@]}"

# Only the files that hold gpu tests: the others import MLflow, Prefect or DVC, which the image lacks.
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
if [ "${#GPU_TESTS[@]}" -gt 0 ]; then
    run_phase tests "$TESTS_LIMIT" tests.log "$PY" -m pytest -m gpu -q -p no:cacheprovider \
        --continue-on-collection-errors --junitxml="$OUTDIR/gpu_tests.xml" "${GPU_TESTS[@]}"
else
    record tests false 0 0 "$TESTS_LIMIT"
fi

echo "== results in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
exit "$FAILED"
