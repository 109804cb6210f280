"""Generate answers with a trained model: a whole checkpoint (full fine-tune, merged adapter) or a base + LoRA adapter,
batched with left padding, greedy by default.

    python tools/generate.py --model=/models/llama2-7b-sft --prompts=prompts.jsonl --out=answers.jsonl
    python tools/generate.py --model=/models/Llama-2-7b-hf --adapter=sft/qlora/out/final --load_in_4bit \\
        --prompts=prompts.jsonl --out=answers.jsonl --batch_size=16 --max_new_tokens=512
    python tools/generate.py --adapter=sft/qlora/out/final --interactive        # --model: the adapter's own base
    python tools/generate.py --model=tiny --prompts=data/sft/eval.jsonl --out=/tmp/answers.jsonl   # the tiny Llama

Prompts (.jsonl, .json or .jsonl.zst) are rendered as the sft recipes trained on them: alpaca {"instruction",
"input"?} with the Alpaca template, {"input"} as is, chat {"messages"} through the tokenizer's chat template with the
generation prompt (a final assistant message is the reference answer and is left out), {"prompt"} as is. With
--prompt_template=chat (a model trained with it) alpaca and {"input"} records go through the chat template too.
Answers in the SFT data files are ignored, so the training and eval files work as prompt files.
--out gets one {"prompt": <the rendered prompt>, "output": <the generated text>} per line, in input order.

Greedy decoding unless --do_sample (then --temperature, --top_p, --top_k; --seed makes a run repeatable).
--interactive reads one prompt per line from stdin (an instruction, rendered with --prompt_template; a line starting
with '{' is a JSON record as above, e.g. {"prompt": "raw text"}) and streams the answer as it is generated.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.config import UserError, exit_on_user_error  # noqa: E402
from common.data import DataError, Record, read_records  # noqa: E402
from common.inference import (  # noqa: E402
    add_model_arguments,
    encode_prompt,
    generate_texts,
    generation_prompt,
    load_from_args,
    make_generation_config,
)
from common.logs import quiet_third_party_logs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)  # --model, --adapter, --load_in_4bit, --dtype, --device_map, --max_memory_per_gpu
    p.add_argument("--prompts", help="records to answer (.jsonl, .json, .jsonl.zst)")
    p.add_argument("--out", help="where the {prompt, output} lines go")
    p.add_argument("--prompt_template", default="alpaca", choices=("alpaca", "chat"),
                   help="the template the model was trained with (the sft recipes' --prompt_template)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (default %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="most tokens per answer (default %(default)s)")
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default %(default)s)")
    p.add_argument("--top_p", type=float, default=0.9, help="sampling: nucleus mass (default %(default)s)")
    p.add_argument("--top_k", type=int, default=50, help="sampling: among the k likeliest (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling (default %(default)s)")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin and stream the answers")
    args = p.parse_args(argv)
    if not args.interactive and not (args.prompts and args.out):
        p.error("--prompts and --out are needed (or --interactive)")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--batch_size and --max_new_tokens must be at least 1")
    return args


def load(args):
    """Model, tokenizer and generation config from the options."""
    import torch

    model, tokenizer, model_dir, adapter_dir = load_from_args(args)
    torch.manual_seed(args.seed)
    config = make_generation_config(model, tokenizer, args.max_new_tokens, args.do_sample, args.temperature,
                                    args.top_p, args.top_k)
    return model, tokenizer, config, model_dir


def generate_file(args, records, model, tokenizer, config) -> dict:
    """Every record of --prompts answered, written to --out (through a temporary file: no half-written output)."""
    prompts = [generation_prompt(r, tokenizer, args.prompt_template) for r in records]
    prompt_ids = [encode_prompt(tokenizer, text, add_special) for text, add_special in prompts]
    start = time.perf_counter()

    def progress(done, total):
        print(f"generated {done}/{total}", file=sys.stderr, flush=True)

    outputs = generate_texts(model, tokenizer, prompt_ids, args.batch_size, config, on_batch=progress)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for (text, _), output in zip(prompts, outputs):
            f.write(json.dumps({"prompt": text, "output": output}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return {"prompts": len(records), "seconds": seconds, "outputs": outputs}


def interactive(args, model, tokenizer, config, stdin=None):
    """One prompt per line from stdin, the answer streamed to stdout; a bad line is reported and skipped."""
    import torch
    from transformers import TextStreamer

    stdin = stdin or sys.stdin
    device = next(model.parameters()).device
    print("type a prompt and press Enter ({...} lines are JSON records); Ctrl-D ends", file=sys.stderr, flush=True)
    for lineno, line in enumerate(stdin, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            data = json.loads(line) if line.startswith("{") else {"instruction": line}
            if not isinstance(data, dict):
                raise DataError(f"stdin:{lineno}: expected a JSON object")
            text, add_special = generation_prompt(Record(data, f"stdin:{lineno}"), tokenizer, args.prompt_template)
        except json.JSONDecodeError as e:
            print(f"error: stdin:{lineno}: malformed JSON ({e.msg})", file=sys.stderr, flush=True)
            continue
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        ids = torch.tensor([encode_prompt(tokenizer, text, add_special)], device=device)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                           streamer=streamer)
        sys.stdout.flush()


def main(argv=None, stdin=None) -> dict | None:
    args = parse_args(argv)
    quiet_third_party_logs()
    with exit_on_user_error():
        records = None if args.interactive else read_records(args.prompts)  # a bad file fails before the model loads
        model, tokenizer, config, model_dir = load(args)
        if args.interactive:
            interactive(args, model, tokenizer, config, stdin)
            return None
        result = generate_file(args, records, model, tokenizer, config)
    adapter = f" + {args.adapter}" if args.adapter else ""
    mode = f"sampling (T={args.temperature}, top_p={args.top_p}, top_k={args.top_k})" if args.do_sample else "greedy"
    print(f"answered {result['prompts']} prompts from {args.prompts} with {model_dir}{adapter}, {mode}, batch "
          f"{args.batch_size}, in {result['seconds']:.1f}s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
