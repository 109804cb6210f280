"""Where a training step's time goes: one recipe-shaped step (NF4 base + LoRA, or the full-precision model) under
torch.profiler, printed as a table of the operators with the most self time.

    python bench/profile_step.py                        # tiny NF4 Llama + LoRA r=64, bundled SFT data, batch 4
    python bench/profile_step.py --quantization=none --lora_r=0      # full fine-tune shape
    python bench/profile_step.py --model_path=/models/llama-7b --steps=5  # on a GPU

The batch is the recipes' own (length-grouped, left-padded, labels masked), the loss the recipes'
(common.losses.causal_lm_loss_sum: the LM head on the trained tokens only, --loss_chunk at a time if given),
the recipes' AdamW (fused) steps the trainable parameters; two warm-up steps are left out of the profile.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.data import build_sft_examples, collate_left_padded, plan_batches, read_records  # noqa: E402
from common.logs import quiet_third_party_logs  # noqa: E402
from common.losses import causal_lm_loss_sum, loss_window  # noqa: E402
from common.model import add_lora, load_model, load_tokenizer, prepare_for_lora_training, resolve_model_path  # noqa: E402
from common.optim import make_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="tiny")
    p.add_argument("--quantization", default="nf4", choices=("nf4", "int8", "none"))
    p.add_argument("--lora_r", type=int, default=64, help="0: train every weight")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--lora_dropout", type=float, default=0.0, help="the recipes' default since 2026-11-28: 0")
    p.add_argument("--loss_chunk", type=int, default=0, help="the recipes' --loss_chunk (0: all logits at once)")
    p.add_argument("--rows", type=int, default=20, help="operators listed")
    args = p.parse_args()
    quiet_third_party_logs()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32

    model_dir = resolve_model_path(args.model_path)
    tokenizer = load_tokenizer(model_dir)
    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tokenizer, 1024)
    lengths = [len(e["input_ids"]) for e in examples]
    batches = plan_batches(lengths, args.batch_size, 0, 0, True)
    model = load_model(model_dir, args.quantization, dtype, {"": device} if cuda else None)
    if args.lora_r > 0:
        model = prepare_for_lora_training(model, args.quantization != "none", False)
        model = add_lora(model, args.lora_r, 16, args.lora_dropout, ["all-linear"])
    model.train()
    head = model.get_output_embeddings()
    optimizer = make_optimizer(model, "adamw", 1e-4, 0.0, device)  # the recipes' AdamW, fused

    def step(i):
        batch = {k: v.to(device) for k, v in collate_left_padded([examples[j] for j in batches[i % len(batches)]],
                                                                 tokenizer.pad_token_id).items()}
        labels = batch.pop("labels")
        window = loss_window(labels)
        with torch.autocast("cuda", dtype=dtype, enabled=cuda):
            loss_sum = causal_lm_loss_sum(model, head, batch, labels, window, args.loss_chunk)
            loss = loss_sum / (labels != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    for i in range(2):
        step(i)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    tokens, start = 0, time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(2, 2 + args.steps):
            tokens += step(i)
    seconds = time.perf_counter() - start
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    print(f"{args.steps} steps, {tokens:,} real tokens in {seconds:.2f}s under the profiler "
          f"({tokens / seconds:,.0f} tok/s; the profiler itself slows the run)")


if __name__ == "__main__":
    main()
