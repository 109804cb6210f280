"""Preference optimization with QLoRA: a frozen 4-bit NF4 base (bitsandbytes), LoRA adapters on every linear
projection (fresh, or an SFT adapter that keeps training), trained on pairs of answers to one prompt so the chosen
answer becomes more likely than the rejected one. Losses: DPO (sigmoid), IPO, and the reference-free SimPO and ORPO.

Default run, no GPU, no download (tiny random-init Llama, bundled letter-reversal pairs: chosen the right reversal,
rejected a near miss), about a minute on 2 CPU cores: cd rlhf/dpo-qlora && bash run.sh
One GPU, a real checkpoint, from an SFT adapter (step 3 after sft/qlora and cls/reward-qlora):
    bash run.sh --model_path=/models/Llama-2-7b-hf --init_adapter=../../sft/qlora/out/final \
        --data_path=pairs.jsonl --eval_data_path=eval_pairs.jsonl --prompt_template=chat
Data-parallel on N GPUs: NGPU=N bash run.sh ...    Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 bash run.sh
Data (.jsonl, .json, .jsonl.zst): text pairs {"prompt" (or "instruction", "input"), "chosen", "rejected"} through
the Alpaca or the chat template as the sft recipes render them; conversational pairs {"chosen": [messages],
"rejected": [messages]} (HH / UltraFeedback style: the messages both share are the prompt, each goes on with one
final assistant reply) through the chat template. Only the answers carry loss; long pairs lose prompt tokens first.
--packing: a micro-batch's answers several to a row, kept apart (less padding; exact per answer, tested).
The reference costs no second model and no second forward per step: the log-likelihoods of every answer under the
starting model (the base, or base + --init_adapter) are computed once before step 1 and stored in
output_dir/reference_logps.safetensors, which --resume reads back (README.md says why). SimPO and ORPO need none.
Writes output_dir/: final/ (adapter + tokenizer: tools/merge_lora.py, generate.py and evaluate.py take it),
eval_results.json, config.json, metrics.jsonl, loss.png, tensorboard/, checkpoints/. GPU memory: sft/qlora's with
2 rows per pair (python tools/estimate_memory.py --model=7B --stage=dpo --batch_size=4 --seq_len=1024).
"""
import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from common.checkpoint import (
    atomic_write_dir,
    latest_checkpoint,
    prepare_output_dir,
    resume_adapter_training,
    save_checkpoint,
)
from common.config import UserError, config_to_dict, exit_on_user_error, parse_config, refuse_values_below
from common.data import (
    batch_stream,
    build_preference_pairs,
    length_summary,
    plan_batches,
    read_records,
    render_trained_example,
)
from common.inference import save_generation_config
from common.layer_split import describe_layer_split, layer_split_device_map
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import DEFAULT_BETA, is_finite, non_finite_error, preference_losses, reward_accuracy
from common.model import (
    add_lora,
    count_parameters,
    load_model,
    load_tokenizer,
    prepare_for_lora_training,
    resolve_model_path,
)
from common.optim import make_optimizer, resolve_lr, warmup_cosine
from common.preference import all_pair_logps, answer_tokens, pair_logps, pair_padding_efficiency, pair_tokens_computed
from common.runtime import (
    all_reduce_sum,
    catch_stop_signals,
    cleanup,
    setup_runtime,
    stop_requested,
    training_precision,
)

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "data" / "synthetic"
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class Config:
    # model
    model_path: str = "tiny"  # 'tiny' (random-init test Llama) or a local Hugging Face model folder
    init_adapter: str = ""  # an SFT LoRA folder (sft/qlora/out/final) to start from and keep training; '': fresh LoRA
    quantization: Literal["nf4", "int8", "none"] = "nf4"  # base weights: 4-bit NormalFloat, 8-bit, or as stored
    gradient_checkpointing: bool | None = None  # recompute activations in backward (less memory); None: on with a GPU
    device_map: Literal["single", "auto"] = "single"  # auto: the layers split over all visible GPUs (too big for one)
    max_memory_per_gpu: str = ""  # auto: weights cap per GPU, 22GiB (room for activations) or 10GiB,22GiB; '': all free
    lora_r: int = 16  # adapter rank (a fresh adapter; --init_adapter brings its own)
    lora_alpha: int = 32  # adapter scale is alpha / r
    lora_dropout: float = 0.0  # also for --init_adapter; 0: the policy starts exactly at the stored reference
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # or e.g. q_proj,v_proj
    # preference loss
    loss: Literal["dpo", "ipo", "simpo", "orpo"] = "dpo"  # dpo/ipo against the reference; simpo/orpo need none
    beta: float | None = None  # dpo/ipo: pull to the reference (0.1); simpo: reward scale (2.0); orpo: lambda (0.1)
    simpo_gamma: float = 0.5  # simpo: the margin the chosen answer must win by
    # data
    data_path: str = str(SAMPLE_DATA / "reverse_preference_train.jsonl")  # preference pairs (see the docstring)
    eval_data_path: str = str(SAMPLE_DATA / "reverse_preference_eval.jsonl")  # held-out pairs; '' for none
    prompt_template: Literal["alpaca", "chat"] = "alpaca"  # text pairs: the Alpaca prompt or the chat template
    max_seq_len: int = 1024  # per side; longer pairs lose prompt tokens from the left first, then answer tokens
    group_by_length: bool = True  # batch pairs of similar length together: less padding
    packing: bool = False  # a micro-batch's answers packed into rows of max_seq_len, kept apart by masks (less padding)
    inspect_data: bool = False  # data only: pairs, lengths, truncation, bad records; exit, no weights loaded
    # optimization
    epochs: float = 1.0  # passes over the training pairs (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    batch_size: int = 8  # pairs per micro-batch per GPU (2x rows go through the model)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak lr; none: 5e-6 for a real base (DPO + LoRA: 1e-6..5e-5), 2e-3 on 'tiny'
    weight_decay: float = 0.0  # AdamW decay (not on norms and biases)
    warmup_ratio: float = 0.1  # fraction of steps with linear warmup, then cosine decay to 10%
    max_grad_norm: float = 1.0  # gradient clipping
    loss_chunk: int = 0  # > 0: the LM head and log-softmax on this many tokens at a time (less memory, large vocab)
    optim: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"  # 8-bit ones need a GPU
    seed: int = 42  # seeds LoRA init and data order
    # output, logging, checkpoints
    output_dir: str = "./out"  # everything this run writes
    log_every: int = 5  # steps between step-log lines
    eval_every: int = 0  # steps between evals; 0: only before training and at the end
    save_every: int = 0  # steps between checkpoints for --resume; 0: none
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # replace an earlier, different run in output_dir (else refused)
    on_nan: Literal["stop", "skip"] = "stop"  # a nan/inf loss or gradient: stop before updating, or skip the step
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow or none


def data_lines(files: dict, tokenizer) -> list[str]:
    """The start-up block's data lines (all that --inspect_data prints): counts, lengths, one pair rendered with
    its trained part marked."""
    lines = []
    for name, (path, pairs, stats) in files.items():
        if not pairs:
            continue
        sides = [{"input_ids": p[f"{side}_ids"]} for p in pairs for side in ("chosen", "rejected")]
        lines.append(f"data     {name} {path}: {stats.summary().replace('examples', 'pairs', 1)} | "
                     f"{length_summary(sides)} per side")
    first = files["train"][1][0]
    for side in ("chosen", "rejected"):
        example = {"input_ids": first[f"{side}_ids"], "labels": first[f"{side}_labels"]}
        lines.append(f"{side:<9}{render_trained_example(example, tokenizer)}")
    return lines


def pack_len(cfg: Config) -> int:
    """The packed rows' length for common.preference (0: left-padded rows, one answer each)."""
    return cfg.max_seq_len if cfg.packing else 0


def load_or_compute_reference(model, cfg: Config, out: Path, sets: dict, pad_id: int, rt, autocast, log) -> dict:
    """The reference log-likelihoods of every set ({"train": pairs, "eval": pairs}): read back from output_dir by a
    --resume (its adapter has trained since), else computed now from the starting model and stored by rank 0."""
    from safetensors.torch import load_file, save_file

    path = out / REFERENCE_FILE
    if cfg.resume and path.is_file():
        stored = load_file(path)
        for name, pairs in sets.items():
            if tuple(stored.get(name, torch.empty(0)).shape) != (len(pairs), 2):
                raise UserError(f"{path}: holds reference log-probs of a different data set ({name}: "
                                f"{tuple(stored.get(name, torch.empty(0)).shape)}, this run has {len(pairs)} pairs); "
                                "delete it, or use --overwrite or another --output_dir")
        log.info(f"reference log-probs read from {path}")
        return stored
    t0 = time.perf_counter()
    stored = {name: all_pair_logps(model, pairs, cfg.batch_size, pad_id, rt, autocast, pack_len(cfg), cfg.loss_chunk)
              for name, pairs in sets.items()}
    if rt.is_main:
        tmp = path.with_suffix(".tmp")
        save_file(stored, tmp)
        tmp.replace(path)
    log.info(f"reference log-probs of {sum(map(len, sets.values())):,} pairs computed from the starting model in "
             f"{time.perf_counter() - t0:.1f}s, stored in {path}")
    return stored


def batch_losses(cfg: Config, beta: float, chosen_logps, rejected_logps, tokens, reference):
    """preference_losses of a batch: tokens and reference ([pairs, 2], reference None without one) moved to the
    log-likelihoods' device."""
    tokens = tokens.to(chosen_logps.device)
    ref = reference.to(chosen_logps.device) if reference is not None else torch.zeros_like(tokens)
    return preference_losses(cfg.loss, beta, chosen_logps, rejected_logps, tokens[:, 0], tokens[:, 1], ref[:, 0],
                             ref[:, 1], cfg.simpo_gamma)


def evaluate(model, cfg: Config, beta: float, pairs: list[dict], reference, pad_id: int, rt, autocast) -> dict:
    """Eval loss, reward accuracy and margin, and the answers' mean log-likelihoods over all eval pairs."""
    logps = all_pair_logps(model, pairs, cfg.batch_size, pad_id, rt, autocast, pack_len(cfg), cfg.loss_chunk)
    losses, chosen, rejected = batch_losses(cfg, beta, logps[:, 0], logps[:, 1], answer_tokens(pairs), reference)
    return {"eval_loss": losses.mean().item(), "eval_reward_accuracy": reward_accuracy(chosen, rejected).mean().item(),
            "eval_reward_margin": (chosen - rejected).mean().item(), "eval_logps_chosen": logps[:, 0].mean().item(),
            "eval_logps_rejected": logps[:, 1].mean().item()}


def save_final(model, tokenizer, final_dir: Path, rt):
    """Adapter, tokenizer and generation_config.json in final/, written by rank 0 all at once (as sft/qlora)."""
    def write(d):
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        save_generation_config(d, model, tokenizer)

    if rt.is_main:
        atomic_write_dir(final_dir, write)


def main(cfg: Config) -> dict:
    # ---- setup
    quiet_third_party_logs()
    refuse_values_below(cfg, {"batch_size": 1, "grad_accum": 1, "max_seq_len": 2, "max_steps": 0, "loss_chunk": 0,
                              "log_every": 1, "eval_every": 0, "save_every": 0, "keep_last": 1})
    lr = resolve_lr(cfg.lr, cfg.model_path, real_base_lr=5e-6, tiny_lr=2e-3)
    cfg = dataclasses.replace(cfg, lr=lr.value)  # config.json records the rate used
    beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA[cfg.loss]
    if not beta > 0:
        raise UserError(f"--beta={beta}: expected a positive number")
    uses_reference = cfg.loss in ("dpo", "ipo")
    rt = setup_runtime(cfg.seed)
    device_map, max_memory = layer_split_device_map(cfg.device_map, cfg.max_memory_per_gpu, rt.device, rt.world_size)
    out = Path(cfg.output_dir)
    precision = training_precision(rt.device, "grad_scaler")  # fp16 + GradScaler below compute capability 8.0
    dtype = precision.dtype
    scaler = torch.amp.GradScaler(rt.device.type, enabled=precision.grad_scaler)  # a no-op in bf16 and fp32
    autocast = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    # ---- tokenizer and data
    model_dir = resolve_model_path(cfg.model_path)
    init_adapter = Path(cfg.init_adapter) if cfg.init_adapter else None
    if init_adapter and not (init_adapter / "adapter_config.json").is_file():
        raise UserError(f"--init_adapter={init_adapter}: no adapter_config.json there; expected the final/ folder of "
                        "a LoRA recipe such as sft/qlora/out/final")
    tokenizer = load_tokenizer(init_adapter or model_dir)  # an SFT adapter's tokenizer is the one it trained with

    def build(path):
        return build_preference_pairs(read_records(path), tokenizer, cfg.max_seq_len, cfg.prompt_template)

    train_pairs, train_stats = build(cfg.data_path)
    eval_pairs, eval_stats = build(cfg.eval_data_path) if cfg.eval_data_path else ([], None)
    files = {"train": (cfg.data_path, train_pairs, train_stats), "eval": (cfg.eval_data_path, eval_pairs, eval_stats)}
    if cfg.inspect_data:  # a data-only run: nothing written, no model weights read
        if rt.is_main:
            print("\n".join(data_lines(files, tokenizer)), flush=True)
        cleanup(rt)
        return {"inspect_data": True, "train_stats": train_stats, "eval_stats": eval_stats}
    lengths = [len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in train_pairs]
    train_tokens = answer_tokens(train_pairs)

    def plan(epoch):  # this rank's batches of one epoch
        return plan_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length, rt.rank, rt.world_size)

    batches_per_epoch = len(plan(0))
    efficiency = pair_padding_efficiency(train_pairs, plan(0), pack_len(cfg))  # answer tokens / tokens computed
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, total_steps, cfg.report_to, enabled=rt.is_main, config=config_to_dict(cfg))

    # ---- model: quantized base, LoRA adapters (fresh, or the SFT adapter continued)
    model = load_model(model_dir, cfg.quantization, dtype, device_map, max_memory=max_memory)
    input_device = model.get_input_embeddings().weight.device  # the first GPU of a layer split
    devices = sorted({p.device for p in model.parameters()}, key=str)
    pad_id = model.config.pad_token_id = tokenizer.pad_token_id
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else rt.device.type == "cuda"
    model = prepare_for_lora_training(model, cfg.quantization != "none", checkpointing)
    if init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        for module in model.modules():  # its saved dropout would move the policy off the reference: ours instead
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.lora_dropout
    else:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    trainable, total = count_parameters(model)
    adapter = f"the SFT adapter {init_adapter}" if init_adapter else f"LoRA r={cfg.lora_r}"
    reference_note = "reference: the starting model, stored" if uses_reference else "no reference"
    log.info(f"model    {cfg.model_path} ({model_dir}) | {cfg.quantization} base + {adapter} | trainable "
             f"{trainable:,} / {total:,} params | {cfg.loss} beta {beta:g}, {reference_note} | {precision.reason}")
    for line in data_lines(files, tokenizer):
        log.info(line)
    log.info(f"steps    {total_steps} ({total_steps * cfg.grad_accum / batches_per_epoch:.2f} epochs), batch "
             f"{cfg.batch_size} pairs x accum {cfg.grad_accum} x {rt.world_size} ranks, lr {lr.description} | "
             f"padding efficiency {efficiency:.3f} (--packing={cfg.packing}) | device {rt.describe()}")
    if cfg.device_map == "auto":  # no hf_device_map: it all fit on the first GPU
        split = describe_layer_split(getattr(model, "hf_device_map", {"": str(input_device)}))
        log.info(f"layers   {split}; one GPU computes at a time | mem: peak of the fullest GPU")
    # the reference: the starting model's log-likelihoods, before any update and before --resume loads an adapter
    sets = {"train": train_pairs, **({"eval": eval_pairs} if eval_pairs else {})}
    reference = load_or_compute_reference(model, cfg, out, sets, pad_id, rt, autocast, log) if uses_reference else {}
    head = model.get_output_embeddings()  # of the unwrapped model: the loss runs it on the trained tokens only
    attention = model.config._attn_implementation  # how packed rows keep their answers apart
    train_model = model
    if rt.distributed:
        ddp_devices = [rt.local_rank] if rt.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ddp_devices)

    # ---- optimizer and schedule
    optimizer = make_optimizer(model, cfg.optim, cfg.lr, cfg.weight_decay, rt.device)
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    start_step = resume_adapter_training(model, optimizer, scheduler, out, rt.device, log, scaler) if cfg.resume else 0

    # ---- training loop
    stream = batch_stream(plan, start_batch=start_step * cfg.grad_accum)  # resume: past what was trained on
    eval_reference = reference.get("eval")
    first_eval = None
    if eval_pairs and start_step == 0:
        first_eval = evaluate(model, cfg, beta, eval_pairs, eval_reference, pad_id, rt, autocast)
        log.log(0, first_eval)
    model.train()
    train_seconds, tokens_seen, tokens_computed, losses = 0.0, 0, 0, []
    stop, preempted, path = catch_stop_signals(), False, None  # SIGTERM / Ctrl-C: checkpoint, then exit
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        chunk = [next(stream) for _ in range(cfg.grad_accum)]
        n_pairs = sum(len(batch) for batch in chunk)
        n_tokens = sum(lengths[i] for batch in chunk for i in batch)
        n_computed = sum(pair_tokens_computed(train_pairs, batch, pack_len(cfg)) for batch in chunk)
        n_pairs, n_tokens, n_computed = all_reduce_sum([n_pairs, n_tokens, n_computed], rt)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, accuracy, margin, chosen and rejected log-likelihood
        for i, batch in enumerate(chunk):
            sync = i == len(chunk) - 1 or not rt.distributed
            ref = reference["train"][batch] if uses_reference else None
            with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast:
                chosen_logps, rejected_logps = pair_logps(train_model, head, train_pairs, batch, pad_id, input_device,
                                                          pack_len(cfg), attention, cfg.loss_chunk)
            pair_losses, chosen, rejected = batch_losses(cfg, beta, chosen_logps, rejected_logps, train_tokens[batch],
                                                         ref)
            # mean over the pairs of the whole step on all ranks (DDP averages gradients, hence * world_size)
            scaler.scale(pair_losses.sum() * rt.world_size / n_pairs).backward()
            sums += torch.stack([pair_losses.sum(), reward_accuracy(chosen, rejected).sum(), (chosen - rejected).sum(),
                                 chosen_logps.sum(), rejected_logps.sum()]).detach().double().cpu()
        scaler.unscale_(optimizer)  # clip and report the true gradients
        trained_params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trained_params, cfg.max_grad_norm)
        loss_sum, accuracy_sum, margin_sum, chosen_sum, rejected_sum = all_reduce_sum(sums.tolist(), rt)
        loss = loss_sum / n_pairs
        # checked before any update; with the fp16 scaler an overflow alone is the scaler's to skip
        if not is_finite(loss, grad_norm, scaler.is_enabled()):
            if cfg.on_nan == "stop":
                raise non_finite_error(step, loss, grad_norm, out)
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            scheduler.step()
            log.info(f"step {step}/{total_steps}: loss {loss}, gradient norm {float(grad_norm)}: "
                     "skipped (--on_nan=skip)")
            continue
        scaler.step(optimizer)  # fp16: skips a step whose gradients overflowed, and update() lowers the scale
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += int(n_tokens)
        tokens_computed += int(n_computed)
        losses.append(loss)
        log.advance()
        if step % cfg.log_every == 0 or step == total_steps:
            log.log(step, {"loss": loss, "reward_accuracy": accuracy_sum / n_pairs,
                           "reward_margin": margin_sum / n_pairs,
                           "logps_chosen": chosen_sum / n_pairs, "logps_rejected": rejected_sum / n_pairs,
                           "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "tokens_per_s": n_tokens / dt, **memory_gb(devices)})
        if eval_pairs and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != total_steps:
            log.log(step, evaluate(model, cfg, beta, eval_pairs, eval_reference, pad_id, rt, autocast))
        preempted = stop_requested(stop, rt)
        if (cfg.save_every > 0 and step % cfg.save_every == 0 or preempted):  # all ranks call it; rank 0 writes
            path = save_checkpoint(out, step, model.save_pretrained, optimizer, scheduler, cfg.keep_last, scaler)
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

    # ---- save and final eval
    final_dir = out / "final"
    save_final(model, tokenizer, final_dir, rt)
    results = None
    if eval_pairs:
        results = evaluate(model, cfg, beta, eval_pairs, eval_reference, pad_id, rt, autocast)
        log.log(total_steps, results)
        if rt.is_main:
            report = {"step": total_steps, "pairs": len(eval_pairs), **results, "at_start": first_eval}
            (out / "eval_results.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(f"done: {total_steps - start_step} steps in {train_seconds:.1f}s, "
             f"{tokens_seen / max(train_seconds, 1e-9):,.0f} tok/s, peak mem {peak_memory_gb(devices):.2f} GB")
    log.info(f"adapter and tokenizer in {final_dir}; metrics in {out / 'metrics.jsonl'}, curve in {out / 'loss.png'}")
    log.close()
    cleanup(rt)
    return {"model": model, "tokenizer": tokenizer, "losses": losses, "eval": results, "first_eval": first_eval,
            "final_dir": final_dir, "train_seconds": train_seconds, "tokens": tokens_seen,
            "tokens_computed": tokens_computed, "steps": total_steps - start_step}


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
