"""GGUF files written by tools/export_gguf.py, run by llama.cpp itself (llama-cpp-python) against transformers on the
source checkpoint: for each weight type, whether llama.cpp tokenizes the prompts (chat-rendered, special tokens
parsed) to transformers' ids, how far its next-token logits after each prompt are from transformers', and whether
its greedy continuation is transformers' token for token. Prints a table.

llama-cpp-python is not a project dependency: it builds from its source distribution, about 11 minutes on 2 cores:
    CMAKE_ARGS="-DGGML_NATIVE=off -DLLAMA_BUILD_TESTS=off -DLLAMA_BUILD_EXAMPLES=off" \\
        pip install llama-cpp-python==0.3.36
    python bench/gguf_llama_cpp.py                                                   # the tiny model
    python bench/gguf_llama_cpp.py --model=~/.cache/llama-train-recipes/smollm2-135m-instruct --prompt_template=chat
    python bench/gguf_llama_cpp.py --model=<base> --adapter=sft/qlora/out/final --prompt_template=chat
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.config import exit_on_user_error  # noqa: E402
from common.data import Record  # noqa: E402
from common.inference import encode_prompt, generation_prompt, load_inference_tokenizer, stop_token_ids  # noqa: E402
from common.logs import quiet_third_party_logs  # noqa: E402
from tools.export_gguf import export_gguf  # noqa: E402

PROMPTS = ["Name the capital of France.", "Reverse the letters: a b c d", "Write one sentence about the sea.",
           "What is 12 plus 30?"]


def rendered_prompts(tokenizer, prompt_template: str) -> list[tuple[str, bool, list[int]]]:
    """(text, whether the tokenizer adds its BOS, token ids) of each prompt, rendered and encoded as
    tools/generate.py does (the template the model trained with)."""
    prompts = []
    for i, instruction in enumerate(PROMPTS):
        text, add_special = generation_prompt(Record({"instruction": instruction}, f"prompt {i}"), tokenizer,
                                              prompt_template)
        prompts.append((text, add_special, encode_prompt(tokenizer, text, add_special)))
    return prompts


def transformers_side(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> tuple[list, list]:
    """Last-position logits of each prompt and its greedy continuation (up to a stop token), one prompt at a time."""
    logits, continuations = [], []
    stops = stop_token_ids(tokenizer)
    with torch.no_grad():
        for ids in prompts:
            batch = torch.tensor([ids])
            logits.append(model(batch).logits[0, -1].float())
            out = model.generate(batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
            continuations.append(out)
    return logits, continuations


def llama_cpp_side(path: Path, prompts: list[list[int]], new_tokens: int, stops: list[int], threads: int):
    """The same through llama.cpp on the GGUF file, fed the same token ids."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, logits_all=True, verbose=False)
    logits, continuations = [], []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits.append(torch.from_numpy(llm.scores[len(ids) - 1].copy()).float())
        out = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            out.append(token)
            if token in stops or len(out) == new_tokens:  # as transformers: the stop token kept, then no more
                break
        continuations.append(out)
    return llm, logits, continuations


def compare(model_path: str, adapter: str | None, types: list[str], prompt_template: str, new_tokens: int,
            threads: int) -> list[dict]:
    """Export once per type into a scratch folder, then compare llama.cpp with transformers; rows for the table."""
    from transformers import AutoModelForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        reference = None
        for type_name in types:
            result = export_gguf(model_path, str(Path(scratch) / f"model-{type_name}.gguf"), adapter, type_name,
                                 prompt_template)
            if reference is None:  # the source as the exporter saw it (merged when --adapter), in transformers
                from tools.merge_lora import merge_lora

                source = Path(scratch) / "source"
                if adapter:
                    merge_lora(model_path, adapter, str(source))
                else:
                    source = result["source"]
                tokenizer = load_inference_tokenizer(source)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
                rendered = rendered_prompts(tokenizer, prompt_template)
                prompts = [ids for _, _, ids in rendered]
                reference = transformers_side(model, tokenizer, prompts, new_tokens)
            llm, logits, continuations = llama_cpp_side(result["out"], prompts, new_tokens,
                                                        stop_token_ids(tokenizer), threads)
            # llama.cpp's own tokenizer on the same text: BOS as the file says, special tokens parsed
            tokenized = [llm.tokenize(text.encode(), add_bos=add_special, special=True)
                         for text, add_special, _ in rendered]
            same_ids = sum(a == b for a, b in zip(tokenized, prompts))
            gap = max((a - b).abs().max().item() for a, b in zip(logits, reference[0]))
            same_greedy = sum(a == b for a, b in zip(continuations, reference[1]))
            rows.append({"type": type_name, "mib": result["bytes"] / 2**20, "tokenizer": result["tokenizer"],
                         "prompts": len(prompts), "same_ids": same_ids, "logit_gap": gap,
                         "logit_scale": max(x.abs().max().item() for x in reference[0]), "same_greedy": same_greedy,
                         "llama_cpp": continuations, "transformers": reference[1]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a full checkpoint, or the base of --adapter (default: tiny)")
    p.add_argument("--adapter", default=None, help="a LoRA output folder merged on the fly")
    p.add_argument("--types", default="f32,f16,q8_0", help="comma list of --type values to export and run")
    p.add_argument("--prompt_template", default="alpaca", choices=("alpaca", "chat"))
    p.add_argument("--new_tokens", type=int, default=24, help="greedy tokens per prompt (default %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    quiet_third_party_logs()
    torch.set_num_threads(args.threads)
    with exit_on_user_error():
        rows = compare(str(Path(args.model).expanduser()), args.adapter, args.types.split(","), args.prompt_template,
                       args.new_tokens, args.threads)
    print(f"\nllama.cpp on the exported GGUF vs transformers on the source | model={args.model} adapter={args.adapter} "
          f"template={args.prompt_template} greedy tokens={args.new_tokens}")
    print("| type | MiB | tokenizer | prompts tokenized alike | max logit gap (scale) | greedy continuations alike |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['type']} | {r['mib']:.1f} | {r['tokenizer']} | {r['same_ids']}/{r['prompts']} | "
              f"{r['logit_gap']:.2e} ({r['logit_scale']:.1f}) | {r['same_greedy']}/{r['prompts']} |")
    return rows


if __name__ == "__main__":
    main()
