"""Our recipes against their closest peers, family by family, on the same model, data, LoRA, batch, sequence length
and steps: one command, one table per family.

    python bench/peers.py --family all                          # CPU: tiny Llama, bundled data, 30 steps, 2 rounds
    python bench/peers.py --family cls --steps 2 --rounds 1     # a smoke run (seconds of training, numbers are noise)
    python bench/peers.py --family sft --model_path=/models/llama-8b --max_seq_len=2048 --batch_size=4 \
        --gradient_checkpointing=true --steps 30 --rounds 2    # one GPU; bench/gpu_smoke.sh runs it at the 1B shape
    python bench/peers.py --family pretrain --json out.json     # also write every round's raw numbers

Families and contenders; each contender runs in its own process (so its peak memory is its own), in turn A B A B
over the rounds:
  sft       ours   sft/qlora's main()
            hf     transformers Trainer + peft, DataCollatorForSeq2Seq (pads right, no length grouping: the usual
                   script), AutoModelForCausalLM
            trl    TRL's SFTTrainer on prompt/completion text (skipped if trl is not installed)
  cls       ours   cls/qlora's main()
            hf     transformers Trainer + peft on AutoModelForSequenceClassification, DataCollatorWithPadding (pads
                   right, no length grouping); the same texts + EOS, the same labels
  pretrain  ours   pretrain/deepspeed's main() (ZeRO-1), or pretrain/fsdp's with --pretrain_recipe=fsdp
            torch  a plain PyTorch loop: AutoModelForCausalLM.from_config of the same config and seed, torch AdamW,
                   the same packed windows from common.pretrain_data.packed_loader, loss from model(labels=...)
Held equal within a family: model, data, micro-batch, sequence length, steps, no gradient accumulation, torch AdamW
(sft, cls: fused, the Trainer's default, on CPU too; pretrain: fused on a GPU) with the same lr and warmup, the same
schedule type (linear warmup + cosine; ours ends at 10% of the peak, Trainer's "cosine" at 0), gradient clipping,
gradient checkpointing (default: on with a GPU, off on CPU), bf16 compute on a GPU (the plain loop: fp32 weights
under bf16 autocast) and fp32 on CPU, the attention kernel (sdpa; pretrain: flash-attention 2 for both when
installed on a GPU), and for the LoRA families an NF4 base with double quant and LoRA r / alpha / dropout (default
0, the recipes' default) on every linear layer (cls: the score head trained in full by both).

Reported per contender (median over rounds): real (non-pad) tokens per second of the training loop (model loading,
data preparation and evals excluded), computed tokens (pads included) per second, milliseconds per optimizer step,
peak memory (process RSS on CPU, max allocated on a GPU), useful-token fraction (real tokens / tokens computed),
final training loss, and ours / this tok/s; --json also has the peak the GPU allocator reserved (peak_reserved_gb
per round, reserved_gb in the medians). Pretraining packs documents into full windows: no pads, so the useful-token
fraction is 1.0 for both by construction (not measured).
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
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a standalone script: make `common` importable
from common.config import parse_bool  # noqa: E402

FAMILIES = ("sft", "cls", "pretrain")
# Per family: what the recipe is compared at unless the command line says otherwise (its own defaults where they
# make sense; 30 steps x 2 rounds for all)
DEFAULTS = {
    "sft": dict(data_path=str(REPO / "data" / "sft" / "train.jsonl"), batch_size=4, seq_len=512, lora_r=64,
                lora_alpha=16, lr=2e-4, warmup_ratio=0.03, max_grad_norm=0.3, contenders="ours,hf,trl"),
    "cls": dict(data_path=str(REPO / "data" / "cls" / "train.jsonl"), batch_size=16, seq_len=512, lora_r=16,
                lora_alpha=32, lr=1e-3, warmup_ratio=0.05, max_grad_norm=1.0, contenders="ours,hf"),
    "pretrain": dict(data_path=str(REPO / "data" / "pretrain" / "shards"), batch_size=8, seq_len=256, lora_r=0,
                     lora_alpha=0, lr=1e-3, warmup_steps=10, max_grad_norm=1.0, contenders="ours,torch"),
}
SEED = 42
PRETRAIN_LOADER_WORKERS = 1  # the pretrain recipes' default: one process tokenizing ahead, for both contenders
LABELS = {"sft": "sft/qlora", "cls": "cls/qlora", "hf": "Trainer + peft", "trl": "TRL SFTTrainer",
          "torch": "plain PyTorch loop"}


def peak_memory() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9, "gpu"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "rss"  # KiB on Linux


def peak_reserved_memory() -> float | None:
    """The most the CUDA caching allocator held (allocated + cached blocks), GB; None without a GPU."""
    import torch

    return torch.cuda.max_memory_reserved() / 1e9 if torch.cuda.is_available() else None


def import_recipe(folder: str):
    """A recipe's train.py as module `train` (each contender has its own process, so no two recipes meet)."""
    sys.path.insert(0, str(REPO / folder))
    import train

    return train


class TokenCounter:
    """Wraps a collate function and counts the real (attention 1) and computed tokens of every batch it builds."""

    def __init__(self, collate):
        self.collate, self.real, self.computed = collate, 0, 0

    def __call__(self, *args, **kwargs):
        batch = self.collate(*args, **kwargs)
        self.real += int(batch["attention_mask"].sum())
        self.computed += batch["attention_mask"].numel()
        return batch


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face peers' shared pieces: an NF4 base + LoRA, Trainer arguments, a clock on the training loop


def hf_lora_model(s, model_class, task_type, **kwargs):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, set_seed

    from common.model import disable_bnb_cpu_inference_repack, resolve_model_path

    set_seed(SEED)  # what a script does before building the model (the cls score head is random-init)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = model_class.from_pretrained(
        resolve_model_path(s.model_path), dtype=dtype, device_map={"": 0} if cuda else None,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
        **kwargs)
    disable_bnb_cpu_inference_repack(model)  # without it CPU LoRA gradients are wrong: no peer should race that way
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules="all-linear",
                      task_type=task_type)
    return get_peft_model(model, lora)


def trainer_args(s, out) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return dict(output_dir=str(out), max_steps=s.steps, per_device_train_batch_size=s.batch_size,
                gradient_accumulation_steps=1, learning_rate=s.lr, lr_scheduler_type="cosine",
                warmup_steps=s.warmup_ratio, max_grad_norm=s.max_grad_norm, weight_decay=0.0, logging_steps=1,
                save_strategy="no", report_to=[], seed=SEED, use_cpu=not cuda, bf16=cuda,
                optim="adamw_torch_fused",  # the Trainer's default; ours: torch AdamW, fused too
                dataloader_num_workers=0, gradient_checkpointing=s.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False}, disable_tqdm=True)


def timed_train(trainer, counter) -> dict:
    """Train, timing from the first to the last step (on_train_begin .. on_train_end), like our recipes' loops."""
    from transformers import TrainerCallback

    times = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            times["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_seconds": times["end"] - times["start"], "tokens": counter.real, "tokens_computed": counter.computed,
            "final_loss": losses[-1] if losses else float("nan"), "steps": trainer.state.global_step}


# ---------------------------------------------------------------------------------------------------------------
# sft: sft/qlora vs Trainer + peft vs TRL SFTTrainer


def lora_recipe_args(s, out) -> list[str]:
    """The command line of sft/qlora or cls/qlora for the shared settings: no eval, no accumulation, plain AdamW."""
    return [
        f"--model_path={s.model_path}", f"--data_path={s.data_path}", "--eval_data_path=", f"--output_dir={out}",
        f"--max_steps={s.steps}", f"--batch_size={s.batch_size}", "--grad_accum=1", f"--lora_r={s.lora_r}",
        f"--lora_alpha={s.lora_alpha}", f"--lora_dropout={s.lora_dropout}", f"--max_seq_len={s.seq_len}",
        f"--lr={s.lr}", f"--warmup_ratio={s.warmup_ratio}", f"--max_grad_norm={s.max_grad_norm}", "--optim=adamw",
        f"--seed={SEED}", "--report_to=none", f"--log_every={s.steps}",
        f"--gradient_checkpointing={s.gradient_checkpointing}"]


def sft_ours(s, out):
    train = import_recipe("sft/qlora")
    cfg = train.parse_config(train.Config, lora_recipe_args(s, out))
    r = train.main(cfg)
    return {"train_seconds": r["train_seconds"], "tokens": r["tokens"], "tokens_computed": r["tokens_computed"],
            "final_loss": r["losses"][-1], "steps": r["steps"]}


def sft_hf(s, out):
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from common.data import build_sft_examples, read_records
    from common.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(s.model_path))
    tokenizer.padding_side = "right"  # the usual script pads right
    examples = build_sft_examples(read_records(s.data_path), tokenizer, s.seq_len)[0]  # the same ids and labels
    model = hf_lora_model(s, AutoModelForCausalLM, "CAUSAL_LM")
    counter = TokenCounter(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer = Trainer(model=model, args=TrainingArguments(**trainer_args(s, out)),
                      train_dataset=examples, data_collator=counter)  # a list: no `datasets` on the GPU machine
    return timed_train(trainer, counter)


def sft_trl(s, out):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from common.data import prompt_and_answer, read_records, sft_format
    from common.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(s.model_path))
    rows = []
    for rec in read_records(s.data_path):
        prompt, answer = prompt_and_answer(rec, sft_format(rec))  # the Alpaca-rendered prompt, as ours trains on
        rows.append({"prompt": prompt, "completion": answer})
    model = hf_lora_model(s, AutoModelForCausalLM, "CAUSAL_LM")
    config = SFTConfig(**trainer_args(s, out), max_length=s.seq_len, packing=False, completion_only_loss=True,
                       dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    return timed_train(trainer, counter)


# ---------------------------------------------------------------------------------------------------------------
# cls: cls/qlora vs Trainer + peft on AutoModelForSequenceClassification


def cls_ours(s, out):
    train = import_recipe("cls/qlora")
    counter = TokenCounter(train.collate_left_padded)  # the recipe's own batches, counted as they are built
    train.collate_left_padded = counter
    cfg = train.parse_config(train.Config, lora_recipe_args(s, out))
    r = train.main(cfg)
    if counter.real != r["tokens"]:  # the recipe's own count and ours must agree, or the fraction means nothing
        raise RuntimeError(f"cls/qlora counted {r['tokens']} tokens, the collate counter {counter.real}")
    return {"train_seconds": r["train_seconds"], "tokens": r["tokens"], "tokens_computed": counter.computed,
            "final_loss": r["losses"][-1], "steps": r["steps"]}


def cls_hf(s, out):
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from common.data import build_cls_examples, label_set, read_records
    from common.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(s.model_path))
    tokenizer.padding_side = "right"  # the usual script pads right
    records = read_records(s.data_path)
    labels = label_set(records, "label")
    # the same token ids as ours (BOS + text + EOS, cut at seq_len keeping the EOS) and the same class indices
    examples = build_cls_examples(records, tokenizer, s.seq_len, "classification", labels)[0]
    rows = [{"input_ids": e["input_ids"], "label": e["label"]} for e in examples]
    model = hf_lora_model(s, AutoModelForSequenceClassification, "SEQ_CLS", num_labels=len(labels))
    model.config.pad_token_id = tokenizer.pad_token_id  # HF reads the last non-pad token of each right-padded row
    counter = TokenCounter(DataCollatorWithPadding(tokenizer))
    trainer = Trainer(model=model, args=TrainingArguments(**trainer_args(s, out), remove_unused_columns=False),
                      train_dataset=rows, data_collator=counter)  # a list: no `datasets` on the GPU machine
    return timed_train(trainer, counter)


# ---------------------------------------------------------------------------------------------------------------
# pretrain: pretrain/deepspeed (or fsdp) vs a plain PyTorch loop


def pretrain_source(model_path: str) -> tuple[str, str]:
    """--model_path for pretraining: a bundled config name (tiny, 1b, 7b, 65b), or a folder whose config.json is
    the architecture (random init) and whose tokenizer, if it has one, is the tokenizer."""
    if model_path in ("tiny", "1b", "7b", "65b"):
        return model_path, "tiny"
    folder = Path(model_path)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    return str(folder / "config.json"), str(folder) if has_tokenizer else "tiny"


def pretrain_ours(s, out):
    train = import_recipe(f"pretrain/{s.pretrain_recipe}")
    model_config, tokenizer_path = pretrain_source(s.model_path)
    cfg = train.parse_config(train.Config, [
        f"--model_config={model_config}", f"--tokenizer_path={tokenizer_path}", f"--data_path={s.data_path}",
        "--eval_data_path=", f"--output_dir={out}", f"--max_steps={s.steps}", f"--batch_size={s.batch_size}",
        "--grad_accum=1", f"--seq_len={s.seq_len}", f"--lr={s.lr}", f"--warmup_steps={s.warmup_steps}",
        f"--max_grad_norm={s.max_grad_norm}", f"--seed={SEED}", f"--num_workers={PRETRAIN_LOADER_WORKERS}",
        "--report_to=none", f"--log_every={s.steps}", f"--gradient_checkpointing={s.gradient_checkpointing}"])
    r = train.main(cfg)
    tokens = r["steps"] * s.batch_size * s.seq_len  # full packed windows: every token is real
    return {"train_seconds": r["train_seconds"], "tokens": tokens, "tokens_computed": tokens,
            "final_loss": r["losses"][-1], "first_loss": r["losses"][0], "steps": r["steps"]}


def pretrain_torch(s, out):
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from common.model import load_tokenizer, pretrain_model_config, pretrain_tokenizer_dir, resolve_attention
    from common.optim import warmup_cosine, weight_decay_groups
    from common.pretrain_data import open_token_source, packed_loader
    from common.runtime import seed_everything

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    seed_everything(SEED)
    model_config, tokenizer_path = pretrain_source(s.model_path)
    tokenizer = load_tokenizer(pretrain_tokenizer_dir(tokenizer_path, ""))
    config = pretrain_model_config(model_config, "", tokenizer)  # the same architecture and vocabulary as ours
    # fp32 weights with bf16 autocast on a GPU: the plain mixed-precision recipe
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation=resolve_attention("auto", device)).to(device)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the recipes' AdamW settings: betas (0.9, 0.95), decay 0.1 on matrices only
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=s.lr, betas=(0.9, 0.95), fused=cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(s.steps, s.warmup_steps))
    source = open_token_source(s.data_path, tokenizer)
    loader = iter(packed_loader(source, s.seq_len, s.batch_size, 0, 1, PRETRAIN_LOADER_WORKERS, SEED))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    model.train()
    seconds, tokens, losses = 0.0, 0, []
    for _ in range(s.steps):
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}  # input_ids, labels, positions
        with autocast:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        tokens += batch["input_ids"].numel()  # full packed windows: every token is real
    return {"train_seconds": seconds, "tokens": tokens, "tokens_computed": tokens, "final_loss": losses[-1],
            "first_loss": losses[0], "steps": s.steps}


WORKERS = {("sft", "ours"): sft_ours, ("sft", "hf"): sft_hf, ("sft", "trl"): sft_trl,
           ("cls", "ours"): cls_ours, ("cls", "hf"): cls_hf,
           ("pretrain", "ours"): pretrain_ours, ("pretrain", "torch"): pretrain_torch}


# ---------------------------------------------------------------------------------------------------------------
# The driver: settings per family, contenders in turn, medians, tables


def run_worker(family: str, name: str, settings: dict) -> dict | None:
    """One contender in a fresh process; its RESULT line, or None (with its stderr shown) if it failed."""
    cmd = [sys.executable, __file__, f"--worker={family}:{name}", f"--settings={json.dumps(settings)}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {family}/{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def worker_main(spec: str, settings: dict):
    """Inside a contender's own process: resolve the device-dependent settings, train, print one RESULT line."""
    import torch

    from common.logs import quiet_third_party_logs

    family, name = spec.split(":")
    quiet_third_party_logs()
    cuda = torch.cuda.is_available()
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)  # every contender alone on the machine gets all its cores
    if settings["gradient_checkpointing"] is None:
        settings["gradient_checkpointing"] = cuda  # the recipes' default: on with a GPU
    with tempfile.TemporaryDirectory() as out:
        result = WORKERS[family, name](SimpleNamespace(**settings), Path(out) / "out")
    result["peak_mem_gb"], result["mem_kind"] = peak_memory()
    result["peak_reserved_gb"] = peak_reserved_memory()
    result["gradient_checkpointing"] = settings["gradient_checkpointing"]
    print("RESULT " + json.dumps(result), flush=True)


def family_settings(family: str, args) -> dict:
    s = {**DEFAULTS[family], "model_path": args.model_path, "steps": args.steps,
         "pretrain_recipe": args.pretrain_recipe, "gradient_checkpointing": args.gradient_checkpointing,
         "lora_dropout": args.lora_dropout}
    for key in ("data_path", "batch_size", "seq_len", "lora_r", "lora_alpha", "lr", "contenders"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    return s


def medians(rows: list[dict]) -> dict:
    def med(f):
        return statistics.median(f(x) for x in rows)

    reserved = [x.get("peak_reserved_gb") for x in rows]
    return {"tok_s": med(lambda x: x["tokens"] / x["train_seconds"]),
            "computed_tok_s": med(lambda x: x["tokens_computed"] / x["train_seconds"]),
            "step_ms": med(lambda x: 1000 * x["train_seconds"] / x["steps"]),
            "mem_gb": med(lambda x: x["peak_mem_gb"]),
            "reserved_gb": statistics.median(reserved) if None not in reserved else None,
            "useful": med(lambda x: x["tokens"] / x["tokens_computed"]),
            "final_loss": med(lambda x: x["final_loss"]), "mem_kind": rows[0]["mem_kind"], "rounds": len(rows)}


def print_table(family: str, s: dict, table: dict, rounds: int):
    ours = table.get("ours", {}).get("tok_s")
    mem_kind = next((t["mem_kind"] for t in table.values()), "rss")
    mem_head = "peak GPU GB (max allocated)" if mem_kind == "gpu" else "peak RSS GB"
    ours_label = f"pretrain/{s['pretrain_recipe']}" if family == "pretrain" else LABELS[family]
    lora = ""
    if family != "pretrain":
        lora = f" lora_r={s['lora_r']} alpha={s['lora_alpha']} dropout={s['lora_dropout']}"
    print(f"\n{family}: {ours_label} vs peers | model={s['model_path']} steps={s['steps']} batch={s['batch_size']} "
          f"seq={s['seq_len']}{lora} rounds={rounds} (medians)")
    print(f"| contender | tok/s (real) | tok/s (computed) | ms/step | {mem_head} | useful tokens | final loss | "
          "ours / this |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, t in table.items():
        label = ours_label if name == "ours" else LABELS.get(name, name)
        ratio = f"{ours / t['tok_s']:.2f}x" if ours else "-"
        print(f"| {name} ({label}) | {t['tok_s']:,.0f} | {t['computed_tok_s']:,.0f} | {t['step_ms']:,.0f} | "
              f"{t['mem_gb']:.2f} | {t['useful']:.3f} | {t['final_loss']:.4f} | {ratio} |")
    if family == "pretrain":
        print("useful tokens: 1.000 for every contender by construction (documents packed into full windows, "
              "no padding)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="all", choices=(*FAMILIES, "all"))
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run, the same for every contender")
    p.add_argument("--rounds", type=int, default=2, help="runs per contender, in turn A B A B")
    p.add_argument("--model_path", default="tiny",
                   help="'tiny' or a local model folder (pretrain: also 1b, 7b, 65b, or a folder's config.json)")
    p.add_argument("--data_path", default=None, help="the family's training data (default: the bundled sample)")
    p.add_argument("--batch_size", type=int, default=None, help="micro-batch (default: sft 4, cls 16, pretrain 8)")
    p.add_argument("--seq_len", "--max_seq_len", dest="seq_len", type=int, default=None,
                   help="max sequence length, or the packed window for pretrain (default: 512, 512, 256)")
    p.add_argument("--lora_r", type=int, default=None, help="LoRA rank (default: sft 64, cls 16)")
    p.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: sft 16, cls 32)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout, for every LoRA contender")
    p.add_argument("--gradient_checkpointing", type=parse_bool, nargs="?", const=True, default=None,
                   help="for every contender (default: on with a GPU, off on CPU)")
    p.add_argument("--pretrain_recipe", default="deepspeed", choices=("deepspeed", "fsdp"))
    p.add_argument("--contenders", default=None, help="comma list (default: every contender of the family)")
    p.add_argument("--json", default=None, help="also write the settings and every round's raw numbers here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker, json.loads(args.settings))
        return
    families = FAMILIES if args.family == "all" else (args.family,)
    if args.family == "all" and args.data_path:
        p.error("--data_path names one family's data: use it with --family sft, cls or pretrain")
    report = {}
    for family in families:
        s = family_settings(family, args)
        names = [n for n in s.pop("contenders").split(",") if n]
        unknown = [n for n in names if (family, n) not in WORKERS]
        if unknown:
            p.error(f"--contenders: {', '.join(unknown)} not in {family}'s "
                    f"{', '.join(n for f, n in WORKERS if f == family)}")
        if "trl" in names:
            try:
                import trl  # noqa: F401
            except ImportError:
                print("trl not installed: skipping the SFTTrainer peer")
                names.remove("trl")
        results = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names:
                res = run_worker(family, name, s)
                if res:
                    results[name].append(res)
                    print(f"{family} round {r + 1} {name:5s} {res['tokens'] / res['train_seconds']:9,.0f} tok/s  "
                          f"{res['peak_mem_gb']:.2f} GB  loss {res['final_loss']:.4f}", flush=True)
        table = {n: medians(rows) for n, rows in results.items() if rows}
        print_table(family, s, table, args.rounds)
        report[family] = {"settings": s, "contenders": names, "rounds": results, "medians": table}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nraw per-round numbers in {args.json}")
    failed = [f"{f}/{n}" for f, r in report.items() for n in r["contenders"] if len(r["rounds"][n]) < args.rounds]
    if failed:
        print(f"failed runs: {', '.join(failed)} (see above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
