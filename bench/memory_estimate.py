"""Training memory: the GPU estimate of every recipe for Llama 7B, 13B and 65B (tools/estimate_memory.py), and on CPU
the estimate against a measurement.

    python bench/memory_estimate.py                       # GPU, per recipe: micro-batch 1 x 1024 tokens, one GPU
    python bench/memory_estimate.py --batch=4 --seq=2048 --gpus=8
    python bench/memory_estimate.py --measure             # CPU: measured peak vs tools/estimate_memory.py --device=cpu

--measure trains a random-init Llama for two steps per configuration, the recipes' CPU path: fp32, torch AdamW,
token_loss_sum, `logits` kept referenced through backward as the recipes' loops do, peft LoRA r=64 on every
projection, NF4 with double quant through common.model.load_model, GPTQ through common.gptq.load_gptq_model (the
cached tiny GPTQ Llama). The runs of one shape and micro-batch share a child process while a thread samples its
anonymous resident memory (RssAnon) every 5 ms; a run's figure is its peak minus the memory before it began. So that
the figure means what the estimate means, memory in use by tensors:
- MALLOC_MMAP_THRESHOLD_=131072: every tensor over 128 KiB is its own mapping, handed back when freed. With glibc's
  default the threshold grows with the tensors freed and freed activations stay in the heap: RssAnon then ran 1.2x
  (full fine-tune) to 1.8x (LoRA) above the bytes in use, tiny Llama at 4 x 512 tokens. malloc_trim between runs.
- peft's first get_peft_model imports gptqmodel (about 100 MB of RssAnon): done before any baseline.
- Weights a 4-bit load leaves in fp32 (embeddings, head, norms) still point into the memory-mapped checkpoint (file
  pages, not RssAnon): they are copied, as a GPU would.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import estimate_memory as em  # noqa: E402

MEASURE = r"""
import ctypes, gc, json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import bitsandbytes, peft, torch, transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from bench.rss import PeakAnon
from common.losses import token_loss_sum
from common.gptq import gptq_linear_names, import_gptqmodel, load_gptq_model
from common.model import add_lora, load_model, prepare_for_lora_training
import_gptqmodel()

torch.set_num_threads(1)
get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), LoraConfig(target_modules=["0"], r=4))  # lazy imports

def train(c):
    torch.manual_seed(0)
    if c["method"] in ("qlora", "int4-lora"):
        model = (load_model(Path(c["checkpoint"]), "nf4") if c["method"] == "qlora" else
                 load_gptq_model(Path(c["checkpoint"])))  # GPTQ: the trainable kernel, as sft/peft-int4
        for p in model.parameters():  # the fp32 embeddings, head and norms still point into the mapped checkpoint
            if p.__class__.__name__ != "Params4bit":
                p.data = p.data.clone()  # file pages, not RssAnon: copy them, as a GPU would
    else:
        model = LlamaForCausalLM(LlamaConfig(**c["config"]))
    if c["method"] == "full":
        if c["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = prepare_for_lora_training(model, c["method"] != "lora", c["gradient_checkpointing"])
        targets = gptq_linear_names(model) if c["method"] == "int4-lora" else ["all-linear"]
        model = add_lora(model, c["lora_r"], 16, c["lora_dropout"], targets)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, c["config"]["vocab_size"], (c["batch_size"], c["seq_len"]))
    for _ in range(2):  # the second step is the fullest: AdamW's states exist from the first
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        loss = token_loss_sum(logits, ids)  # as in the recipes, `logits` stays referenced through backward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

libc = ctypes.CDLL("libc.so.6")
for c in json.loads(sys.argv[2]):
    gc.collect()
    libc.malloc_trim(0)  # hand back what the last run left in the heap, or this run would reuse it unseen
    t0 = time.perf_counter()
    with PeakAnon() as memory:
        train(c)
    print(json.dumps({"peak_bytes": memory.peak - memory.base, "seconds": time.perf_counter() - t0}), flush=True)
"""


def hf_config(shape: em.Shape) -> dict:
    return {"hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
            "head_dim": shape.head_dim or shape.hidden // shape.heads, "tie_word_embeddings": shape.tied}


def save_checkpoint(shape: em.Shape, folder: Path) -> Path:
    """A random-init fp32 checkpoint of `shape` for the NF4 runs (loading quantizes it, as in the recipes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**hf_config(shape))).save_pretrained(folder)
    return folder


def measure(runs: list[dict], workdir: Path) -> list[dict]:
    """Peak anonymous bytes of two CPU training steps for each run ({shape, method, batch_size, seq_len,
    gradient_checkpointing, lora_r, lora_dropout}), all in one child process (one set of imports); each run's result
    dict gains measured_bytes, estimated_bytes (estimate(..., device='cpu')['total']) and seconds."""
    configs = []
    for run in runs:
        c = {"method": run["method"], "config": hf_config(run["shape"]), "batch_size": run["batch_size"],
             "seq_len": run["seq_len"], "gradient_checkpointing": run.get("gradient_checkpointing", False),
             "lora_r": run.get("lora_r", 64), "lora_dropout": run.get("lora_dropout", 0.05)}
        if run["method"] == "qlora":
            folder = workdir / f"checkpoint-{run['shape'].name}"
            if not (folder / "config.json").is_file():
                save_checkpoint(run["shape"], folder)
            c["checkpoint"] = str(folder)
        if run["method"] == "int4-lora":  # the tiny Llama quantized once by common.gptq (cached)
            if run["shape"].name != "tiny":
                raise ValueError("int4-lora is measured on the tiny Llama only (its GPTQ checkpoint is cached)")
            from common.gptq import materialize_tiny_gptq

            c["checkpoint"] = str(materialize_tiny_gptq())
        configs.append(c)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(REPO), json.dumps(configs)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    results = []
    for run, line in zip(runs, [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]):
        measured = json.loads(line)
        options = {k: run[k] for k in ("batch_size", "seq_len", "gradient_checkpointing", "lora_r", "lora_dropout")
                   if k in run}
        estimated = em.estimate(run["shape"], run["method"], grad_accum=1, device="cpu", **options)["total"]
        results.append({**run, "measured_bytes": measured["peak_bytes"], "estimated_bytes": estimated,
                        "seconds": measured["seconds"]})
    return results


MID = em.Shape("mid", 512, 1536, 8, 8, 4, 8192)  # 33.6M parameters, grouped-query attention
WIDE = em.Shape("wide", 768, 2048, 4, 12, 4, 4096)  # 31.4M parameters, most of them in the layers
BIG_VOCAB = em.Shape("vocab32k", 384, 1024, 6, 6, 6, 32000)  # 35.2M parameters, two thirds of them embeddings
METHODS = (("full", {}), ("full", {"gradient_checkpointing": True}), ("lora", {"lora_dropout": 0.0}),
           ("lora", {"lora_dropout": 0.05}), ("lora", {"lora_dropout": 0.05, "gradient_checkpointing": True}),
           ("qlora", {"lora_dropout": 0.05}), ("qlora", {"lora_dropout": 0.0, "gradient_checkpointing": True}))


def default_runs() -> list[list[dict]]:
    """The configurations of --measure, one list per child process (a shape and a micro-batch)."""
    tiny = em.load_shape("tiny")
    groups = []
    for shape, tokens in ((tiny, (1, 256)), (tiny, (4, 512)), (MID, (1, 256)), (MID, (4, 512)), (WIDE, (1, 256)),
                          (BIG_VOCAB, (4, 512))):
        methods = METHODS + ((("int4-lora", {"lora_dropout": 0.05}),
                              ("int4-lora", {"lora_dropout": 0.05, "gradient_checkpointing": True}))
                             if shape is tiny else ())
        groups.append([{"shape": shape, "method": method, "batch_size": tokens[0], "seq_len": tokens[1], **extra}
                       for method, extra in methods])
    return groups


MEASURED_HEADER = ("| model | params | method | tokens | checkpointing | measured | estimated | est/meas |\n"
                   "|---|---:|---|---|---|---:|---:|---:|")


def print_measured(results: list[dict]):
    for r in results:
        method = r["method"] if r["method"] == "full" else f"{r['method']}, dropout {r.get('lora_dropout', 0.05)}"
        print(f"| {r['shape'].name} | {r['shape'].params / 1e6:.1f}M | {method} | {r['batch_size']} x {r['seq_len']} | "
              f"{'on' if r.get('gradient_checkpointing') else 'off'} | {r['measured_bytes'] / 1e6:,.0f} MB | "
              f"{r['estimated_bytes'] / 1e6:,.0f} MB | {r['estimated_bytes'] / r['measured_bytes']:.2f} |", flush=True)


RECIPES = (("sft|cls/qlora (NF4 + double quant)", {"method": "qlora"}),
           ("sft|cls/peft-int4 (GPTQ 4-bit, group 128)", {"method": "int4-lora"}),
           ("*/full-ft-deepspeed-offload, ZeRO-2", {"method": "full", "zero_stage": 2, "offload": "optimizer"}),
           ("*/full-ft-deepspeed-offload, ZeRO-3 + --offload_params",
            {"method": "full", "zero_stage": 3, "offload": "optimizer+params"}))


def print_recipes(batch: int, seq: int, gpus: int, lora_r: int):
    print(f"GPU memory per GPU, estimated by tools/estimate_memory.py: micro-batch {batch} x {seq} tokens, "
          f"{gpus} GPU(s), bf16, activation checkpointing, LoRA r={lora_r}")
    print(f"{'model':<6}{'recipe':<56}{'params':>8}{'weights':>9}{'train':>8}{'activ.':>8}{'GPU total':>11}"
          f"{'host RAM':>10}")
    for name in ("7B", "13B", "65B"):
        for recipe, options in RECIPES:
            r = em.estimate(em.SHAPES[name], seq_len=seq, batch_size=batch, gpus=gpus, lora_r=lora_r, **options)
            train = r["gradients"] + r["optimizer"]
            print(f"{name:<6}{recipe:<56}{r['params'] / 1e9:>7.1f}B{r['weights'] / em.GB:>8.1f}G{train / em.GB:>7.1f}G"
                  f"{r['activations'] / em.GB:>7.1f}G{r['total'] / em.GB:>10.1f}G{r['host'] / em.GB:>9.0f}G")
    print("weights: base and adapters | train: gradients + optimizer states on the GPU | host RAM: offloaded states + "
          "the bf16 checkpoint while loading")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1, help="micro-batch per GPU")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of one node (the ZeRO partitions divide by it)")
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--measure", action="store_true", help="CPU: measured against estimated, for default_runs()")
    a = p.parse_args()
    if not a.measure:
        return print_recipes(a.batch, a.seq, a.gpus, a.lora_r)
    import logging

    logging.disable(logging.WARNING)  # DeepSpeed's accelerator notice (gptqmodel imports it) on a machine without a GPU
    print(MEASURED_HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for runs in default_runs():
            print_measured(measure(runs, Path(tmp)))


if __name__ == "__main__":
    main()
