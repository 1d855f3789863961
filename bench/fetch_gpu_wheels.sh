#!/usr/bin/env bash
# Fill .gpu-wheels/ with the wheels the GPU machine lacks, for bench/gpu_check.sh to install there.
#
# Run it HERE (this machine reaches PyPI; the GPU machine reaches nothing):
#     bash bench/fetch_gpu_wheels.sh            # -> .gpu-wheels/ (ignored by git, carried to the GPU machine)
#
# The GPU machine's image (Python 3.12, torch 2.11, transformers 5.17, peft, accelerate, safetensors,
# numpy, pandas, pyarrow, pytest, pyyaml, fsspec, xxhash, huggingface_hub ...; see
# ../shared/ENVIRONMENT.md) lacks:
#   - what the training code imports: pydantic and its three helpers (pipelines/config.py);
#   - TRL and what `from trl import GRPOConfig, GRPOTrainer` imports beyond the image: datasets,
#     dill, multiprocess.
# Two more are fallbacks for the image's own copies, installed only if its version does not fit:
# typing-extensions (pydantic 2.14 needs >= 4.16) and fsspec (datasets 5.2 needs <= 2026.9.0).
# pyarrow is not carried (datasets 5.2 wants >= 24; its wheel alone is ~45 MB): gpu_check.sh falls
# back to installing without dependency checks if the image's is older.
#
# Every wheel is pinned and fetched without its dependencies, so the set is exactly this list;
# versions are the ones this project's .venv runs (pyproject.toml pins trl 1.16.0 and datasets 5.2.0),
# checked against transformers 5.17 and torch 2.11 (TRL 1.16 asks for transformers >= 4.56.2).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/.gpu-wheels}"
LIMIT_MIB=50
PIP="${PIP:-$REPO/.venv/bin/pip}"
[ -x "$PIP" ] || PIP="python3 -m pip"

WHEELS=(
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    fsspec==2026.9.0
)

mkdir -p "$DEST"
# One version of each package: an older wheel left beside a newer one would make pip pick either.
find "$DEST" -maxdepth 1 -name '*.whl' -delete
for spec in "${WHEELS[@]}"; do
    $PIP download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any -d "$DEST" "$spec"
done

ls -1 "$DEST"
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $mib MiB"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "error: $mib MiB is over the $LIMIT_MIB MiB that may travel to the GPU machine (64 MiB in all with" \
        "the working tree); drop a wheel the image already has from WHEELS in $0" >&2
    exit 1
fi
