"""Pipeline parallelism for Llama-family causal LMs (torch.distributed.pipelining + FSDP2), as plain functions and
one module: where the stages split the decoder layers (balanced by parameters, or given), a stage built on the meta
device that reads only its own tensors from the checkpoint's safetensors, gradient clipping by the whole model's
norm, and one consolidated Hugging Face checkpoint written without any process holding the whole model."""
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from common.checkpoint import cast_floating, move_dir_into_place
from common.config import UserError
from common.losses import trained_token_loss_sum
from common.model import read_safetensors_subset
from common.tensor_parallel import apply_tensor_parallel


def hf_llama_name(stage_name: str) -> str:
    """A pipeline stage's parameter name in a Llama-family Hugging Face checkpoint: the stage holds the inner
    model's modules (embed_tokens, layers.<global index>, norm) and the LM head: layers.12.mlp.up_proj.weight ->
    model.layers.12.mlp.up_proj.weight, lm_head.weight -> lm_head.weight."""
    return stage_name if stage_name.startswith("lm_head.") else f"model.{stage_name}"


def save_pipeline_final(final_dir: Path, stage_model, skeleton, tokenizer, dtype: torch.dtype, stage_index: int,
                        pp: int, writer: bool) -> Path:
    """One Hugging Face checkpoint from pipeline stages, with no process holding the whole model: each stage's
    weights are gathered over its data-parallel (and tensor-parallel) ranks one tensor at a time onto the CPU, in the
    training dtype; one rank of the stage (writer) writes them as one safetensors shard
    (model-0000k-of-0000n.safetensors; model.safetensors for one stage); rank 0 adds the index, config.json,
    tokenizer and generation_config.json and renames the folder into place, so a crash leaves an older final/ as it
    was. Every rank calls it; the folder must be on a file system all ranks share."""
    from safetensors.torch import save_file

    from common.inference import save_generation_config
    from common.runtime import save_timeout, wait_for_all

    final_dir = Path(final_dir)
    tmp = final_dir.parent / f".{final_dir.name}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tied = skeleton.config.tie_word_embeddings  # one tensor, saved once under the embedding's name, as HF does
    state = {}
    for name, tensor in stage_model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # a collective over dp (and tp)
        state[hf_llama_name(name)] = full.detach().to("cpu")
    state = cast_floating(state, dtype)
    file_name = "model.safetensors" if pp == 1 else f"model-{stage_index + 1:05d}-of-{pp:05d}.safetensors"
    size = sum(t.numel() * t.element_size() for t in state.values())
    if writer:
        save_file(state, str(tmp / file_name), metadata={"format": "pt"})
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, (file_name, sorted(state), size))
    wait_for_all(save_timeout(size))  # every stage's shard written (NCCL's own limit is 10 minutes)
    if dist.get_rank() == 0:
        files = {file: (names, size) for file, names, size in shards}  # ranks of one stage: the same entry
        if pp > 1:
            weight_map = {name: file for file, (names, _) in sorted(files.items()) for name in names}
            total = sum(size for _, size in files.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        skeleton.config.dtype = dtype  # skeleton: the whole model on the meta device, for its two configs
        skeleton.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_generation_config(tmp, skeleton, tokenizer)
        move_dir_into_place(tmp, final_dir)
    dist.barrier()
    return final_dir


def clip_grad_norm_across_stages(stage_model, max_norm: float, pp_group) -> torch.Tensor:
    """Clip a pipeline stage's gradient by the norm of the whole model's: each stage's norm (over its FSDP shards),
    squared, summed over the stages, square-rooted; every stage then scales by the same factor, as one process
    holding the whole model would. Returns the norm before clipping."""
    params = [p for p in stage_model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    squared = norm.double() ** 2
    dist.all_reduce(squared, group=pp_group)
    total = squared.sqrt().to(norm.dtype)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def pipeline_stage_layers(n_layers: int, pp: int, layer_params: int, first_params: int, last_params: int,
                          explicit: str = "") -> list[tuple[int, int]]:
    """Decoder layers [start, stop) of each of pp pipeline stages. explicit: layers per stage, '10,10,12'. Otherwise
    balanced by parameters: the first stage also holds the input embedding (first_params), the last the final norm
    and the LM head (last_params); the split with the smallest largest stage, every stage at least one layer."""
    if explicit:
        try:
            counts = [int(part) for part in explicit.split(",")]
        except ValueError:
            counts = []
        if len(counts) != pp or min(counts, default=0) < 1 or sum(counts) != n_layers:
            raise UserError(f"--stage_layers={explicit}: expected {pp} whole numbers of at least 1 (one per stage, "
                            f"--pp={pp}) adding up to the model's {n_layers} layers")
    else:
        if not 1 <= pp <= n_layers:
            raise UserError(f"--pp={pp}: expected 1 to {n_layers} stages (the model has {n_layers} decoder layers; "
                            "each stage holds at least one)")
        counts = balanced_layer_counts(n_layers, pp, layer_params, first_params, last_params)
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def balanced_layer_counts(n_layers: int, pp: int, layer_params: int, first_params: int, last_params: int) -> list[int]:
    """Layers per stage minimising the largest stage's parameters (dynamic programming over where each stage ends)."""
    def size(stage: int, count: int) -> int:
        extra = (first_params if stage == 0 else 0) + (last_params if stage == pp - 1 else 0)
        return count * layer_params + extra

    # best[s][n]: (largest stage, counts) for the first n layers in s + 1 stages
    best = [{n: (size(0, n), [n]) for n in range(1, n_layers - pp + 2)}]
    for stage in range(1, pp):
        row = {}
        for n in range(stage + 1, n_layers - (pp - 1 - stage) + 1):
            options = [(max(best[-1][n - c][0], size(stage, c)), best[-1][n - c][1] + [c])
                       for c in range(1, n - stage + 1) if n - c in best[-1]]
            row[n] = min(options, key=lambda option: option[0])
        best.append(row)
    return best[-1][n_layers][1]


class StageModel(torch.nn.Module):
    """One pipeline stage of a Llama-family causal LM: the input embedding (first stage), decoder layers
    [start, stop) named by their global index (so checkpoint names never clash between stages), the final norm and
    LM head (last stage). Every stage gets the batch's attention mask and position ids and builds the same causal
    mask as the whole model would; the last stage also gets the labels and returns the summed loss of its
    micro-batch's trained tokens (the LM head runs on those positions only), not logits."""

    def __init__(self, model, start: int, stop: int, first: bool, last: bool):
        super().__init__()
        inner = model.model
        self.config = model.config
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = torch.nn.ModuleDict({str(i): inner.layers[i] for i in range(start, stop)})
        self.norm = inner.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.rotary_emb = inner.rotary_emb

    def forward(self, x, attention_mask, position_ids, labels=None):
        from transformers.masking_utils import create_causal_mask

        hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
        # the mask is sized from the whole rows: under tensor parallelism hidden holds this rank's part of them
        rows = hidden.new_empty(*attention_mask.shape, 1)
        mask = create_causal_mask(config=self.config, inputs_embeds=rows, attention_mask=attention_mask, cache=None,
                                  position_ids=position_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers.values():
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids)
        if self.norm is None:
            return hidden
        hidden = self.norm(hidden)
        hidden = hidden.full_tensor() if hasattr(hidden, "full_tensor") else hidden  # tp: the whole rows again
        return trained_token_loss_sum(hidden, self.lm_head, labels)


def build_pipeline_stage(model_dir: Path, pp: int, stage: int, dp_mesh, dtype: torch.dtype, device: torch.device,
                         attn: str, checkpointing: bool, stage_layers: str = "", tp_mesh=None):
    """This process's stage of a Llama-family checkpoint: the whole model's skeleton on the meta device (no memory),
    this stage's modules kept, split over tp_mesh (tensor parallel, when given), each decoder layer and the stage
    sharded over dp_mesh with FSDP2 (fp32 masters, compute in dtype), then only this stage's tensors read from the
    safetensors files. Returns (stage_model, skeleton, every stage's layer bounds)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    if pp > 1 and config.tie_word_embeddings:
        raise UserError(f"--pp={pp}: {model_dir} ties its LM head to its input embedding (tie_word_embeddings), "
                        "which cannot be split over stages here; use --pp=1 or sft/full-ft-deepspeed-offload")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    if checkpointing:
        skeleton.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer_params = sum(p.numel() for p in skeleton.model.layers[0].parameters())
    embed_params = skeleton.model.embed_tokens.weight.numel()
    head_params = skeleton.lm_head.weight.numel() + skeleton.model.norm.weight.numel()
    bounds = pipeline_stage_layers(config.num_hidden_layers, pp, layer_params, embed_params, head_params,
                                   stage_layers)
    first, last = stage == 0, stage == pp - 1
    stage_model = StageModel(skeleton, *bounds[stage], first, last)
    if tp_mesh is not None and tp_mesh.size() > 1:  # the last stage's head sees whole rows: the norm's output gathered
        embed, norm, head = ("embed_tokens" if first else ""), ("norm" if last else ""), ("lm_head" if last else "")
        apply_tensor_parallel(stage_model, stage_model.layers.values(), tp_mesh, config, embed, norm, head,
                              head_input_sharded=False)
    mixed = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in stage_model.layers.values():
        fully_shard(layer, mesh=dp_mesh, mp_policy=mixed)
    fully_shard(stage_model, mesh=dp_mesh, mp_policy=mixed)
    stage_model.to_empty(device=device)
    # the rotary embedding's inverse frequencies are a non-persistent buffer: to_empty left it uninitialised
    stage_model.rotary_emb = type(skeleton.model.rotary_emb)(config=config).to(device)
    names = list(stage_model.state_dict())
    stored = {name: hf_llama_name(name) for name in names}
    if config.tie_word_embeddings:  # one stage holds both ends; the checkpoint has the embedding only
        stored["lm_head.weight"] = "model.embed_tokens.weight"
    weights = read_safetensors_subset(model_dir, sorted(set(stored.values())))
    weights = {name: weights[stored[name]] for name in names}
    set_model_state_dict(stage_model, weights, options=StateDictOptions(full_state_dict=True))
    return stage_model, skeleton, bounds
