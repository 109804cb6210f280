#!/usr/bin/env bash
# Packs .whl/: the wheels the lent GPU machine lacks (bitsandbytes, deepspeed, liger-kernel and their small pure-Python
# needs), for its Python 3.12 and torch 2.11 + CUDA 13.0. That machine reaches no package registry; the working tree
# travels to it with the ignored folders a call names (64 MiB in all), so .whl/ must be carried and stay small.
#
# Here (the CPU machine, venv active, registries reachable), from anywhere in the checkout:
#     bash bench/pack_gpu_wheels.sh
# On the GPU machine, from the repo root, with .whl carried (the device call's carry: [".whl"]):
#     bash bench/install_gpu_wheels.sh
# which pip-installs each wheel with --no-deps --no-index, one line per package ("installed: ..." / "FAILED: ...",
# then the "not carried" lines), and always exits 0 so a smoke script goes on when one package fails.
# NOT RUN ON A GPU YET: checked on the CPU machine only (tests/bench/test_pack_gpu_wheels.py: the wheels install with
# pip --target and import there, bitsandbytes on its CPU library; pip --dry-run accepts every wheel for Python 3.12).
#
# What goes in .whl/ (versions: the venv's, so the GPU runs what the tests here run):
#   bitsandbytes  the venv's version, repacked: the full wheel holds a library per CUDA / ROCm / XPU version (~43 MB);
#                 bitsandbytes loads libbitsandbytes_cuda<torch.version.cuda without the dot>.so (cextension.py:
#                 get_cuda_bnb_library_path; torch 2.11's CUDA "13.0" -> cuda130), so only that one and the CPU library
#                 stay; RECORD is rewritten with the kept files' hashes and sizes; same file name.
#   deepspeed     built here from the sdist with DS_BUILD_OPS=0 (pure Python: its ops JIT-compile on the GPU with nvcc),
#                 plus what it imports that the GPU image lacks: hjson, pydantic + pydantic-core (cp312) +
#                 annotated-types + typing-inspection + typing-extensions (pydantic needs a recent one), and ninja
#                 (to JIT-build the ops; small).
#   liger-kernel  pure Python + triton (pinned below: it is not in requirements.txt).
#   gptqmodel     (sft/peft-int4, data_scripts/quantize_gptq.py) built here from its sdist (pure Python, ~1.8 MB),
#                 with its needs the GPU image lacks: defuser, device-smi, logbar, tokenicer (sdists, built here),
#                 pypcre (a C extension linking the system's libpcre2-8: built here by a Python of the GPU machine's
#                 version, found on PATH or under pyenv, or LTR_WHEELS_TARGET_INTERPRETER), optimum, datasets, dill,
#                 multiprocess, torchao (published wheels).
#                 When any of that fails (or LTR_WHEELS_GPTQ=0), none of it is carried: the script prints
#                 "gptqmodel: not carried (<reason>)" and writes that line to .whl/NOT_CARRIED, which
#                 install_gpu_wheels.sh prints on the GPU machine (the peft-int4 rows of the GPU smoke then say so).
#
# Cached and idempotent: downloads and builds go to $LTR_WHEEL_CACHE (default ~/.cache/llama-train-recipes/wheels) and
# are reused; a second run only copies (seconds). .whl/ is emptied of old wheels first, so it holds one version of each.
# At the end it prints each wheel's size and the total, and exits 1 if .whl/ is over the budget.
#
# Environment (defaults in brackets): LTR_WHEELS_DIR [.whl, in the repo root], LTR_WHEEL_CACHE [see above],
#   LTR_WHEELS_BUDGET_MIB [48] (whole MiB), LTR_WHEELS_PYTHON [3.12] (the GPU machine's Python), LTR_BNB_CUDA [130]
#   (the bitsandbytes CUDA library to keep), LTR_WHEELS_GPTQ [1] (0: leave the gptqmodel stack out),
#   LTR_WHEELS_TARGET_INTERPRETER [python3.12 found as above], PYTHON [python] (the venv's, for pip and the versions).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
OUT_DIR=${LTR_WHEELS_DIR:-$REPO/.whl}
CACHE=${LTR_WHEEL_CACHE:-$HOME/.cache/llama-train-recipes/wheels}
BUDGET_MIB=${LTR_WHEELS_BUDGET_MIB:-48}
TARGET_PY=${LTR_WHEELS_PYTHON:-3.12}
BNB_CUDA=${LTR_BNB_CUDA:-130}
LIGER_VERSION=0.8.5
GPTQ=${LTR_WHEELS_GPTQ:-1}
# deepspeed's imports that the GPU image lacks (or has too old for pydantic), at the venv's versions.
DEEPSPEED_NEEDS=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions ninja)
# The gptqmodel stack the GPU image lacks: pure-Python sdists built here; published wheels; a C extension built here
# by a Python of the GPU machine's version.
GPTQ_BUILT=(gptqmodel defuser device-smi logbar tokenicer)
GPTQ_DOWNLOADED=(optimum datasets dill multiprocess torchao)
GPTQ_COMPILED=(pypcre)
# Linux x86_64 platform tags a wheel for the GPU machine may carry (pip matches each exactly).
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

if [[ ! $BUDGET_MIB =~ ^[0-9]+$ ]]; then
    echo "pack_gpu_wheels: LTR_WHEELS_BUDGET_MIB=$BUDGET_MIB: expected a whole number of MiB" >&2
    exit 2
fi
mkdir -p "$CACHE/download" "$CACHE/built" "$CACHE/built-py$TARGET_PY" "$CACHE/repacked" "$OUT_DIR"
LOG="$CACHE/pip.log"

# The venv's version of a distribution; fails with a one-line message when the venv lacks it.
venv_version() {
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || {
        echo "pack_gpu_wheels: $1 is not installed in the active venv ($PY): pip install -r requirements.txt" >&2
        return 1
    }
}

# The cached wheel of NAME VERSION in DIR, or nothing (wheel file names spell '-' and '.' in names as '_').
cached_wheel() {
    local dir=$1 name=${2//[-.]/_} version=$3
    find "$dir" -maxdepth 1 -iname "${name}-${version}-*.whl" | sort | head -n 1
}

# Downloads the wheels NAME==VERSION ... for the GPU machine that the cache lacks, in one pip call.
fetch_wheels() {
    local spec platform missing=() platform_args=()
    for spec in "$@"; do
        if [[ -z $(cached_wheel "$CACHE/download" "${spec%%==*}" "${spec#*==}") ]]; then missing+=("$spec"); fi
    done
    ((${#missing[@]})) || return 0
    for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
        "${platform_args[@]}" -d "$CACHE/download" "${missing[@]}" >>"$LOG" 2>&1 || {
        echo "pack_gpu_wheels: could not download ${missing[*]} for Python $TARGET_PY (see $LOG)" >&2
        return 1
    }
}

# Path of the downloaded wheel NAME==VERSION; fails when fetch_wheels did not bring it.
downloaded_wheel() {
    local found
    found=$(cached_wheel "$CACHE/download" "${1%%==*}" "${1#*==}")
    if [[ -z $found ]]; then
        echo "pack_gpu_wheels: no wheel for $1 in $CACHE/download (see $LOG)" >&2
        return 1
    fi
    echo "$found"
}

# Builds the pure-Python wheels NAME==VERSION ... that $CACHE/built lacks from their sdists, in one pip call with the
# venv's build tools (DS_BUILD_OPS=0: deepspeed's ops are left to JIT-compile on the GPU machine).
build_pure_wheels() {
    local spec missing=()
    for spec in "$@"; do
        if [[ -z $(cached_wheel "$CACHE/built" "${spec%%==*}" "${spec#*==}") ]]; then missing+=("$spec"); fi
    done
    ((${#missing[@]})) || return 0
    DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$CACHE/built" "${missing[@]}" \
        >>"$LOG" 2>&1 || {
        echo "pack_gpu_wheels: building ${missing[*]} failed (see $LOG)" >&2
        return 1
    }
}

# Path of the wheel NAME==VERSION that build_pure_wheels built; fails when it is missing or not pure Python.
built_wheel() {
    local found
    found=$(cached_wheel "$CACHE/built" "${1%%==*}" "${1#*==}")
    if [[ $found != *-py3-none-any.whl ]]; then
        echo "pack_gpu_wheels: no pure-Python wheel for $1 in $CACHE/built (${found:-none}; see $LOG)" >&2
        return 1
    fi
    echo "$found"
}

# A Python of the GPU machine's version ($TARGET_PY) on this machine, to build C extensions for it; or nothing.
target_interpreter() {
    local candidate pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
    for candidate in ${LTR_WHEELS_TARGET_INTERPRETER:-} "python$TARGET_PY" \
        "$pyenv_root"/versions/"$TARGET_PY".*/bin/"python$TARGET_PY" "/usr/bin/python$TARGET_PY"; do
        if "$candidate" -c 'import sys; sys.exit("%d.%d" % sys.version_info[:2] != sys.argv[1])' "$TARGET_PY" \
            2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
}

# Appends the gptqmodel stack's wheels to `wheels`; on failure sets gptq_reason and appends nothing.
carry_gptqmodel() {
    local name version spec interpreter found specs_built=() specs_downloaded=() found_wheels=()
    for name in "${GPTQ_BUILT[@]}" "${GPTQ_DOWNLOADED[@]}" "${GPTQ_COMPILED[@]}"; do
        version=$(venv_version "$name" 2>/dev/null) || { gptq_reason="$name is not in the venv"; return 1; }
        spec="$name==$version"
        if [[ " ${GPTQ_BUILT[*]} " == *" $name "* ]]; then specs_built+=("$spec"); fi
        if [[ " ${GPTQ_DOWNLOADED[*]} " == *" $name "* ]]; then specs_downloaded+=("$spec"); fi
    done
    build_pure_wheels "${specs_built[@]}" || { gptq_reason="building ${specs_built[*]} failed"; return 1; }
    fetch_wheels "${specs_downloaded[@]}" || { gptq_reason="no wheels of ${specs_downloaded[*]}"; return 1; }
    for spec in "${specs_built[@]}"; do
        found=$(built_wheel "$spec") || { gptq_reason="no pure-Python wheel for $spec"; return 1; }
        found_wheels+=("$found")
    done
    for spec in "${specs_downloaded[@]}"; do
        found=$(downloaded_wheel "$spec") || { gptq_reason="no wheel for $spec"; return 1; }
        found_wheels+=("$found")
    done
    for name in "${GPTQ_COMPILED[@]}"; do
        version=$(venv_version "$name")
        found=$(cached_wheel "$CACHE/built-py$TARGET_PY" "$name" "$version")
        if [[ -z $found ]]; then
            interpreter=$(target_interpreter)
            if [[ -z $interpreter ]]; then
                gptq_reason="$name compiles a C extension and no Python $TARGET_PY was found here to build it for the"
                gptq_reason+=" GPU machine (set LTR_WHEELS_TARGET_INTERPRETER)"
                return 1
            fi
            "$interpreter" -m pip wheel --no-deps -w "$CACHE/built-py$TARGET_PY" "$name==$version" >>"$LOG" 2>&1 || {
                gptq_reason="building $name==$version with $interpreter failed (see $LOG)"
                return 1
            }
            found=$(cached_wheel "$CACHE/built-py$TARGET_PY" "$name" "$version")
        fi
        found_wheels+=("$found")
    done
    wheels+=("${found_wheels[@]}")
}

# The bitsandbytes wheel SRC rewritten to DST with only the CPU and the cuda$BNB_CUDA libraries, and its RECORD
# regenerated for what is left.
repack_bitsandbytes() {
    "$PY" - "$1" "$2" "$BNB_CUDA" <<'EOF'
import base64
import hashlib
import re
import sys
import zipfile

src, dst, cuda = sys.argv[1:]
keep_libs = {"libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{cuda}.so"}
native = re.compile(r"^bitsandbytes/(libbitsandbytes_\w+\.so)$")
with zipfile.ZipFile(src) as zin:
    names = zin.namelist()
    record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
    libs = {m[1] for n in names if (m := native.match(n))}
    missing = keep_libs - libs
    if missing:
        sys.exit(f"pack_gpu_wheels: {src} has no {', '.join(sorted(missing))} (it has {', '.join(sorted(libs))})")
    dropped = [n for n in names if (m := native.match(n)) and m[1] not in keep_libs]
    signatures = [n for n in names if n.endswith((".dist-info/RECORD.jws", ".dist-info/RECORD.p7s"))]
    kept = [n for n in names if n not in dropped and n not in signatures and n != record_name]
    record_lines = []
    with zipfile.ZipFile(dst + ".part", "w", zipfile.ZIP_DEFLATED) as zout:
        for name in kept:
            info = zin.getinfo(name)
            data = zin.read(name)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record_lines.append(f"{name},sha256={digest},{len(data)}")
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        record_lines.append(f"{record_name},,")
        zout.writestr(zin.getinfo(record_name), "\n".join(record_lines) + "\n", compress_type=zipfile.ZIP_DEFLATED)
print(f"bitsandbytes: kept {', '.join(sorted(keep_libs))}; dropped {len(dropped)} other native libraries")
EOF
    mv "$2.part" "$2"
}

bnb_version=$(venv_version bitsandbytes)
ds_version=$(venv_version deepspeed)
downloads=("bitsandbytes==$bnb_version" "liger-kernel==$LIGER_VERSION")
for name in "${DEEPSPEED_NEEDS[@]}"; do
    version=$(venv_version "$name")
    downloads+=("$name==$version")
done
fetch_wheels "${downloads[@]}"

wheels=()
bnb_full=$(downloaded_wheel "${downloads[0]}")
bnb_slim="$CACHE/repacked/cuda$BNB_CUDA/$(basename "$bnb_full")"
if [[ ! -f $bnb_slim ]]; then
    mkdir -p "$(dirname "$bnb_slim")"
    repack_bitsandbytes "$bnb_full" "$bnb_slim"
fi
wheels+=("$bnb_slim")
for spec in "${downloads[@]:1}"; do
    wheels+=("$(downloaded_wheel "$spec")")
done
build_pure_wheels "deepspeed==$ds_version"
wheels+=("$(built_wheel "deepspeed==$ds_version")")

gptq_reason="LTR_WHEELS_GPTQ=$GPTQ"
if [[ $GPTQ == 1 ]] && carry_gptqmodel; then
    gptq_reason=""
fi

rm -f "$OUT_DIR"/*.whl "$OUT_DIR/NOT_CARRIED"
cp "${wheels[@]}" "$OUT_DIR/"
if [[ -n $gptq_reason ]]; then
    echo "gptqmodel: not carried ($gptq_reason)" | tee "$OUT_DIR/NOT_CARRIED"
fi

echo "wheels in $OUT_DIR (for the GPU machine: Python $TARGET_PY, CUDA library cuda$BNB_CUDA):"
for whl in "$OUT_DIR"/*.whl; do
    printf '  %6.1f MiB  %s\n' "$(du -b "$whl" | awk '{print $1 / 1048576}')" "$(basename "$whl")"
done
total_bytes=$(du -cb "$OUT_DIR"/* | tail -n 1 | cut -f 1)
tree_bytes=$(cd "$REPO" && git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f 1)
total_mib=$(awk -v b="$total_bytes" 'BEGIN {printf "%.1f", b / 1048576}')
tree_mib=$(awk -v b="$tree_bytes" 'BEGIN {printf "%.1f", b / 1048576}')
both_mib=$(awk -v b="$((tree_bytes + total_bytes))" 'BEGIN {printf "%.1f", b / 1048576}')
echo "$(basename "$OUT_DIR"): $total_mib MiB of a $BUDGET_MIB MiB budget (LTR_WHEELS_BUDGET_MIB);" \
    "tracked files: $tree_mib MiB; together $both_mib of the 64 MiB a device call carries"
if ((total_bytes > BUDGET_MIB * 1048576)); then
    echo "pack_gpu_wheels: $OUT_DIR is $total_mib MiB, over the $BUDGET_MIB MiB budget" >&2
    exit 1
fi
