"""Megatron-style tensor parallelism for Llama-family models with PyTorch's DTensor plans (`parallelize_module`):
q, k, v, gate and up split by output columns (each rank computes its own attention heads and its slice of the MLP),
o and down by input rows, the embedding by vocabulary; between them the residual stream and the RMSNorms are split
along the sequence (sequence parallel), all-gathered before attention and the MLP and reduce-scattered after. Used
by pretrain/fsdp (the whole model) and sft/full-ft-pipeline (a stage), then sharded over dp with FSDP2 on the same
device mesh."""
from common.config import UserError


def apply_tensor_parallel(root, layers, tp_mesh, config, embed: str = "", norm: str = "", head: str = "",
                          head_input_sharded: bool = True):
    """Split `layers` (Llama decoder layers) and, by their names in `root`, the embedding, the final norm and the LM
    head over tp_mesh. The LM head's logits come back whole on every rank; its input is the sequence-sharded stream
    (head_input_sharded) or whole rows (a pipeline stage gathers the stream before picking trained positions)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    if config.num_key_value_heads % tp or config.num_attention_heads % tp:
        raise UserError(f"--tp={tp}: the model's {config.num_attention_heads} attention heads and "
                        f"{config.num_key_value_heads} key/value heads must both divide evenly over the ranks")
    ends = {}
    if embed:
        ends[embed] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if norm:
        ends[norm] = SequenceParallel()
    if head:
        head_input = Shard(1) if head_input_sharded else Replicate()
        ends[head] = ColwiseParallel(input_layouts=head_input, output_layouts=Replicate())
    if ends:
        parallelize_module(root, tp_mesh, ends)
    gathered = {"hidden_states": Replicate()}
    for layer in layers:
        parallelize_module(layer, tp_mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts=gathered),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
