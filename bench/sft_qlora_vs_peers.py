"""sft/qlora against its peers (plain Trainer + peft, TRL's SFTTrainer) on the same model, data, LoRA, batch, sequence
length and steps: the sft family of bench/peers.py, kept under this name for the command docs/benchmarks.md cites.

    python bench/sft_qlora_vs_peers.py --steps 30 --rounds 2        # = python bench/peers.py --family sft ...
    python bench/sft_qlora_vs_peers.py --steps 60 --rounds 3 --model_path /models/llama-7b   # on a GPU

Every option of bench/peers.py is accepted (--model_path, --data_path, --batch_size, --max_seq_len, --lora_r,
--lora_alpha, --gradient_checkpointing, --contenders, --json, ...); see its docstring for what is held equal and
what is reported.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

if __name__ == "__main__":
    peers.main(["--family=sft", *sys.argv[1:]])
