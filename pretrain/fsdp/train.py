"""Pretraining a Llama-family model with PyTorch FSDP2 (`fully_shard`) under torchrun: every decoder layer and the
root sharded over the ranks, bf16 compute with fp32 gradient reduction on GPU, activation checkpointing, packed
windows streamed from jsonl.zst shards or a pre-tokenized token file.

Default run, no GPU, no download (tiny config, random init, the bundled English/Chinese corpus), about a minute:
    cd pretrain/fsdp && bash run.sh
A 1B model from scratch on 8 GPUs, on a token file (data_scripts/shard_corpus.py -> train_tokenizer.py ->
pretokenize.py):
    NGPU=8 bash run.sh --model_config=1b --tokenizer_path=/tok --data_path=/data/tokens.bin --seq_len=2048 \
        --batch_size=8
Continue pretraining a checkpoint (a grown tokenizer resizes the embeddings, new rows at the mean):
    NGPU=8 bash run.sh --init_from=/models/Llama-2-7b-hf --tokenizer_path=/tok-merged --data_path=/data/zh
Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 NGPU=8 bash run.sh ...   Writes output_dir/: final/
(config.json, model.safetensors, tokenizer), config.json, metrics.jsonl (loss, lr, grad_norm, tok/s, tok/s/gpu,
MFU), loss.png, checkpoints/ (torch.distributed.checkpoint, sharded). Rank 0 builds the initial weights on CPU once
(fp32: 4 bytes x parameters of host RAM) and broadcasts them into the other ranks' shards.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from common.checkpoint import (
    atomic_write_dir,
    cast_floating,
    latest_checkpoint,
    load_dcp_checkpoint,
    prepare_output_dir,
    resume_checkpoint,
    save_dcp_checkpoint,
)
from common.config import UserError, config_to_dict, exit_on_user_error, parse_config
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import count_trained_tokens, is_finite, non_finite_error, token_loss_sum
from common.model import (
    grow_vocabulary,
    load_tokenizer,
    pretrain_model_config,
    pretrain_tokenizer_dir,
    resolve_attention,
    resolve_model_path,
)
from common.optim import warmup_cosine, weight_decay_groups
from common.pretrain_data import eval_batches, flops_per_token, open_token_source, packed_loader, peak_tflops
from common.runtime import (
    all_reduce_sum,
    catch_stop_signals,
    cleanup,
    save_timeout,
    set_single_process_env,
    setup_runtime,
    stop_requested,
    training_precision,
    wait_for_all,
)
from common.tensor_parallel import apply_tensor_parallel

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Config:
    # model
    model_config: str = "tiny"  # tiny, 1b, 7b, 65b (common/model_configs) or a config.json path: random init
    init_from: str = ""  # a Hugging Face checkpoint folder to continue pretraining (model_config is then ignored)
    tokenizer_path: str = "tiny"  # a tokenizer folder; 'tiny': the tiny Llama's; '' with init_from: its own
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # auto: FA2 on GPU if installed
    gradient_checkpointing: bool | None = None  # recompute activations in backward; None: on with a GPU
    reshard_after_forward: bool = True  # free gathered weights after each layer's forward (ZeRO-3-like); off: ZeRO-2
    tp: int = 1  # tensor-parallel ranks per model replica (heads and MLP columns split); processes = dp x tp
    # data
    data_path: str = str(REPO / "data" / "pretrain" / "shards")  # shards folder / manifest / .jsonl(.zst), tokens.bin
    eval_data_path: str = ""  # held-out shards or token file; '' for none
    text_field: str = "text"  # record field holding a document
    seq_len: int = 256  # tokens per packed window
    document_mask: bool = False  # documents packed in one window do not attend to each other
    num_workers: int = 1  # loader processes tokenizing ahead, per rank (0: in the training process)
    # optimization
    max_steps: int = 120  # optimizer steps
    batch_size: int = 8  # windows per micro-batch per GPU
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate (tiny model; 7B-65B: 1.5e-4 to 3e-4)
    weight_decay: float = 0.1  # AdamW decay on matrices (not norms)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW beta1,beta2 (Llama paper)
    warmup_steps: int = 10  # linear warmup, then cosine decay to 10%
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 42  # seeds init and the token-file order
    peak_tflops: float = 0.0  # GPU peak for MFU; 0: looked up from the device name (none on CPU)
    # output, logging, checkpoints
    output_dir: str = "./out"  # everything this run writes
    log_every: int = 10  # steps between step-log lines
    eval_every: int = 0  # steps between evals (with eval_data_path); 0: before training and at the end only
    eval_batches: int = 8  # micro-batches per rank in an eval
    save_every: int = 0  # steps between checkpoints for --resume; 0: none
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # replace an earlier, different run in output_dir (else refused)
    on_nan: Literal["stop", "skip"] = "stop"  # a nan/inf loss or gradient: stop before updating, or skip the step
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow or none


def initial_weights(cfg: Config, config, tokenizer) -> tuple[dict, int]:
    """Rank 0's full fp32 state dict to start from (random init or the checkpoint), and the token rows added."""
    from transformers import AutoModelForCausalLM

    if cfg.init_from:
        path = resolve_model_path(cfg.init_from, option="init_from")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                     trust_remote_code=False)
        added = grow_vocabulary(model, len(tokenizer))
    else:
        model, added = AutoModelForCausalLM.from_config(config, dtype=torch.float32), 0
    return model.state_dict(), added


def save_final(final_dir: Path, model, full_state: dict, tokenizer, dtype: torch.dtype, architecture: str):
    """Rank 0: the gathered weights in the training dtype (not the fp32 masters) and the tokenizer, as one Hugging
    Face checkpoint written atomically."""
    def write(directory: Path):
        model.save_pretrained(directory, state_dict=cast_floating(full_state, dtype))
        saved = json.loads((directory / "config.json").read_text())  # fully_shard renamed the class: FSDPLlama...
        record = {**saved, "architectures": [architecture], "dtype": str(dtype).removeprefix("torch.")}
        (directory / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        tokenizer.save_pretrained(directory)

    atomic_write_dir(final_dir, write)


def main(cfg: Config) -> dict:
    # ---- setup: a process group even for one process (fully_shard needs a device mesh), seed, device, threads
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    if len(cfg.adam_betas) != 2:
        raise UserError(f"--adam_betas: expected two numbers beta1,beta2, got {cfg.adam_betas}")
    quiet_third_party_logs()
    set_single_process_env()
    rt = setup_runtime(cfg.seed)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")
    if cfg.tp < 1 or rt.world_size % cfg.tp:
        raise UserError(f"--tp={cfg.tp}: expected 1 or more, and the {rt.world_size} process(es) must be a whole "
                        "multiple of it (dp x tp)")
    if cfg.seq_len % cfg.tp:
        raise UserError(f"--seq_len={cfg.seq_len}: must divide evenly over --tp={cfg.tp} ranks (sequence parallel)")
    # ranks (dp, tp): the tp ranks of a replica are neighbours (one node's fast links), FSDP2 shards over dp
    dp = rt.world_size // cfg.tp
    mesh = init_device_mesh(rt.device.type, (dp, cfg.tp), mesh_dim_names=("dp", "tp"))
    dp_rank, dp_group = mesh.get_local_rank("dp"), mesh["dp"].get_group()
    out = Path(cfg.output_dir)
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, cfg.max_steps, cfg.report_to, enabled=rt.is_main, config=config_to_dict(cfg))
    compute = training_precision(rt.device, "none")  # bf16; fp32 below compute capability 8.0 (no scaler)
    dtype = compute.dtype

    # ---- tokenizer and data: packed windows, each rank x loader worker reading its own slot of the corpus
    tokenizer_dir = pretrain_tokenizer_dir(cfg.tokenizer_path, cfg.init_from)
    tokenizer = load_tokenizer(tokenizer_dir)
    train_source = open_token_source(cfg.data_path, tokenizer, cfg.text_field)
    eval_source = open_token_source(cfg.eval_data_path, tokenizer, cfg.text_field) if cfg.eval_data_path else None
    attn = resolve_attention(cfg.attn_implementation, rt.device)
    # documents kept apart: flash-attention 2 by their restarting position ids alone, sdpa with a block mask too
    mask_mode = ("positions" if attn == "flash_attention_2" else "sdpa") if cfg.document_mask else "none"

    # ---- model: built on the meta device (no memory), each decoder layer then the root sharded with fully_shard,
    # storage allocated for this rank's shards only, and rank 0's initial weights broadcast into them
    config = pretrain_model_config(cfg.model_config, cfg.init_from, tokenizer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    architecture = type(model).__name__
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else rt.device.type == "cuda"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.tp > 1:  # attention heads and MLP columns split over the tp ranks, norms sequence-parallel
        apply_tensor_parallel(model, model.model.layers, mesh["tp"], config, "model.embed_tokens", "model.norm",
                              "lm_head")
    # bf16 weights for compute, fp32 for the gradient reduce-scatter and the optimizer's master copy
    precision = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"], mp_policy=precision, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh["dp"], mp_policy=precision, reshard_after_forward=cfg.reshard_after_forward)
    model.to_empty(device=rt.device)
    # the rotary embedding's inverse frequencies are a non-persistent buffer: to_empty left it uninitialised
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(rt.device)
    full_state, added_rows = initial_weights(cfg, config, tokenizer) if rt.is_main else ({}, 0)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    n_params = sum(p.numel() for p in model.parameters())  # DTensors report their full size
    flops_token = flops_per_token(config, cfg.seq_len)
    peak = peak_tflops(rt.device, cfg.peak_tflops)

    # ---- optimizer (torch AdamW over the sharded fp32 parameters, fused on GPU) and schedule
    optimizer = torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.adam_betas), fused=rt.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.max_steps, cfg.warmup_steps))
    start_step = 0
    if cfg.resume:
        ckpt = resume_checkpoint(out)  # rank 0's latest, on every rank
        if ckpt is None:
            log.info(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
        else:
            start_step = load_dcp_checkpoint(ckpt, model, optimizer, scheduler)  # weights, optimizer, schedule, RNG
            log.info(f"resumed from {ckpt} at step {start_step}")

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * dp
    origin = f"from {cfg.init_from}" if cfg.init_from else "random init"
    grown = f", {added_rows} new token rows at the mean embedding" if added_rows else ""
    masked = ", documents masked from each other" if cfg.document_mask else ""
    log.info(f"model    {cfg.init_from or cfg.model_config}: {n_params:,} params ({origin}{grown}) | {attn} attention, "
             f"{compute.reason} | activation checkpointing {'on' if checkpointing else 'off'} | "
             f"{flops_token / 1e6:,.1f} MFLOPs/token")
    log.info(f"fsdp     fully_shard on {len(model.model.layers)} layers + root over {dp} rank(s) x tensor parallel "
             f"{cfg.tp} = {rt.world_size} process(es), "
             f"reshard after forward {'on' if cfg.reshard_after_forward else 'off'} | {type(optimizer).__name__}")
    log.info(f"data     train {cfg.data_path}: {train_source.describe()} | tokenizer {tokenizer_dir} "
             f"({len(tokenizer):,} tokens) | windows of {cfg.seq_len}{masked} | {cfg.num_workers} loader worker(s)")
    log.info(f"steps    {cfg.max_steps} x {tokens_per_step:,} tokens (batch {cfg.batch_size} x accum {cfg.grad_accum} "
             f"x {dp} ranks), lr {cfg.lr:g} warmup {cfg.warmup_steps} | device {rt.describe()}")

    def evaluate() -> float:
        """Mean loss per predicted token over eval_batches micro-batches per rank (every rank runs as many
        forwards, as the sharded weights need: a short eval set wraps around)."""
        model.eval()
        loss_sum = n_tokens = 0.0
        batches = eval_batches(eval_source, cfg.seq_len, cfg.batch_size, dp_rank, dp, cfg.seed,
                               cfg.eval_batches, mask_mode)
        with torch.no_grad():
            for batch, counted in batches:  # uncounted: a rank with no eval document still joins every forward
                n_tokens += count_trained_tokens(batch["labels"]) if counted else 0  # FA2 rows joined: not numel
                batch = {k: v.to(rt.device) for k, v in batch.items()}
                labels = batch.pop("labels")
                loss = token_loss_sum(model(**batch, use_cache=False).logits, labels)
                loss_sum += loss.double() if counted else 0.0  # on the device, read once below
        model.train()
        loss_sum = float(loss_sum)  # the eval's one read of the device losses
        loss_sum, n_tokens = all_reduce_sum([loss_sum, n_tokens], rt, group=dp_group)  # tp ranks: the same
        return loss_sum / n_tokens

    # ---- training loop
    # endless batches, the first start_step * grad_accum skipped by the loader itself (each worker past its share)
    batches = packed_loader(train_source, cfg.seq_len, cfg.batch_size, dp_rank, dp, cfg.num_workers,
                            cfg.seed, mask_mode, start_batch=start_step * cfg.grad_accum)
    model.train()
    if eval_source and start_step == 0:
        log.log(0, {"eval_loss": evaluate()})
    train_seconds, losses = 0.0, []
    predicted_per_step = cfg.batch_size * (cfg.seq_len - 1) * cfg.grad_accum * dp
    stop, preempted, path = catch_stop_signals(), False, None  # SIGTERM / Ctrl-C: checkpoint, then exit
    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for i in range(cfg.grad_accum):
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in next(batches).items()}
            labels = batch.pop("labels")
            model.set_requires_gradient_sync(i == cfg.grad_accum - 1)  # reduce-scatter once per step
            micro_loss = token_loss_sum(model(**batch, use_cache=False).logits, labels)
            # mean over every predicted token of the step on all dp ranks (the reduce-scatter averages: * dp)
            (micro_loss * dp / predicted_per_step).backward()
            loss_sum += micro_loss.detach().double()  # stays on the device: no wait per micro-batch
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        loss_sum = float(loss_sum)  # the step's one read of the device losses
        (loss_sum,) = all_reduce_sum([loss_sum], rt, group=dp_group)
        loss = loss_sum / predicted_per_step
        if not is_finite(loss, grad_norm):  # the same on every rank (summed loss, global norm): all stop or skip
            if cfg.on_nan == "stop":
                raise non_finite_error(step, loss, grad_norm, out)  # before any update: weights stay as they were
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            log.info(f"step {step}/{cfg.max_steps}: loss {loss}, gradient norm {float(grad_norm)}: "
                     "skipped (--on_nan=skip)")
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_seconds += dt
        losses.append(loss)
        log.advance()
        if step % cfg.log_every == 0 or step == cfg.max_steps or step == start_step + 1:
            per_gpu = tokens_per_step / dt / rt.world_size
            log.log(step, {"loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "tokens_per_s": tokens_per_step / dt, "tokens_per_s_per_gpu": per_gpu,
                           "mfu": per_gpu * flops_token / (peak * 1e12) if peak else None,
                           **memory_gb(rt.device)})
        if eval_source and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != cfg.max_steps:
            log.log(step, {"eval_loss": evaluate()})
        preempted = stop_requested(stop, rt)
        if (cfg.save_every > 0 and step % cfg.save_every == 0 or preempted):
            path = save_dcp_checkpoint(out, step, cfg.keep_last, model, optimizer, scheduler)
            log.info(f"saved checkpoint {path}")
        if preempted:
            log.info(f"stopped by {stop.signal or 'a signal to another rank'} after step {step}: checkpoint "
                     f"{path or latest_checkpoint(out)}; continue with --resume")
            break

    stop.restore()
    if preempted:
        log.close()
        cleanup(rt)
        return {"preempted": True, "losses": losses, "steps": step - start_step}

    # ---- save: the full weights gathered to rank 0 (on CPU) as one Hugging Face checkpoint; final eval
    final_dir = out / "final"
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rt.is_main:
        save_final(final_dir, model, full, tokenizer, dtype, architecture)
    del full
    wait_for_all(save_timeout(n_params * dtype.itemsize))  # rank 0 wrote it; NCCL's own limit is 10 minutes
    eval_loss = None
    if eval_source:
        eval_loss = evaluate()
        log.log(cfg.max_steps, {"eval_loss": eval_loss})
    steps_run = cfg.max_steps - start_step
    tokens_per_s = steps_run * tokens_per_step / max(train_seconds, 1e-9)
    log.info(f"done: {steps_run} steps in {train_seconds:.1f}s, {tokens_per_s:,.0f} tok/s, "
             f"peak mem {peak_memory_gb(rt.device):.2f} GB")
    log.info(f"model and tokenizer in {final_dir}; metrics in {out / 'metrics.jsonl'}, curve in {out / 'loss.png'}")
    log.close()
    cleanup(rt)
    return {"model": model, "tokenizer": tokenizer, "losses": losses, "eval_loss": eval_loss, "final_dir": final_dir,
            "train_seconds": train_seconds, "steps": steps_run, "flops_per_token": flops_token}


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
