"""sft/qlora against its peers on the same model, data, LoRA, batch, sequence length and steps, in one run.

    python bench/sft_qlora_vs_peers.py                        # CPU default: tiny NF4 Llama, bundled SFT data
    python bench/sft_qlora_vs_peers.py --steps 60 --rounds 3 --model_path /models/llama-7b   # on a GPU

Contenders, each in its own process (so peak memory is its own), run in turn A B C A B C:
  ours  sft/qlora's main()
  hf    plain transformers Trainer + peft (DataCollatorForSeq2Seq, no length grouping: the usual script)
  trl   TRL's SFTTrainer on prompt/completion text (skipped if trl is not installed)
All get the same examples (the prompt rendered with the Alpaca template), NF4 base with double quant, LoRA r/alpha/
dropout on all linear layers, AdamW, cosine schedule, the same micro-batch and no gradient accumulation.
Reported per contender (median over rounds): real (non-pad) tokens per second of the training loop, time per step,
peak memory (process RSS on CPU, max allocated on GPU), useful-token fraction (real tokens / tokens computed), and
ours / peer tok/s.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a standalone script: make `common` importable


def peak_memory_gb():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def shared_examples(args, tokenizer):
    from common.data import build_sft_examples, read_records

    return build_sft_examples(read_records(args.data_path), tokenizer, args.max_seq_len)[0]


def worker_ours(args, out):
    sys.path.insert(0, str(REPO / "sft" / "qlora"))
    import train

    cfg = train.parse_config(train.Config, [
        f"--model_path={args.model_path}", f"--data_path={args.data_path}", "--eval_data_path=", f"--output_dir={out}",
        f"--max_steps={args.steps}", f"--batch_size={args.batch_size}", "--grad_accum=1", f"--lora_r={args.lora_r}",
        f"--lora_alpha={args.lora_alpha}", f"--max_seq_len={args.max_seq_len}", "--report_to=none", "--optim=adamw",
        f"--log_every={args.steps}", f"--gradient_checkpointing={args.gradient_checkpointing}"])
    r = train.main(cfg)
    return {"train_seconds": r["train_seconds"], "tokens": r["tokens"], "tokens_computed": r["tokens_computed"],
            "final_loss": r["losses"][-1], "steps": r["steps"]}


class TokenCounter:
    """Wraps a data collator and counts real and padded tokens of every batch it builds."""

    def __init__(self, collator):
        self.collator, self.real, self.computed = collator, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        self.real += int(batch["attention_mask"].sum())
        self.computed += batch["attention_mask"].numel()
        return batch


def hf_model(args):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from common.model import disable_bnb_cpu_inference_repack, resolve_model_path

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(args.model_path), dtype=dtype, device_map={"": 0} if cuda else None,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    disable_bnb_cpu_inference_repack(model)  # without it CPU LoRA gradients are wrong: no peer should race that way
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def trainer_args(args, out):
    import torch

    cuda = torch.cuda.is_available()
    return dict(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03,
                max_grad_norm=0.3, logging_steps=1, save_strategy="no", report_to=[], seed=42,
                use_cpu=not cuda, bf16=cuda, optim="adamw_torch", dataloader_num_workers=0,
                gradient_checkpointing=args.gradient_checkpointing, disable_tqdm=True)


def timed_train(trainer):
    from transformers import TrainerCallback

    times = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            times["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    result = trainer.train()
    return times["end"] - times["start"], result


def worker_hf(args, out):
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from common.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(args.model_path))
    tokenizer.padding_side = "right"  # the usual script pads right
    examples = shared_examples(args, tokenizer)
    model = hf_model(args)
    counter = TokenCounter(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer = Trainer(model=model, args=TrainingArguments(**trainer_args(args, out)),
                      train_dataset=Dataset.from_list(examples), data_collator=counter)
    seconds, result = timed_train(trainer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_seconds": seconds, "tokens": counter.real, "tokens_computed": counter.computed,
            "final_loss": losses[-1] if losses else float("nan"), "steps": trainer.state.global_step}


def worker_trl(args, out):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from common.data import Record, prompt_and_answer, read_records, sft_format
    from common.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(args.model_path))
    rows = []
    for rec in read_records(args.data_path):
        prompt, answer = prompt_and_answer(rec, sft_format(rec))
        rows.append({"prompt": prompt, "completion": answer})
    model = hf_model(args)
    config = SFTConfig(**trainer_args(args, out), max_length=args.max_seq_len, packing=False,
                       completion_only_loss=True, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    seconds, result = timed_train(trainer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_seconds": seconds, "tokens": counter.real, "tokens_computed": counter.computed,
            "final_loss": losses[-1] if losses else float("nan"), "steps": trainer.state.global_step}


WORKERS = {"ours": worker_ours, "hf": worker_hf, "trl": worker_trl}


def run_worker(name, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name] + [f"--{k}={v}" for k, v in vars(args).items()
                                                         if k not in ("worker", "rounds", "contenders")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="tiny")
    p.add_argument("--data_path", default=str(REPO / "data" / "sft" / "train.jsonl"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--gradient_checkpointing", type=lambda s: s.lower() in ("1", "true"), default=False)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--contenders", default="ours,hf,trl")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:  # inside a contender's own process
        from common.logs import quiet_third_party_logs

        quiet_third_party_logs()
        with tempfile.TemporaryDirectory() as out:
            result = WORKERS[args.worker](args, Path(out))
        result["peak_mem_gb"] = peak_memory_gb()
        print("RESULT " + json.dumps(result))
        return

    names = [n for n in args.contenders.split(",") if n]
    if "trl" in names:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl not installed: skipping the SFTTrainer peer")
            names.remove("trl")
    results = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            res = run_worker(name, args)
            if res:
                results[name].append(res)
                print(f"round {r + 1} {name:5s} {res['tokens'] / res['train_seconds']:8.0f} tok/s  "
                      f"{res['peak_mem_gb']:.2f} GB  loss {res['final_loss']:.4f}", flush=True)
    med = lambda rows, f: statistics.median(f(x) for x in rows)  # noqa: E731
    table = {}
    for name, rows in results.items():
        if rows:
            table[name] = {"tok_s": med(rows, lambda x: x["tokens"] / x["train_seconds"]),
                           "step_ms": med(rows, lambda x: 1000 * x["train_seconds"] / x["steps"]),
                           "mem": med(rows, lambda x: x["peak_mem_gb"]),
                           "useful": med(rows, lambda x: x["tokens"] / x["tokens_computed"]),
                           "loss": med(rows, lambda x: x["final_loss"])}
    print(f"\nsft/qlora vs peers: model={args.model_path} steps={args.steps} batch={args.batch_size} "
          f"lora_r={args.lora_r} max_seq_len={args.max_seq_len} rounds={args.rounds} (medians)")
    print("| contender | tok/s (real) | ms/step | peak mem GB | useful tokens | final loss | ours / this |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ours = table.get("ours", {}).get("tok_s")
    for name, t in table.items():
        ratio = f"{ours / t['tok_s']:.2f}x" if ours else "-"
        print(f"| {name} | {t['tok_s']:,.0f} | {t['step_ms']:.0f} | {t['mem']:.2f} | {t['useful']:.3f} | "
              f"{t['loss']:.4f} | {ratio} |")


if __name__ == "__main__":
    main()
