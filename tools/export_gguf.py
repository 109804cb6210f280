"""Export a trained model to one GGUF file for llama.cpp, Ollama and LM Studio: a full checkpoint, or a base + LoRA
adapter merged on the fly (onto the full-precision base, for adapters trained on a 4-bit one too, as
tools/merge_lora.py does), with the tokenizer and the chat template in the file's metadata, and an Ollama Modelfile
beside it.

    python tools/export_gguf.py --model=/models/llama2-7b-sft --out=llama2-7b-sft.gguf                     # f16
    python tools/export_gguf.py --model=/models/Llama-2-7b-hf --adapter=sft/qlora/out/final --type=q8_0 \\
        --out=sft-q8_0.gguf
    python tools/export_gguf.py --model=tiny --adapter=sft/qlora/out/final --out=/tmp/tiny-sft.gguf  # CPU default run
then  llama-cli -m sft-q8_0.gguf   |   llama-server -m sft-q8_0.gguf   |   ollama create sft -f sft-q8_0.Modelfile

Architectures: Llama 1/2/3 (with Llama 3.1's rope scaling) and Mistral checkpoints, what llama.cpp runs as `llama`.
--type: f16 (default), bf16, f32, or q8_0 (8-bit blocks of 32 weights, about half of f16; llama.cpp's llama-quantize
makes the smaller K-quants from the f16 file). Norms stay f32. Tensors are converted one at a time: memory stays
about one tensor above the merged model's (no merge: one tensor).
Tokenizer: SentencePiece-style vocabularies (Llama 1/2, Mistral) as llama.cpp's `llama` model, each merged token
scored by its merge's rank so llama.cpp merges in the order the tokenizer does; byte-level BPE (Llama 3, Qwen2,
SmolLM) as `gpt2` with its merges and llama.cpp's name for its pre-tokenizer, found from the tokenizer's split
pattern (or --tokenizer_pre). --prompt_template, as in tools/generate.py: alpaca (the sft recipes' default) writes the
Alpaca prompt as the file's chat template; chat keeps the tokenizer's own. The Modelfile carries the same template in
Ollama's syntax when it can be derived exactly (checked by rendering), and the stop tokens.
"""
import argparse
import json
import re
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.checkpoint import atomic_write_text  # noqa: E402
from common.config import UserError, exit_on_user_error  # noqa: E402
from common.data import ALPACA_PROMPT_NO_INPUT, end_of_turn_ids  # noqa: E402
from common.inference import load_inference_tokenizer, quantization_method  # noqa: E402
from common.logs import quiet_third_party_logs  # noqa: E402
from common.model import resolve_model_path  # noqa: E402

TYPES = ("f16", "bf16", "f32", "q8_0")
ARCHITECTURES = ("llama", "mistral")
LAYER_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
OTHER_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) by the byte-level BPE tokenizer's split pattern
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", "ByteLevel": "gpt-2"}
MARK = "\x01{}\x01"  # stand-in message contents when a chat template is taken apart


# ---------------------------------------------------------------------------------------------------------------
# The model: which checkpoint, its hyper-parameters, its tensors under llama.cpp's names


def source_folder(model: str, adapter: str | None, scratch: Path) -> Path:
    """The full checkpoint to export: --model itself, or --model with --adapter merged into it (in scratch)."""
    if adapter:
        from tools.merge_lora import merge_lora

        return merge_lora(model, adapter, str(scratch / "merged"))["out"]
    folder = resolve_model_path(model, option="model")
    method = quantization_method(folder)
    if method:
        raise UserError(f"--model={model}: a {method}-quantized checkpoint; export the full-precision model it was "
                        "made from (GGUF quantizes on its own: --type=q8_0)")
    return folder


def read_config(folder: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in ARCHITECTURES:
        raise UserError(f"{folder}/config.json: model_type '{config.model_type}'; this exporter writes the Llama "
                        f"architecture ({', '.join(ARCHITECTURES)})")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise UserError(f"{folder}/config.json: rope_type '{rope['rope_type']}' is not exported (default, linear "
                        "and llama3 are)")
    return config


def checkpoint_tensors(folder: Path) -> dict:
    """{name: (shape, a function returning the tensor)} from the safetensors files (sharded or not) or
    pytorch_model*.bin: shapes from the headers, each tensor read only when asked for."""
    import torch
    from safetensors import safe_open

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        handle = safe_open(path, framework="pt")
        names = handle.keys()  # a safetensors handle is not a dict
        tensors.update({name: (tuple(handle.get_slice(name).get_shape()), partial(handle.get_tensor, name))
                        for name in names})
    for path in sorted(folder.glob("pytorch_model*.bin")) if not tensors else []:
        mapped = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # read when touched
        tensors.update({name: (tuple(t.shape), partial(mapped.__getitem__, name)) for name, t in mapped.items()})
    if not tensors:
        raise UserError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    return tensors


def gguf_name(name: str, config) -> str | None:
    """llama.cpp's name for a Hugging Face Llama tensor; None for what GGUF does not store (rotary buffers, the tied
    LM head)."""
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings):
        return None
    if name in OTHER_TENSORS:
        return OTHER_TENSORS[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"blk.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.weight"
    raise UserError(f"tensor '{name}' has no place in a llama GGUF (biases or another architecture?)")


def interleave_rotary_halves(weight, heads: int):
    """Q or K projection rows from Hugging Face's rotary layout (each head: the first halves of its dimension pairs,
    then the second halves) to llama.cpp's (the two members of each pair next to each other)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def llama3_rope_factors(config):
    """Llama 3.1 rope scaling as llama.cpp reads it: the factor dividing each rotary frequency (rope_freqs.weight)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return (plain / scaled).float()


def ggml_type(shape: tuple, qtype):
    """The GGML type a tensor is written in: qtype for matrices (q8_0 needs rows of a multiple of 32 values, else
    f16), f32 for norms and rope factors."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) != 2:
        return Q.F32
    return Q.F16 if qtype == Q.Q8_0 and shape[-1] % 32 else qtype


def write_tensors(writer, folder: Path, config, qtype) -> int:
    """Every tensor converted and written, one at a time (the header first needs every name, shape and size).
    Returns the number of parameters."""
    import gguf
    import numpy as np
    import torch

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    plan = [(gguf_name(name, config), shape, read) for name, (shape, read) in checkpoint_tensors(folder).items()]
    plan = [entry for entry in plan if entry[0] is not None]
    if config.rope_parameters.get("rope_type") == "llama3":
        factors = llama3_rope_factors(config)
        plan.append(("rope_freqs.weight", tuple(factors.shape), partial(factors.clone)))
    for name, shape, _ in plan:
        target = ggml_type(shape, qtype)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, target)))
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with torch.no_grad():
        for name, shape, read in plan:  # in the header's order
            tensor = read().float()
            if name.endswith("attn_q.weight"):
                tensor = interleave_rotary_halves(tensor, heads)
            elif name.endswith("attn_k.weight"):
                tensor = interleave_rotary_halves(tensor, kv_heads)
            writer.write_tensor_data(gguf.quants.quantize(tensor.numpy(), ggml_type(shape, qtype)))
    return sum(int(np.prod(shape)) for name, shape, _ in plan if name != "rope_freqs.weight")


def add_model_metadata(writer, config, qtype, name: str):
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    file_type = {Q.F32: F.ALL_F32, Q.F16: F.MOSTLY_F16, Q.BF16: F.MOSTLY_BF16, Q.Q8_0: F.MOSTLY_Q8_0}[qtype]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_file_type(file_type)
    if qtype == Q.Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_vocab_size(config.vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer: vocabulary, merges or scores, special tokens, chat template


def pre_tokenizer_name(tokenizer_json: dict, override: str) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (how text is split before merging)."""
    if override:
        return override
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    key = splits[0] if len(splits) == 1 else None
    if not splits and len(byte_level) == 1 and len(parts) == 1 and byte_level[0].get("use_regex", True):
        key = "ByteLevel"  # GPT-2's own split
    if key not in PRE_TOKENIZERS:
        known = ", ".join(PRE_TOKENIZERS.values())
        raise UserError(f"the tokenizer's pre-tokenizer is not one this exporter knows ({json.dumps(pre)[:200]}); "
                        f"pass llama.cpp's name for it with --tokenizer_pre (e.g. {known})")
    return PRE_TOKENIZERS[key]


def merge_list(model: dict) -> list[str]:
    return [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]


def vocabulary(tokenizer, vocab_size: int, tokenizer_pre: str) -> dict:
    """The GGUF tokenizer fields: model, pre, tokens, token types, scores or merges, in id order, padded with unused
    tokens to the embedding's rows."""
    import gguf

    T = gguf.TokenType
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise UserError(f"the tokenizer is a {model.get('type')} model; this exporter writes BPE tokenizers "
                        "(SentencePiece-style or byte-level)")
    n = min(len(tokenizer), vocab_size)  # tokens past the embedding's rows have no weights: the model never saw them
    used = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, *end_of_turn_ids(tokenizer)]
    beyond = [i for i in used if i is not None and i >= vocab_size]
    if beyond:
        raise UserError(f"the tokenizer's special token ids {beyond} are past the model's {vocab_size} embedding rows")
    sentencepiece = bool(model.get("byte_fallback"))
    if not sentencepiece and (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError("the tokenizer is neither SentencePiece-style (byte fallback) nor byte-level BPE")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    types = []
    for i, token in enumerate(tokens):
        if i == tokenizer.unk_token_id:
            types.append(T.UNKNOWN)
        elif i in special:
            types.append(T.CONTROL)
        elif i in added:
            types.append(T.USER_DEFINED)
        elif sentencepiece and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [T.UNUSED] * (vocab_size - n)
    fields = {"model": "llama" if sentencepiece else "gpt2", "tokens": tokens, "types": types, "pre": "default"}
    if sentencepiece:  # llama.cpp merges the pair whose token scores highest: score = -(the merge's rank + 1)
        rank = {}
        for r, merge in enumerate(merge_list(model)):
            rank.setdefault(merge.replace(" ", ""), r + 1)
        fields["scores"] = [-float(rank[t]) if t in rank and types[i] == T.NORMAL else 0.0
                            for i, t in enumerate(tokens)]
        metaspace = json.dumps(tokenizer_json.get("pre_tokenizer")) + json.dumps(tokenizer_json.get("normalizer"))
        fields["add_space_prefix"] = '"prepend_scheme": "never"' not in metaspace
    else:
        fields["merges"] = merge_list(model)
        fields["pre"] = pre_tokenizer_name(tokenizer_json, tokenizer_pre)
    return fields


def alpaca_chat_template() -> str:
    """The Alpaca prompt the sft recipes train with (--prompt_template=alpaca) as a Jinja chat template: each user
    message an instruction, each reply after '### Response:' and ended by EOS."""
    before, after = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    return ("{% for message in messages %}{% if message['role'] == 'user' %}"
            f"{{{{ {json.dumps(before)} + message['content'] + {json.dumps(after)} }}}}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def add_tokenizer_metadata(writer, tokenizer, fields: dict, chat_template: str):
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types([int(t) for t in fields["types"]])
    if "scores" in fields:
        writer.add_token_scores(fields["scores"])
        writer.add_add_space_prefix(fields["add_space_prefix"])
    if "merges" in fields:
        writer.add_token_merges(fields["merges"])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None and token_id < len(fields["tokens"]):
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1)
    end_of_turn = end_of_turn_ids(tokenizer)
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])
    writer.add_chat_template(chat_template)


# ---------------------------------------------------------------------------------------------------------------
# The Ollama Modelfile: the chat template in Ollama's (Go template) syntax, derived by rendering the Jinja one


def render(tokenizer, template: str, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation)


def split_at(text: str, mark: str) -> tuple[str, str] | None:
    """text before and after the one occurrence of mark; None when it is not there exactly once."""
    parts = text.split(mark)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def template_pieces(tokenizer, template: str) -> dict | None:
    """What the chat template puts around each role's message ({role: (before, after)}; system None when the
    template leaves system messages out), before the first message when there is no system one ("default"), and after
    the last user message ("generation"). None when the template is not that simple (a system prompt folded into the
    first user turn, say): checked by rendering conversations from the pieces and from the template."""
    s, u1, a1, u2 = (MARK.format(x) for x in ("system", "user1", "assistant1", "user2"))
    first = [{"role": "user", "content": u1}]
    answered = first + [{"role": "assistant", "content": a1}]
    try:
        one = render(tokenizer, template, first, False)
        with_generation = render(tokenizer, template, first, True)
        two = render(tokenizer, template, answered, False)
        three = render(tokenizer, template, answered + [{"role": "user", "content": u2}], False)
        with_system = render(tokenizer, template, [{"role": "system", "content": s}] + first, False)
    except Exception:  # a template that refuses these conversations: no Ollama template
        return None
    if not (with_generation.startswith(one) and two.startswith(one) and three.startswith(two)):
        return None
    user, first_user, assistant = split_at(three[len(two):], u2), split_at(one, u1), split_at(two[len(one):], a1)
    if user is None or first_user is None or assistant is None or not first_user[0].endswith(user[0]):
        return None
    pieces = {"default": first_user[0][: len(first_user[0]) - len(user[0])], "user": user, "assistant": assistant,
              "generation": with_generation[len(one):], "system": None}
    if s in with_system:
        system_before, rest = split_at(with_system, s) or ("", "")
        pieces["system"] = (system_before, rest.split(user[0] + u1)[0])
    check = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    for messages in (check, check[1:]):
        if render_from_pieces(pieces, messages) != render(tokenizer, template, messages, True):
            return None
    return pieces


def render_from_pieces(pieces: dict, messages: list[dict]) -> str:
    """What the Ollama template made from the pieces renders for a conversation ending with a user message."""
    has_system = pieces["system"] is not None and messages and messages[0]["role"] == "system"
    text = "" if has_system else pieces["default"]
    for message in messages:
        if message["role"] == "system" and pieces["system"] is None:
            continue
        before, after = pieces[message["role"]]
        text += before + message["content"] + after
    return text + pieces["generation"]


def ollama_template(pieces: dict, bos: str | None) -> str:
    """The Go template Ollama renders a chat with, from template_pieces; no whitespace trimming, so every piece is
    kept as it is. A BOS the Jinja template writes at the start is left out: llama.cpp adds it when it tokenizes."""
    default = pieces["default"].removeprefix(bos) if bos else pieces["default"]
    roles = {"user": pieces["user"], "assistant": pieces["assistant"]}
    if pieces["system"] is not None:
        system_before, system_after = pieces["system"]
        roles = {"system": (system_before.removeprefix(bos) if bos else system_before, system_after), **roles}
        default = "{{ if not .System }}" + default + "{{ end }}"
    branches = []
    for role, (before, after) in roles.items():
        keyword = "if" if not branches else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}')
    return default + "{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + pieces["generation"]


def modelfile_text(gguf_file: str, tokenizer, chat_template: str) -> tuple[str, bool]:
    """An Ollama Modelfile for the GGUF file beside it: FROM, the template in Ollama's syntax when it derives
    exactly (else Ollama reads the GGUF's own chat template), and the stop tokens. Returns it and whether the
    template is in it."""
    pieces = template_pieces(tokenizer, chat_template)
    lines = [f"FROM ./{gguf_file}"]
    if pieces is not None:
        lines.append(f'TEMPLATE """{ollama_template(pieces, tokenizer.bos_token)}"""')
    stops = [tokenizer.eos_token] + tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in dict.fromkeys(stops) if stop]
    return "\n".join(lines) + "\n", pieces is not None


# ---------------------------------------------------------------------------------------------------------------


def export_gguf(model: str, out: str, adapter: str | None = None, type_name: str = "f16",
                prompt_template: str = "alpaca", tokenizer_pre: str = "", name: str = "") -> dict:
    """Write --out (and the Modelfile beside it), each atomically: a temporary file, then one rename."""
    import gguf

    if type_name not in TYPES:
        raise UserError(f"--type={type_name}: expected one of {', '.join(TYPES)}")
    out_path = Path(out)
    if out_path.suffix != ".gguf":
        raise UserError(f"--out={out}: expected a file name ending in .gguf")
    if not out_path.parent.is_dir():
        raise UserError(f"--out={out}: no folder {out_path.parent}")
    qtype = getattr(gguf.GGMLQuantizationType, type_name.upper())
    with tempfile.TemporaryDirectory(prefix="export-gguf-", dir=out_path.parent) as scratch:
        folder = source_folder(model, adapter, Path(scratch))
        config = read_config(folder)
        tokenizer = load_inference_tokenizer(folder)
        if prompt_template == "chat":
            chat_template = tokenizer.chat_template
            if not chat_template:
                raise UserError(f"--prompt_template=chat: the tokenizer in {folder} has no chat template")
        else:
            chat_template = alpaca_chat_template()
        fields = vocabulary(tokenizer, config.vocab_size, tokenizer_pre)
        partial_file = out_path.with_name(out_path.name + ".partial")
        writer = gguf.GGUFWriter(partial_file, "llama")
        add_model_metadata(writer, config, qtype, name or out_path.stem)
        add_tokenizer_metadata(writer, tokenizer, fields, chat_template)
        try:
            n_params = write_tensors(writer, folder, config, qtype)
        finally:
            writer.close()
        partial_file.replace(out_path)
        text, has_template = modelfile_text(out_path.name, tokenizer, chat_template)
        modelfile = atomic_write_text(out_path.with_suffix(".Modelfile"), text)
    return {"out": out_path, "modelfile": modelfile, "ollama_template": has_template, "parameters": n_params,
            "type": type_name, "tokenizer": fields["model"], "pre": fields.get("pre"), "source": folder,
            "bytes": out_path.stat().st_size}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a full checkpoint folder, or the base of --adapter; 'tiny' too")
    p.add_argument("--adapter", help="a LoRA output folder (out/final), merged into --model first")
    p.add_argument("--out", required=True, help="the .gguf file to write (a .Modelfile goes beside it)")
    p.add_argument("--type", default="f16", choices=TYPES, help="weight type of the file (default %(default)s)")
    p.add_argument("--prompt_template", default="alpaca", choices=("alpaca", "chat"),
                   help="the template the model was trained with (the sft recipes' --prompt_template)")
    p.add_argument("--tokenizer_pre", default="", help="llama.cpp's pre-tokenizer name, when it is not detected")
    p.add_argument("--name", default="", help="general.name in the file (default: the file name)")
    args = p.parse_args(argv)
    quiet_third_party_logs()
    with exit_on_user_error():
        r = export_gguf(args.model, args.out, args.adapter, args.type, args.prompt_template, args.tokenizer_pre,
                        args.name)
    pre = f", pre-tokenizer {r['pre']}" if r["pre"] else ""
    template = "with" if r["ollama_template"] else "without (Ollama reads the GGUF's chat template)"
    print(f"wrote {r['out']}: {r['parameters']:,} parameters, {r['type']}, {r['bytes'] / 2**20:,.1f} MiB, "
          f"{r['tokenizer']} tokenizer{pre}")
    print(f"wrote {r['modelfile']} {template} a template: ollama create NAME -f {r['modelfile']}")


if __name__ == "__main__":
    main()
