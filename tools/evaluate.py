"""Evaluate a trained model on a labelled file: SFT answers (loss, perplexity, exact match) or a classifier /
regressor (the cls recipes' metrics). JSON to stdout and to --out.

    python tools/evaluate.py --model=/models/Llama-2-7b-hf --adapter=sft/qlora/out/final --data=eval.jsonl --out=r.json
    python tools/evaluate.py --model=/models/llama2-7b-sft --data=eval.jsonl                    # a merged / full model
    python tools/evaluate.py --model=/models/Llama-2-7b-hf --adapter=cls/qlora/out/final --data=data/cls/eval.jsonl
    python tools/evaluate.py --model=tiny --adapter=sft/qlora/out/final --data=data/sft/eval.jsonl     # the tiny Llama

--task=auto reads the task from the labels.json that the cls recipes write beside a classifier (in the adapter
folder, or the model folder of a full fine-tune or a merge): classification or regression; without one it is sft.

sft: the records become training examples exactly as the sft recipes build them (common.data.build_sft_examples:
prompt template, labels -100 on the prompt, truncation keeping the answer); loss is the mean next-token cross-entropy
over the answer tokens of all examples, perplexity exp(loss). Exact match: the greedy answer to each record's prompt
(tools/generate.py's rendering, --max_new_tokens) equals its reference answer after stripping whitespace
(--exact_match=false skips generating).
classification / regression: texts encoded as the cls recipes do (EOS appended when labels.json says so), pooled as
labels.json says (last token or mean), scored by the head; accuracy, macro-F1, per-class report and confusion matrix
(common.metrics.classification_metrics), or MSE, MAE, Pearson and Spearman; loss is the mean cross-entropy or MSE.
--predictions writes one line per record (classes: label and probabilities; sft: the generated answer).
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.checkpoint import atomic_write_text  # noqa: E402
from common.cls_eval import (  # noqa: E402
    ClsLoss,
    cls_loss_sum,
    input_device,
    prediction_rows,
    score_examples,
    target_tensor,
    task_metrics,
    write_jsonl,
)
from common.config import UserError, exit_on_user_error, parse_bool  # noqa: E402
from common.data import (  # noqa: E402
    Record,
    build_cls_examples,
    build_sft_examples,
    collate_left_padded,
    plan_batches,
    read_records,
)
from common.inference import (  # noqa: E402
    add_model_arguments,
    encode_prompt,
    generate_texts,
    generation_prompt,
    head_info,
    inference_device,
    load_for_inference,
    load_inference_tokenizer,
    make_generation_config,
    parse_dtype,
    reference_answer,
    resolve_model_and_adapter,
)
from common.logs import quiet_third_party_logs  # noqa: E402

TASKS = ("auto", "sft", "classification", "regression")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)  # --model, --adapter, --load_in_4bit, --dtype, --device_map, --max_memory_per_gpu
    p.add_argument("--data", required=True, help="labelled records (.jsonl, .json, .jsonl.zst)")
    p.add_argument("--task", default="auto", choices=TASKS, help="auto: from labels.json, else sft")
    p.add_argument("--out", help="also write the JSON results here")
    p.add_argument("--predictions", help="write one line per record here (label or generated answer)")
    p.add_argument("--batch_size", type=int, default=8, help="examples per forward or generate call (8)")
    p.add_argument("--max_seq_len", type=int, default=1024, help="longer examples are cut, as in training (1024)")
    p.add_argument("--prompt_template", default="alpaca", choices=("alpaca", "chat"),
                   help="sft: the template the model was trained with")
    p.add_argument("--exact_match", type=parse_bool, nargs="?", const=True, default=True,
                   help="sft: generate greedy answers and compare them with the references (default true)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="sft exact match: most tokens per answer (128)")
    p.add_argument("--label_field", default="label", help="classification / regression: the label field")
    p.add_argument("--text_field", help="classification / regression: the text field (default: labels.json's)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.max_seq_len < 2:
        p.error("--batch_size and --max_new_tokens must be at least 1, --max_seq_len at least 2")
    return args


def resolve_task(requested: str, head: dict | None, where: str) -> str:
    """The task to evaluate: what labels.json says, checked against --task."""
    if head is not None and head["file"] == "reward_model.json":
        raise UserError(f"{where} is a pairwise reward model; its pairwise accuracy is in cls/reward-qlora's "
                        "eval_results.json (tools/evaluate.py scores SFT models and classifiers)")
    head_task = head["task"] if head else None
    if requested == "auto":
        return head_task or "sft"
    if requested in ("classification", "regression") and head_task is None:
        raise UserError(f"--task={requested} needs the labels.json the cls recipes write beside the model; "
                        f"{where} has none")
    if head_task and requested != head_task:
        raise UserError(f"--task={requested}, but {where}/labels.json says the model was trained for {head_task}")
    return requested


def json_ready(value):
    """NaN (a correlation of constant predictions) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return value


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def evaluate_sft(args, model, tokenizer, records) -> dict:
    """Answer-token loss and perplexity as in training, and exact match of greedy answers."""
    import torch

    from common.losses import count_trained_tokens, token_loss_sum

    examples, stats = build_sft_examples(records, tokenizer, args.max_seq_len, args.prompt_template)
    device = model.get_input_embeddings().weight.device  # a layer split's first GPU
    loss_sum, n_tokens = 0.0, 0
    batches = plan_batches([len(e["input_ids"]) for e in examples], args.batch_size, 0, 0, True)
    with torch.no_grad():
        for rows in batches:
            batch = {k: v.to(device) for k, v in collate_left_padded([examples[i] for i in rows],
                                                                     tokenizer.pad_token_id).items()}
            labels = batch.pop("labels")
            loss_sum += token_loss_sum(model(**batch).logits, labels).item()
            n_tokens += count_trained_tokens(labels)
    loss = loss_sum / max(n_tokens, 1)
    results = {"examples": stats.examples, "answer_tokens": n_tokens, "truncated": stats.truncated_examples,
               "dropped": stats.dropped_examples, "loss": loss, "perplexity": math.exp(min(loss, 700))}
    if args.exact_match:
        references = [reference_answer(r) for r in records]
        prompts = [generation_prompt(r, tokenizer, args.prompt_template) for r in records]
        config = make_generation_config(model, tokenizer, args.max_new_tokens)  # greedy
        outputs = generate_texts(model, tokenizer, [encode_prompt(tokenizer, t, s) for t, s in prompts],
                                 args.batch_size, config)
        matches = [ref is not None and out.strip() == ref.strip() for out, ref in zip(outputs, references)]
        scored = sum(ref is not None for ref in references)
        results.update({"exact_match": sum(matches) / max(scored, 1), "exact_match_count": sum(matches),
                        "answered": scored, "max_new_tokens": args.max_new_tokens})
        if args.predictions:
            write_jsonl(args.predictions, ({"prompt": p, "output": o, "reference": r, "exact_match": m}
                                           for (p, _), o, r, m in zip(prompts, outputs, references, matches)))
    return results


def evaluate_classifier(args, model, tokenizer, records, head: dict, task: str) -> dict:
    """The cls recipes' metrics on the classifier's (or regressor's) pooled scores."""
    from common.model import PooledClassifier

    label_names = head["labels"]
    if task == "classification":  # labels.json holds the class names as text; integer labels in the data match them
        records = [Record({**r.data, args.label_field: str(r.data[args.label_field])}, r.where)
                   if is_integer(r.data.get(args.label_field)) else r for r in records]
    text_field = args.text_field or head.get("text_field", "text")
    examples, stats = build_cls_examples(records, tokenizer, args.max_seq_len, task,
                                         label_names if task == "classification" else None, text_field,
                                         args.label_field, head.get("append_eos", True))
    classifier = PooledClassifier(model, head.get("pooling", "last")).eval()
    device = input_device(classifier)  # a layer split's first GPU
    scores = score_examples(classifier, examples, len(label_names), args.batch_size, tokenizer.pad_token_id, device)
    targets = [e["label"] for e in examples]
    loss = ClsLoss(task, "mse" if task == "regression" else "ce")  # the plain loss, whatever the training used
    mean_loss = cls_loss_sum(scores, target_tensor(examples, task), loss).item() / len(targets)
    results = {"examples": len(examples), "loss": mean_loss}
    if task == "classification":
        results["labels"] = label_names
    results.update(task_metrics(scores, targets, task, label_names))
    results.update({"pooling": head.get("pooling", "last"), "truncated": stats.truncated_examples})
    if args.predictions:
        write_jsonl(args.predictions, prediction_rows(examples, scores, task, label_names, text_field, with_label=True))
    return results


def evaluate(args) -> dict:
    model_dir, adapter_dir = resolve_model_and_adapter(args.model, args.adapter)
    head_folder = adapter_dir or model_dir  # labels.json: beside the adapter, or in a full / merged model's folder
    head = head_info(head_folder)
    task = resolve_task(args.task, head, str(head_folder))
    records = read_records(args.data)  # a bad file fails before the model loads
    device = inference_device()
    tokenizer = load_inference_tokenizer(model_dir, adapter_dir)
    model = load_for_inference(model_dir, adapter_dir, args.load_in_4bit,
                               num_labels=head["num_labels"] if task != "sft" else None,
                               dtype=parse_dtype(args.dtype, device), device=device, device_map=args.device_map,
                               max_memory_per_gpu=args.max_memory_per_gpu)
    if task == "sft":
        metrics = evaluate_sft(args, model, tokenizer, records)
    else:
        metrics = evaluate_classifier(args, model, tokenizer, records, head, task)
    return json_ready({"task": task, "model": str(model_dir), "adapter": args.adapter, "data": args.data,
                       "records": len(records), **metrics})


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet_third_party_logs()
    with exit_on_user_error():
        results = evaluate(args)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    return results


if __name__ == "__main__":
    main()
