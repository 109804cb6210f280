"""What torch.compile of the decoder layers (the recipes' --compile) does to a LoRA training step: the same model
eager and with every decoder layer compiled, forward + backward of the recipes' loss (common.losses.
causal_lm_loss_sum) on the bundled SFT data, alternating between the two batch by batch in one process so a busy
machine slows both alike. The compile itself (the warm-up batches) is timed and reported apart.

    python bench/compile_layers.py                                   # tiny model, NF4 base
    python bench/compile_layers.py --quantization=none               # tiny model, fp32 base
    python bench/compile_layers.py --model_path=~/.cache/llama-train-recipes/smollm2-135m-instruct --batches=4
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from sft_step import sft_batches, step_bench_parser, time_alternating, train_step  # noqa: E402

from common.logs import quiet_third_party_logs  # noqa: E402
from common.model import add_lora, compile_decoder_layers, load_model, prepare_for_lora_training  # noqa: E402


def main():
    p = step_bench_parser(__doc__)
    p.add_argument("--quantization", default="nf4", choices=("nf4", "none"))
    p.add_argument("--warmup", type=int, default=4, help="batches per model before timing (the compile happens here)")
    args = p.parse_args()
    quiet_third_party_logs()
    torch.set_num_threads(args.threads)
    model_dir, tokenizer, examples, batches = sft_batches(args.model_path, args.batch_size)
    quantized = args.quantization != "none"
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        base = prepare_for_lora_training(load_model(model_dir, args.quantization, torch.float32, None), quantized,
                                         False)
        models[name] = add_lora(base, args.lora_r, 16, 0.0, ["all-linear"]).train()
    layers = compile_decoder_layers(models["compiled"])

    pad_id = tokenizer.pad_token_id
    warmup_seconds, warmup_losses = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        warmup_losses[name] = [train_step(model, examples, batches[k % len(batches)], pad_id)[1]
                               for k in range(args.warmup)]
        warmup_seconds[name] = time.perf_counter() - start
    tokens, seconds = time_alternating(models, examples, batches, pad_id, args.rounds, args.batches, args.warmup)
    diff = max(abs(a - b) for a, b in zip(warmup_losses["eager"], warmup_losses["compiled"]))
    print(f"{args.model_path}: {args.quantization} base + LoRA r={args.lora_r} on every projection, {layers} decoder "
          f"layers compiled, batch {args.batch_size}, {args.warmup} warm-up batches, {args.rounds} rounds x "
          f"{args.batches} batches, forward + backward, {args.threads} threads, torch {torch.__version__}")
    print(f"{'':>9}{'warm-up s':>11}{'real tokens':>13}{'seconds':>9}{'tok/s':>8}{'vs eager':>10}")
    for name in models:
        speed = tokens[name] / seconds[name]
        print(f"{name:>9}{warmup_seconds[name]:>11.1f}{tokens[name]:>13,}{seconds[name]:>9.1f}{speed:>8.1f}"
              f"{speed / (tokens['eager'] / seconds['eager']):>9.2f}x")
    print(f"largest warm-up loss difference, compiled vs eager: {diff:.2e}")


if __name__ == "__main__":
    main()
