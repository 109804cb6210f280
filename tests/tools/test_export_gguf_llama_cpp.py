"""tools/export_gguf.py's files in llama.cpp itself (llama-cpp-python, built from its source distribution in about 11
minutes: not installed in CI, where these tests are skipped; bench/gguf_llama_cpp.py prints the same comparison):
the tiny model and sft/qlora's adapter on it, exported in f32, tokenize the Alpaca prompts to transformers' ids,
give its next-token logits and its greedy continuations token for token."""
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see bench/gguf_llama_cpp.py)")
from bench.gguf_llama_cpp import compare  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("with_adapter", [False, True])
def test_llama_cpp_runs_the_export_as_transformers_runs_the_source(with_adapter, sft_adapter):
    (row,) = compare("tiny", str(sft_adapter) if with_adapter else None, ["f32"], "alpaca", new_tokens=16,
                     threads=1)
    assert row["same_ids"] == row["prompts"] == 4
    assert row["logit_gap"] < 1e-3 * row["logit_scale"], row
    assert row["same_greedy"] == row["prompts"], (row["llama_cpp"], row["transformers"])
