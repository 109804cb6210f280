"""bench/pack_gpu_wheels.sh builds the wheel folder for the GPU machine under its size budget, every wheel one that
pip accepts for that machine's Python 3.12 on Linux x86_64, with a bitsandbytes slimmed to its CPU and CUDA 13.0
libraries whose RECORD matches; the wheels install with `pip install --no-deps --target` and import from there in a
clean environment. bench/install_gpu_wheels.sh reports one line per wheel and never fails the caller.

The script's download cache (~/.cache/llama-train-recipes/wheels) makes a second run take seconds. Cold, the cheap part
these tests build (LTR_WHEELS_GPTQ=0: a 43 MB bitsandbytes download, deepspeed built from its sdist) takes 20-70 s; the
gptqmodel stack (five sdists and pypcre's C extension built here) adds 30-120 s, so its test is marked slow."""
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

from tests.conftest import REPO

PACK = REPO / "bench" / "pack_gpu_wheels.sh"
INSTALL = REPO / "bench" / "install_gpu_wheels.sh"
SIZE_LINE = re.compile(r"^\S+: ([\d.]+) MiB of a (\d+) MiB budget", re.MULTILINE)
WHEEL_LINE = re.compile(r"^ +([\d.]+) MiB  (\S+\.whl)$", re.MULTILINE)
# The GPU machine: CPython 3.12 on Linux x86_64 with a recent glibc (pip matches each --platform exactly).
GPU_PLATFORMS = ["linux_x86_64", "manylinux2014_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(17, 40))]


def pack(out_dir, **env):
    return subprocess.run(["bash", str(PACK)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "LTR_WHEELS_DIR": str(out_dir), **env})


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("packed") / ".whl"
    proc = pack(out_dir, LTR_WHEELS_GPTQ="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out_dir, proc.stdout


def pip_accepts_for_the_gpu_machine(wheels, tmp_path):
    platform_args = [arg for platform in GPU_PLATFORMS for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *platform_args,
               "--target", str(tmp_path / "dry-run"), *map(str, wheels)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def local_python312():
    """A CPython 3.12 of this machine, found where pack_gpu_wheels.sh looks (PATH, then pyenv's versions)."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which("python3.12"), *sorted(pyenv_root.glob("versions/3.12.*/bin/python3.12"))]
    runnable = [str(c) for c in candidates if c and subprocess.run([str(c), "-V"], capture_output=True).returncode == 0]
    assert runnable, candidates
    return runnable[0]


def wheel_of(out_dir, name):
    matches = [p for p in out_dir.glob("*.whl") if parse_wheel_filename(p.name)[0] == name]
    assert len(matches) == 1, (name, sorted(p.name for p in out_dir.glob("*.whl")))
    return matches[0]


def test_the_folder_is_under_its_budget_and_lists_each_wheel(packed, tmp_path):
    out_dir, stdout = packed
    wheels = sorted(p.name for p in out_dir.glob("*.whl"))
    total_mib, budget_mib = (float(v) for v in SIZE_LINE.search(stdout).groups())
    actual_mib = sum(p.stat().st_size for p in out_dir.iterdir()) / 2**20
    assert budget_mib == 48 and total_mib < budget_mib
    assert abs(total_mib - actual_mib) < 0.06, (total_mib, actual_mib)
    assert sorted(name for _, name in WHEEL_LINE.findall(stdout)) == wheels
    names = [str(parse_wheel_filename(w)[0]) for w in wheels]
    assert len(names) == len(set(names))  # one version of each: two would stop the whole install
    assert {"bitsandbytes", "deepspeed", "liger-kernel", "hjson", "pydantic", "pydantic-core", "ninja"} <= set(names)
    assert (out_dir / "NOT_CARRIED").read_text() == "gptqmodel: not carried (LTR_WHEELS_GPTQ=0)\n"
    accepted = pip_accepts_for_the_gpu_machine(sorted(out_dir.glob("*.whl")), tmp_path)
    assert accepted.returncode == 0 and "Would install" in accepted.stdout, accepted.stdout + accepted.stderr
    # Over a smaller budget it says so and exits 1 (a second run: every wheel comes from the cache).
    small = pack(tmp_path / ".whl", LTR_WHEELS_BUDGET_MIB="1")
    assert small.returncode == 1 and "over the 1 MiB budget" in small.stderr, small.stdout + small.stderr


def test_bitsandbytes_keeps_only_its_cpu_and_cuda13_libraries_and_a_true_record(packed):
    out_dir, _ = packed
    with zipfile.ZipFile(wheel_of(out_dir, "bitsandbytes")) as whl:
        names = whl.namelist()
        libs = sorted(n for n in names if n.startswith("bitsandbytes/libbitsandbytes_"))
        assert libs == ["bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        record = {}
        for line in whl.read(record_name).decode().splitlines():
            path, digest, size = line.rsplit(",", 2)
            record[path] = (digest, size)
        assert sorted(record) == sorted(names)
        assert record.pop(record_name) == ("", "")
        for path, (digest, size) in record.items():
            data = whl.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, size) == (f"sha256={expected}", str(len(data))), path


@pytest.mark.slow  # pip installs and a clean child interpreter
def test_the_wheels_install_with_pip_target_and_import_in_a_clean_environment(packed, tmp_path):
    out_dir, _ = packed
    # The folder is for the GPU machine's Python 3.12: a wheel built for another Python (pydantic-core) is left out
    # here, and the venv's copy (same version) serves.
    supported = set(sys_tags())
    wheels = [p for p in sorted(out_dir.glob("*.whl")) if parse_wheel_filename(p.name)[3] & supported]
    assert {str(parse_wheel_filename(p.name)[0]) for p in wheels} >= {"bitsandbytes", "deepspeed", "liger-kernel"}
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                    "--target", str(site), *map(str, wheels)], check=True, capture_output=True, timeout=300)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import deepspeed, liger_kernel, bitsandbytes\n"
        "from bitsandbytes.cextension import lib\n"
        "for m in (deepspeed, liger_kernel, bitsandbytes): print(m.__name__, m.__file__)\n"
        "print('versions', deepspeed.__version__, bitsandbytes.__version__, lib._lib._name)\n"
    )
    clean_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path))}
    proc = subprocess.run([sys.executable, "-c", script, str(site)], capture_output=True, text=True, timeout=300,
                          env=clean_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for module in ("deepspeed", "liger_kernel", "bitsandbytes"):
        assert f"{module} {site / module / '__init__.py'}\n" in proc.stdout, proc.stdout
    ds_version = parse_wheel_filename(wheel_of(out_dir, "deepspeed").name)[1]
    bnb_version = parse_wheel_filename(wheel_of(out_dir, "bitsandbytes").name)[1]
    cpu_lib = site / "bitsandbytes" / "libbitsandbytes_cpu.so"
    assert f"versions {ds_version} {bnb_version} {cpu_lib}\n" in proc.stdout, proc.stdout
    installed_libs = sorted(p.name for p in (site / "bitsandbytes").glob("libbitsandbytes_*"))
    assert installed_libs == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]


def test_install_script_reports_each_wheel_and_goes_on_past_a_broken_one(packed, tmp_path):
    out_dir, _ = packed
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    good = wheel_of(out_dir, "typing-inspection")
    (wheels / good.name).write_bytes(good.read_bytes())
    (wheels / "broken-1.0-py3-none-any.whl").write_text("not a zip file")
    (wheels / "NOT_CARRIED").write_text("gptqmodel: not carried (a reason)\n")
    site = tmp_path / "site"
    env = {**os.environ, "PYTHON": sys.executable, "LTR_WHEELS_TARGET": str(site)}
    proc = subprocess.run(["bash", str(INSTALL), str(wheels)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    version = parse_wheel_filename(good.name)[1]
    assert lines[0].startswith("FAILED: broken 1.0: ") and lines[1] == f"installed: typing_inspection {version}"
    assert lines[2:] == ["gptqmodel: not carried (a reason)", "install_gpu_wheels: 1 installed, 1 failed"]
    assert (site / "typing_inspection" / "__init__.py").is_file()


@pytest.mark.slow
def test_the_gptqmodel_stack_is_carried_for_the_gpu_machines_python(tmp_path):
    out_dir = tmp_path / ".whl"
    proc = pack(out_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (out_dir / "NOT_CARRIED").exists() and "not carried" not in proc.stdout
    total_mib, budget_mib = (float(v) for v in SIZE_LINE.search(proc.stdout).groups())
    assert total_mib < budget_mib
    wheels = sorted(out_dir.glob("*.whl"))
    tags = {str(parse_wheel_filename(p.name)[0]): parse_wheel_filename(p.name)[3] for p in wheels}
    stack = {"gptqmodel", "defuser", "device-smi", "logbar", "tokenicer", "pypcre", "optimum", "datasets", "dill",
             "multiprocess", "torchao"}
    assert stack <= set(tags) and len(tags) == len(wheels), sorted(tags)
    assert {tag.interpreter for tag in tags["pypcre"]} == {"cp312"}  # its C extension, built for the GPU's Python
    accepted = pip_accepts_for_the_gpu_machine(wheels, tmp_path)
    assert accepted.returncode == 0 and "Would install" in accepted.stdout, accepted.stdout + accepted.stderr
    # The compiled ones (pypcre built here, pydantic-core as published) import under a local CPython 3.12, the one the
    # script built pypcre with (torch is not needed for them).
    python312 = local_python312()
    needed = {"pypcre", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"}
    compiled = [p for p in wheels if str(parse_wheel_filename(p.name)[0]) in needed]
    site = tmp_path / "site312"
    subprocess.run([python312, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    *map(str, compiled)], check=True, capture_output=True, timeout=300)
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import pcre, pydantic\n"
              "class M(pydantic.BaseModel):\n    n: int\n"
              "print(pcre.compile(r'a(\\d+)').match('a12').group(1), M(n='3').n, pcre.__file__)\n")
    proc = subprocess.run([python312, "-c", script, str(site)], capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ["PATH"]})
    assert proc.stdout == f"12 3 {site / 'pcre' / '__init__.py'}\n", proc.stdout + proc.stderr
