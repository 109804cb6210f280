#!/usr/bin/env bash
# Installs the wheels that bench/pack_gpu_wheels.sh packed into .whl/, on the lent GPU machine (no registry there).
# From the repo root, with .whl carried:
#     bash bench/install_gpu_wheels.sh [DIR]        (DIR defaults to .whl in the repo root)
# The wheels are installed with `pip install --no-deps --no-index` (all in one call; one by one if that fails) into
# the Python that holds torch (PYTHON, default python3), or with --target into LTR_WHEELS_TARGET when that is set (then
# put that folder on PYTHONPATH yourself). One line per wheel: "installed: NAME VERSION" or
# "FAILED: NAME VERSION: <pip's last line>", then the packages pack_gpu_wheels.sh did not carry
# ("NAME: not carried (<reason>)"), then a count.
# It always exits 0: a package that fails to install must not stop the smoke run that calls it.
set -u

PY=${PYTHON:-python3}
DIR=${1:-$(dirname "$0")/../.whl}
target_args=()
if [[ -n ${LTR_WHEELS_TARGET:-} ]]; then
    target_args=(--target "$LTR_WHEELS_TARGET" --upgrade)
fi

shopt -s nullglob
wheels=("$DIR"/*.whl)
if ((${#wheels[@]} == 0)); then
    echo "install_gpu_wheels: no wheels in $DIR (run bench/pack_gpu_wheels.sh on the CPU machine and carry .whl)"
    exit 0
fi

pip_install() {
    "$PY" -m pip install --no-deps --no-index --no-compile --disable-pip-version-check -q "${target_args[@]}" "$@" 2>&1
}

# One pip call for all of them (the usual case, quicker); when that fails, one call per wheel to say which failed.
all_at_once=0
if pip_install "${wheels[@]}" >/dev/null; then
    all_at_once=1
fi
installed=0
failed=0
for whl in "${wheels[@]}"; do
    file=$(basename "$whl")
    name=${file%%-*}
    rest=${file#*-}
    version=${rest%%-*}
    if ((all_at_once)) || log=$(pip_install "$whl"); then
        echo "installed: $name $version"
        installed=$((installed + 1))
    else
        echo "FAILED: $name $version: $(printf '%s\n' "$log" | grep -v '^\s*$' | tail -n 1)"
        failed=$((failed + 1))
    fi
done
if [[ -f $DIR/NOT_CARRIED ]]; then
    cat "$DIR/NOT_CARRIED"
fi
echo "install_gpu_wheels: $installed installed, $failed failed"
exit 0
