"""What LoRA dropout costs per token: the same NF4 + LoRA model with and without dropout on the adapter inputs,
forward + backward of the recipes' loss (common.losses.causal_lm_loss_sum) on the bundled SFT data, alternating
between the two models batch by batch in one process so a busy machine slows both alike.

    python bench/lora_dropout.py --model_path=~/.cache/llama-train-recipes/smollm2-135m-instruct   # the real model
    python bench/lora_dropout.py --dropout=0.1 --rounds=5                                          # tiny model

peft applies a fresh dropout mask to the input of every adapted projection (q, k, v, o, gate, up, down: seven masks
of [tokens, width] per layer and pass), which on CPU is a large share of a LoRA step.
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

REPO = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="tiny")
    p.add_argument("--dropout", type=float, default=0.05, help="the dropout compared with none")
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--batches", type=int, default=6, help="batches per contender per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    quiet_third_party_logs()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_path(str(Path(args.model_path).expanduser()) if args.model_path != "tiny" else "tiny")
    tokenizer = load_tokenizer(model_dir)
    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tokenizer, 1024)
    batches = plan_batches([len(e["input_ids"]) for e in examples], args.batch_size, 0, 0, True)
    models = {}
    for dropout in (0.0, args.dropout):
        torch.manual_seed(0)
        base = prepare_for_lora_training(load_model(model_dir, "nf4", torch.float32, None), True, False)
        models[dropout] = add_lora(base, args.lora_r, 16, dropout, ["all-linear"]).train()

    def step(model, idx) -> int:
        batch = collate_left_padded([examples[i] for i in idx], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        loss = causal_lm_loss_sum(model, model.get_output_embeddings(), batch, labels, loss_window(labels))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    for model in models.values():  # warm-up
        step(model, batches[0])
    tokens, seconds = dict.fromkeys(models, 0), dict.fromkeys(models, 0.0)
    for r in range(args.rounds):
        for k in range(args.batches):
            idx = batches[(r * args.batches + k) % len(batches)]
            for dropout, model in models.items():  # A B A B: the same batch for both, back to back
                start = time.perf_counter()
                tokens[dropout] += step(model, idx)
                seconds[dropout] += time.perf_counter() - start
    print(f"{args.model_path}: NF4 + LoRA r={args.lora_r} on every projection, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.batches} batches, forward + backward, {args.threads} threads")
    print(f"{'lora_dropout':>12}{'real tokens':>13}{'seconds':>9}{'tok/s':>8}{'vs none':>9}")
    for dropout in models:
        speed = tokens[dropout] / seconds[dropout]
        print(f"{dropout:>12g}{tokens[dropout]:>13,}{seconds[dropout]:>9.1f}{speed:>8.1f}"
              f"{speed / (tokens[0.0] / seconds[0.0]):>8.2f}x")


if __name__ == "__main__":
    main()
