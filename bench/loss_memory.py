"""Peak memory and time of one training step's loss: the plain loss (all logits at once) against the chunked one
(--loss_chunk: the LM head on a chunk of trained tokens at a time, recomputed in backward).

    python bench/loss_memory.py                                   # vocabularies 32,000 / 49,152 / 128,256, 2,048 tokens
    python bench/loss_memory.py --vocab=128256 --seq_len=4096 --chunk=512 --rounds=3

Each measurement is a fresh process: a random Llama with the given vocabulary (2 layers of hidden 576, fp32, on CPU)
and LoRA on every projection, then one forward and backward of common.losses.causal_lm_loss_sum over one row whose
every position is trained (a packed row: the worst case for logits). A thread samples the process's anonymous
resident memory (bench/rss.py); the table gives what the step added at its peak over the memory before it. The
variants alternate (plain, chunked, plain, chunked, ...) so a busy machine hits both alike.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from bench.rss import PeakAnon
from common.losses import causal_lm_loss_sum

vocab, seq_len, chunk = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[5]))
config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=vocab, tie_word_embeddings=False)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, target_modules="all-linear"))
ids = torch.randint(0, vocab, (1, seq_len))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
with PeakAnon() as memory:
    start = time.perf_counter()
    loss = causal_lm_loss_sum(model, model.get_output_embeddings(), batch, ids, seq_len, chunk)
    loss.backward()
    seconds = time.perf_counter() - start
print(json.dumps({"added_peak_mb": (memory.peak - memory.base) / 2 ** 20, "seconds": seconds, "loss": loss.item()}))
"""


def measure(vocab: int, seq_len: int, chunk: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(REPO), str(vocab), str(seq_len), str(chunk),
                           str(threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", default="32000,49152,128256", help="comma-separated vocabulary sizes")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens in the row, every one trained")
    p.add_argument("--chunk", type=int, default=1024, help="--loss_chunk of the chunked variant")
    p.add_argument("--rounds", type=int, default=2, help="plain / chunked pairs per vocabulary")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each measuring process")
    args = p.parse_args()
    print(f"one row of {args.seq_len} trained tokens, forward + backward, LoRA r=16; chunked = --loss_chunk="
          f"{args.chunk}; peak = anonymous memory the step added (median of {args.rounds} rounds)")
    print(f"{'vocab':>8}{'fp32 logits MB':>16}{'plain peak MB':>15}{'chunked peak MB':>17}{'ratio':>7}"
          f"{'plain s':>9}{'chunked s':>11}{'loss diff':>11}")
    for vocab in (int(v) for v in args.vocab.split(",")):
        runs = {0: [], args.chunk: []}
        for _ in range(args.rounds):
            for chunk in runs:
                runs[chunk].append(measure(vocab, args.seq_len, chunk, args.threads))
        plain, chunked = runs[0], runs[args.chunk]
        plain_mb, chunked_mb = (sorted(r["added_peak_mb"] for r in rs)[len(rs) // 2] for rs in (plain, chunked))
        plain_s, chunked_s = (sorted(r["seconds"] for r in rs)[len(rs) // 2] for rs in (plain, chunked))
        loss_diff = abs(plain[0]["loss"] - chunked[0]["loss"]) / abs(plain[0]["loss"])
        logits_mb = args.seq_len * vocab * 4 / 2 ** 20
        print(f"{vocab:>8,}{logits_mb:>16,.0f}{plain_mb:>15,.0f}{chunked_mb:>17,.0f}{chunked_mb / plain_mb:>7.2f}"
              f"{plain_s:>9.2f}{chunked_s:>11.2f}{loss_diff:>11.1e}", flush=True)


if __name__ == "__main__":
    main()
