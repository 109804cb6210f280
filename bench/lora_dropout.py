"""What LoRA dropout costs per token: the same NF4 + LoRA model with and without dropout on the adapter inputs,
forward + backward of the recipes' loss (common.losses.causal_lm_loss_sum) on the bundled SFT data, alternating
between the two models batch by batch in one process so a busy machine slows both alike.

    python bench/lora_dropout.py --model_path=~/.cache/llama-train-recipes/smollm2-135m-instruct   # the real model
    python bench/lora_dropout.py --dropout=0.1 --rounds=5                                          # tiny model

peft applies a fresh dropout mask to the input of every adapted projection (q, k, v, o, gate, up, down: seven masks
of [tokens, width] per layer and pass), which on CPU is a large share of a LoRA step.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from sft_step import sft_batches, step_bench_parser, time_alternating, train_step  # noqa: E402

from common.logs import quiet_third_party_logs  # noqa: E402
from common.model import add_lora, load_model, prepare_for_lora_training  # noqa: E402


def main():
    p = step_bench_parser(__doc__)
    p.add_argument("--dropout", type=float, default=0.05, help="the dropout compared with none")
    args = p.parse_args()
    quiet_third_party_logs()
    torch.set_num_threads(args.threads)
    model_dir, tokenizer, examples, batches = sft_batches(args.model_path, args.batch_size)
    models = {}
    for dropout in (0.0, args.dropout):
        torch.manual_seed(0)
        base = prepare_for_lora_training(load_model(model_dir, "nf4", torch.float32, None), True, False)
        models[dropout] = add_lora(base, args.lora_r, 16, dropout, ["all-linear"]).train()

    pad_id = tokenizer.pad_token_id
    for model in models.values():  # warm-up
        train_step(model, examples, batches[0], pad_id)
    tokens, seconds = time_alternating(models, examples, batches, pad_id, args.rounds, args.batches)
    print(f"{args.model_path}: NF4 + LoRA r={args.lora_r} on every projection, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.batches} batches, forward + backward, {args.threads} threads")
    print(f"{'lora_dropout':>12}{'real tokens':>13}{'seconds':>9}{'tok/s':>8}{'vs none':>9}")
    for dropout in models:
        speed = tokens[dropout] / seconds[dropout]
        print(f"{dropout:>12g}{tokens[dropout]:>13,}{seconds[dropout]:>9.1f}{speed:>8.1f}"
              f"{speed / (tokens[0.0] / seconds[0.0]):>8.2f}x")


if __name__ == "__main__":
    main()
