"""tools/export_gguf.py: the tiny model (and sft/qlora's adapter on it, merged on the fly) written to GGUF and read
back by transformers (gguf_file=) with the source's logits (f32 to 1e-5, f16 and q8_0 to stated tolerances) and its
tokenizer's ids; the tokenizer fields of the Llama 2, Llama 3 and Qwen2 vocabularies read back to the same
tokenization; the Ollama template derived from a chat template renders what the template does; one-line errors."""
import json

import pytest
import torch

from common.data import collate_left_padded
from common.model import load_tokenizer, resolve_model_path
from tests.conftest import REPO, run_script
from tests.tools.conftest import load_tool

export = load_tool("export_gguf")
TEXTS = ["Reverse the letters: a b c", "The capital of France is", "数字 1234 and émigré"]
# largest |logit difference| to the source, tiny model (logits up to 1.6): the rounding of the weights (measured:
# f32 0, f16 1.2e-3, bf16 6.5e-3, q8_0's 8-bit blocks 2.5e-2)
TOLERANCE = {"f32": 1e-6, "f16": 5e-3, "bf16": 2e-2, "q8_0": 6e-2}


def logits(model, tokenizer):
    batch = collate_left_padded([{"input_ids": tokenizer(t).input_ids} for t in TEXTS], tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]


def read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def tiny_source():
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path("tiny")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), load_tokenizer(folder)


@pytest.mark.parametrize("type_name", ["f32", "f16", "bf16", "q8_0"])
def test_tiny_model_reads_back_with_its_logits_and_token_ids(type_name, tiny_source, tmp_path):
    model, tokenizer = tiny_source
    out = tmp_path / f"tiny-{type_name}.gguf"
    result = export.export_gguf("tiny", str(out), type_name=type_name)
    assert result["tokenizer"] == "llama" and result["parameters"] == sum(p.numel() for p in model.parameters())
    back, back_tokenizer = read_back(out)
    for text in TEXTS:
        assert back_tokenizer(text).input_ids == tokenizer(text).input_ids
    difference = (logits(back, tokenizer) - logits(model, tokenizer)).abs().max().item()
    assert difference < TOLERANCE[type_name], difference
    bytes_per_weight = {"f32": 4.04, "f16": 2.04, "bf16": 2.04, "q8_0": 1.12}[type_name]  # q8_0: 34 bytes per 32
    assert out.stat().st_size < bytes_per_weight * result["parameters"]


def test_adapter_is_merged_on_the_fly_and_its_logits_survive(sft_adapter, merged_sft, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft.gguf"
    export.main(["--model=tiny", f"--adapter={sft_adapter}", f"--out={out}", "--type=f32"])
    merged = AutoModelForCausalLM.from_pretrained(merged_sft, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(merged_sft)
    back, _ = read_back(out)
    torch.testing.assert_close(logits(back, tokenizer), logits(merged, tokenizer), atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"), dtype=torch.float32).eval()
    assert (logits(merged, tokenizer) - logits(base, tokenizer)).abs().max() > 1e-2  # the adapter is in there
    assert not list(tmp_path.glob("export-gguf-*"))  # the merged scratch copy is gone
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert modelfile.startswith("FROM ./sft.gguf\n") and 'PARAMETER stop "</s>"' in modelfile
    assert "### Instruction:\n{{ .Content }}\n\n### Response:\n" in modelfile  # alpaca, as sft/qlora trained


def test_alpaca_template_renders_the_training_prompt(tiny_source):
    from common.data import ALPACA_PROMPT_NO_INPUT

    _, tokenizer = tiny_source
    template = export.alpaca_chat_template()
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert rendered == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.") + "hi</s>"
    pieces = export.template_pieces(tokenizer, template)
    assert pieces["user"] == tuple(ALPACA_PROMPT_NO_INPUT.split("{instruction}")) and pieces["generation"] == ""


def test_ollama_template_of_the_tiny_chat_template_renders_as_the_jinja(tiny_source):
    _, tokenizer = tiny_source
    pieces = export.template_pieces(tokenizer, tokenizer.chat_template)
    assert pieces is not None
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert export.render_from_pieces(pieces, messages) == expected
    go = export.ollama_template(pieces, tokenizer.bos_token)
    user_before, user_after = pieces["user"]
    assert f'{{{{ else if eq .Role "user" }}}}{user_before}{{{{ .Content }}}}{user_after}' in go
    assert go.endswith("{{ end }}{{ end }}" + pieces["generation"])


def test_a_system_prompt_inside_the_first_user_turn_gives_no_ollama_template():
    from tests.common.test_data_tokenizer_families import LLAMA2_CHAT_TEMPLATE

    tokenizer = load_tokenizer(resolve_model_path("tiny"))
    assert export.template_pieces(tokenizer, LLAMA2_CHAT_TEMPLATE) is None  # [INST] <<SYS>> ... folds the system in


def test_rotary_halves_interleave_as_llama_cpp_pairs_them():
    heads, head_dim = 2, 4
    rows = torch.arange(heads * head_dim, dtype=torch.float32)[:, None]  # row r holds r
    out = export.interleave_rotary_halves(rows, heads)[:, 0].tolist()
    # head 0: dims (0, 2) and (1, 3) are the rotary pairs in HF's layout; llama.cpp wants them adjacent
    assert out == [0, 2, 1, 3, 4, 6, 5, 7]


def test_llama3_rope_factors_divide_the_frequencies_as_transformers_scales_them():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    factors = export.llama3_rope_factors(config)
    plain, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert factors.shape == (16,) and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
    torch.testing.assert_close(plain / factors, scaled.float())


def test_bad_input_is_one_line(tmp_path):
    proc = run_script(REPO / "tools" / "export_gguf.py", "--model=tiny", f"--out={tmp_path / 'model.bin'}")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "expected a file name ending in .gguf" in proc.stderr
    bad = tmp_path / "qwen2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    proc = run_script(REPO / "tools" / "export_gguf.py", f"--model={bad}", f"--out={tmp_path / 'x.gguf'}")
    assert proc.returncode == 2 and "model_type 'qwen2'" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.gguf*"))
