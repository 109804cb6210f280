"""GPU memory each recipe needs for Llama 7B, 13B and 65B: a worked estimate from the model's shapes, printed as a
table (the README's recipe table quotes it). Estimates, not measurements: they leave out fragmentation and assume
bf16 compute with activation checkpointing, sdpa attention and the recipes' defaults (LoRA r=64 on every projection,
fp32 adapters with 8-bit paged AdamW; full fine-tunes under ZeRO with the optimizer offloaded to CPU).

    python bench/memory_estimate.py                       # micro-batch 1 x 1024 tokens, one GPU
    python bench/memory_estimate.py --batch=4 --seq=2048 --gpus=8

Model states of the DeepSpeed recipes come from DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs);
activations are the checkpointed hidden states of every layer, one layer's working set during its recomputation
(about 34 x batch x seq x hidden bytes in bf16, Korthikanti et al. 2022, without the attention-score term sdpa avoids)
and the logits with their fp32 copy and gradient.
"""
import argparse
from dataclasses import dataclass

GB = 1e9
CUDA_CONTEXT = 0.8 * GB  # CUDA context, cuBLAS workspaces and allocator slack


@dataclass
class Llama:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of the 7 linear projections of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.projections())

    @property
    def embedding_params(self) -> int:  # input embeddings and the untied LM head
        return 2 * self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + (2 * self.layers + 1) * self.hidden

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.projections())

    def largest_layer_params(self) -> int:
        return max(self.vocab * self.hidden, sum(a * b for a, b in self.projections()))


MODELS = [Llama("7B", 4096, 11008, 32, 32, 32), Llama("13B", 5120, 13824, 40, 40, 40),
          Llama("65B", 8192, 22016, 80, 64, 64)]


def activations(m: Llama, batch: int, seq: int) -> float:
    tokens = batch * seq
    checkpoints = m.layers * tokens * m.hidden * 2
    one_layer = 34 * tokens * m.hidden
    logits = tokens * m.vocab * (2 + 4 + 4)  # bf16 logits, their fp32 copy for the loss, the gradient
    return checkpoints + one_layer + logits


def four_bit_lora(m: Llama, bits_per_weight: float, r: int, batch: int, seq: int) -> dict:
    weights = m.linear_params * bits_per_weight / 8 + m.embedding_params * 2  # embeddings and head stay bf16
    adapters = m.lora_params(r) * (4 + 4 + 2)  # fp32 weights and gradients, 8-bit Adam's two states
    return {"weights": weights, "train": adapters, "act": activations(m, batch, seq), "host": 0.0}


def full_ft(m: Llama, stage: int, offload_params: bool, gpus: int, batch: int, seq: int) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 2:
        host, gpu = estimate_zero2_model_states_mem_needs(m.params, gpus, 1, cpu_offload=True)
    else:
        host, gpu, _ = estimate_zero3_model_states_mem_needs(m.params, m.largest_layer_params(), gpus, 1,
                                                             cpu_offload=True, cpu_offload_params=offload_params)
    buckets = 2 * 2e8 * 2  # ds_config.json: reduce and allgather buckets of 2e8 bf16 elements
    return {"weights": gpu, "train": buckets, "act": activations(m, batch, seq), "host": host}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1, help="micro-batch per GPU")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of one node (the ZeRO partitions divide by it)")
    p.add_argument("--lora_r", type=int, default=64)
    a = p.parse_args()
    import logging
    logging.disable(logging.WARNING)  # DeepSpeed's accelerator notice on a machine without a GPU

    rows = []
    for m in MODELS:
        rows.append((m, "sft|cls/qlora (NF4 + double quant)", four_bit_lora(m, 4.127, a.lora_r, a.batch, a.seq)))
        rows.append((m, "sft|cls/peft-int4 (GPTQ 4-bit, group 128)", four_bit_lora(m, 4.156, a.lora_r, a.batch, a.seq)))
        rows.append((m, "*/full-ft-deepspeed-offload, ZeRO-2", full_ft(m, 2, False, a.gpus, a.batch, a.seq)))
        rows.append((m, "*/full-ft-deepspeed-offload, ZeRO-3 + --offload_params",
                     full_ft(m, 3, True, a.gpus, a.batch, a.seq)))
    print(f"GPU memory per GPU, estimated: micro-batch {a.batch} x {a.seq} tokens, {a.gpus} GPU(s), bf16, activation "
          f"checkpointing, LoRA r={a.lora_r}")
    print(f"{'model':<6}{'recipe':<56}{'params':>8}{'weights':>9}{'train':>8}{'activ.':>8}{'GPU total':>11}"
          f"{'host RAM':>10}")
    for m, recipe, r in rows:
        total = r["weights"] + r["train"] + r["act"] + CUDA_CONTEXT
        print(f"{m.name:<6}{recipe:<56}{m.params / 1e9:>7.1f}B{r['weights'] / GB:>8.1f}G{r['train'] / GB:>7.1f}G"
              f"{r['act'] / GB:>7.1f}G{total / GB:>10.1f}G{r['host'] / GB:>9.0f}G")
    print("weights: base (4-bit) or DeepSpeed's model states on the GPU | train: adapters + optimizer states, or ZeRO "
          "buckets | host RAM: DeepSpeed's estimate for the offloaded optimizer (x1.5 buffer)")


if __name__ == "__main__":
    main()
