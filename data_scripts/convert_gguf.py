"""Convert a GGUF file (what llama.cpp and Ollama users have) of a Llama-architecture model to a Hugging Face folder.

    python data_scripts/convert_gguf.py --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out=/models/smollm2-135m-instruct
    python data_scripts/convert_gguf.py --gguf=model.Q8_0.gguf --out=/models/llama-bf16 --dtype=bf16
    bash sft/qlora/run.sh --model_path=/models/smollm2-135m-instruct --prompt_template=chat

transformers reads the GGUF through the `gguf` package (Q4_0/Q4_1/Q8_0 and K-quants are dequantized; the quantization
error stays in the weights), but a model loaded that way refuses save_pretrained, so its weights are copied into a
fresh LlamaForCausalLM (every tensor must match) and saved from there. out gets model.safetensors (fp32, or
--dtype=bf16/fp16), config.json, the tokenizer files with the GGUF's chat template, and generation_config.json whose
eos lists the end-of-turn token of the chat template too (e.g. <|im_end|>, <|eot_id|>), so generation stops at the
end of an answer. Written atomically (built beside out, then renamed). Only general.architecture 'llama' is handled
(Llama 1/2/3, SmolLM, TinyLlama...); other architectures are refused. SmolLM2-135M-Instruct Q4_1 (98 MB) takes
about 60 s on 2 CPU cores.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.checkpoint import atomic_write_dir  # noqa: E402
from common.config import UserError, exit_on_user_error  # noqa: E402
from common.data import end_of_turn_ids  # noqa: E402
from common.inference import save_generation_config  # noqa: E402
from common.logs import quiet_third_party_logs  # noqa: E402

GGUF_MAGIC = b"GGUF"
DTYPES = ("fp32", "bf16", "fp16")


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file; a missing file or one that is not GGUF is a UserError."""
    if not path.is_file():
        raise UserError(f"--gguf={path}: no such file; expected a .gguf model file (llama.cpp / Ollama)")
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except (ValueError, IndexError, OSError) as e:  # a truncated or corrupt file: the reader's own message
        raise UserError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from None
    if field is None:
        raise UserError(f"{path}: the GGUF file has no general.architecture field")
    return str(field.contents())


def load_gguf(path: Path):
    """(model, tokenizer) from a GGUF file, the weights dequantized to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def plain_llama(gguf_model, dtype):
    """A fresh LlamaForCausalLM with the GGUF model's weights: serializable, unlike the GGUF-loaded one."""
    from transformers import LlamaForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"the GGUF tensors do not match LlamaForCausalLM: missing {result.missing_keys[:5]}, "
                        f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    return model.to(dtype).eval()


def convert_gguf(gguf_path: str, out: str, dtype_name: str = "fp32") -> dict:
    import torch

    path = Path(gguf_path)
    architecture = gguf_architecture(path)
    if architecture != "llama":
        raise UserError(f"{path}: the GGUF architecture is '{architecture}'; this converter handles Llama-architecture "
                        "models (general.architecture 'llama', LlamaForCausalLM) only")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    start = time.perf_counter()
    gguf_model, tokenizer = load_gguf(path)
    model = plain_llama(gguf_model, dtype)
    del gguf_model
    if not tokenizer.chat_template:
        print("note: the GGUF file has no chat template; --prompt_template=chat will not work with this model")
    eot_ids = end_of_turn_ids(tokenizer)
    eot = tokenizer.convert_ids_to_tokens(eot_ids[0]) if eot_ids else None

    def write(folder: Path):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        save_generation_config(folder, model, tokenizer)  # eos: EOS and the chat template's end-of-turn token

    atomic_write_dir(Path(out), write)
    config = model.config
    return {"out": out, "seconds": time.perf_counter() - start, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "vocab": config.vocab_size, "parameters": model.num_parameters(),
            "dtype": dtype_name, "tied": config.tie_word_embeddings, "eos": tokenizer.eos_token, "eot": eot,
            "pad": tokenizer.pad_token, "bos": tokenizer.bos_token}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, help="a .gguf file of a Llama-architecture model")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write (replaced if there)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights' dtype in model.safetensors")
    args = p.parse_args(argv)
    quiet_third_party_logs()
    with exit_on_user_error():
        r = convert_gguf(args.gguf, args.out, args.dtype)
    print(f"converted {args.gguf} in {r['seconds']:.0f}s: LlamaForCausalLM, {r['layers']} layers, hidden "
          f"{r['hidden']}, vocab {r['vocab']:,}, {r['parameters'] / 1e6:.1f}M parameters ({r['dtype']}, tied "
          f"embeddings {r['tied']}); bos {r['bos']}, eos {r['eos']}, pad {r['pad']}, end of turn {r['eot']} "
          f"-> {r['out']}")
    print(f"train on it: bash sft/qlora/run.sh --model_path={Path(r['out']).resolve()} --prompt_template=chat")


if __name__ == "__main__":
    main()
