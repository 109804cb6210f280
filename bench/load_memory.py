"""Host memory of loading a checkpoint in 4-bit: how far under the full-precision size does loading stay?

    python bench/load_memory.py                          # a 158M-parameter random Llama (605 MB in fp32)
    python bench/load_memory.py --model_path=/models/llama-7b --quantization=nf4

Each load runs in its own process (common.model.load_model, the recipes' from_pretrained path, or
common/quant_load.py's layer-by-layer 4-bit load) while a thread samples the
process's anonymous resident memory (RssAnon) every 5 ms: memory that is really taken. The weights are
memory-mapped from the safetensors files, so the kernel's ru_maxrss also counts file pages that can be dropped at
any moment; both are printed. A table: checkpoint size, peak anonymous memory added by loading, what stays after.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
import bitsandbytes, peft, torch, transformers  # imported before the baseline: their memory is not the model's
from bench.rss import PeakAnon
from common.model import load_model
from common.quant_load import build_4bit_model_on_meta, load_4bit_weights

with PeakAnon() as memory:
    if sys.argv[2] == "nf4-layerwise":  # common/quant_load.py: meta model, one tensor read and quantized at a time
        model = build_4bit_model_on_meta(Path(sys.argv[1]), torch.float32)
        load_4bit_weights(model, Path(sys.argv[1]), torch.device("cpu"))
    else:  # the recipes' from_pretrained path
        model = load_model(Path(sys.argv[1]), sys.argv[2])
MB = 2 ** 20
maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"anon_base_mb": memory.base / MB, "anon_peak_mb": memory.peak / MB,
                  "anon_after_mb": memory.after / MB, "maxrss_mb": maxrss_mb}))
"""


def make_mid_llama(folder: Path) -> Path:
    """A random Llama with 12 layers of hidden 1024 (158M parameters, 605 MB in fp32) in 50 MB shards."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                         num_key_value_heads=16, head_dim=64, vocab_size=2048)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="50MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(REPO / "common" / "tiny_llama" / name, folder / name)
    return folder


def measure(model_dir: Path, quantization: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(model_dir), quantization, str(REPO)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["checkpoint_mb"] = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2 ** 20
    result["added_peak_mb"] = result["anon_peak_mb"] - result["anon_base_mb"]
    result["added_after_mb"] = result["anon_after_mb"] - result["anon_base_mb"]
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="", help="a local checkpoint; default: a 158M random Llama made here")
    p.add_argument("--quantization", default="nf4-layerwise,nf4,none",
                   help="comma-separated: nf4-layerwise (common/quant_load.py), nf4, int8, none (from_pretrained)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_path) if args.model_path else make_mid_llama(Path(tmp) / "mid-llama")
        print(f"{'quantization':<14}{'checkpoint MB':>14}{'added peak MB':>15}{'added after MB':>16}{'peak/ckpt':>11}"
              f"{'ru_maxrss MB':>14}")
        for quantization in args.quantization.split(","):
            r = measure(model_dir, quantization)
            print(f"{quantization:<14}{r['checkpoint_mb']:>14,.0f}{r['added_peak_mb']:>15,.0f}{r['added_after_mb']:>16,.0f}"
                  f"{r['added_peak_mb'] / r['checkpoint_mb']:>11.2f}{r['maxrss_mb']:>14,.0f}", flush=True)


if __name__ == "__main__":
    main()
