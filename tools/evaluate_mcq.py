"""Multiple-choice benchmarks in the MMLU / C-Eval / CMMLU layout: per-subject and average accuracy of a model (a
full checkpoint, or a base + LoRA adapter), scored by the log-likelihood of each answer letter after the standard
prompt, k-shot from the dev split, batched with left padding. A table to stdout, JSON to --out.

    python tools/evaluate_mcq.py --model=/models/llama2-7b-sft --data=/data/mmlu --split=test --shots=5
    python tools/evaluate_mcq.py --model=/models/Llama-2-7b-hf --adapter=sft/qlora/out/final --data=/data/ceval \\
        --split=val --shots=5 --load_in_4bit
    python tools/evaluate_mcq.py --model=tiny --data=data/mcq/en          # the bundled sample (data/mcq/zh: Chinese)

Layout: <data>/<split>/<subject>_<split>.csv (MMLU, C-Eval) or <data>/<split>/<subject>.csv (CMMLU), and the k-shot
examples from <data>/dev/ the same way (the first k rows of the subject's dev file). Rows: question, the choices
(A, B, C, D: as many as the header names, or all columns between question and answer without one) and the answer
letter; a header row (C-Eval: id,question,A,B,C,D,answer,explanation; CMMLU: ,Question,A,B,C,D,Answer) is found by
its 'question' column; MMLU files have none. A bad row stops the run with one line naming file, line and field.

Prompt (the original benchmarks' form), English: "The following are multiple choice questions (with answers)
about <subject>.\n\n", then each shot and the question as "<question>\nA. <choice>\n...\nAnswer:" (a shot
ends " <letter>\n\n"); Chinese (--language=auto picks it when most of the subject's questions hold CJK):
"以下是中国关于<subject>考试的单项选择题，请选出其中的正确答案。\n\n" and "答案：". Shots are dropped
from the last while the prompt is longer than --max_seq_len.
Scoring: the letter's log-likelihood as the prompt's continuation (" A" in English, "A" in Chinese); where each letter
is one token (every Llama tokenizer), one forward per prompt reads all of them at the last position, else each
continuation is scored in full. The prediction is the likeliest letter; accuracy per subject, then averaged over
subjects ("average", as MMLU reports it) and over all questions ("micro").

For the full benchmarks and many more tasks, EleutherAI's lm-evaluation-harness runs on a merged model folder
(tools/merge_lora.py): lm_eval --model hf --model_args pretrained=/models/merged,dtype=bfloat16 --tasks mmlu,cmmlu
--num_fewshot 5 --batch_size auto (README.md).
"""
import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.checkpoint import atomic_write_text  # noqa: E402
from common.config import UserError, exit_on_user_error  # noqa: E402
from common.data import DataError, collate_left_padded  # noqa: E402
from common.inference import (  # noqa: E402
    add_model_arguments,
    load_from_args,
)
from common.logs import quiet_third_party_logs  # noqa: E402

HEADERS = {"en": "The following are multiple choice questions (with answers) about {subject}.\n\n",
           "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"}
ANSWER_CUE = {"en": "Answer:", "zh": "答案："}
LETTER_PREFIX = {"en": " ", "zh": ""}  # what comes between the cue and the letter
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass
class Question:
    text: str
    choices: list[str]  # in letter order: A, B, ...
    answer: str | None  # a letter; None where the split has no answers (C-Eval test)
    where: str  # file:line


def subject_files(folder: Path, split: str) -> dict[str, Path]:
    """{subject: csv file} of one split folder; the subject is the file name without .csv and a _<split> suffix."""
    files = sorted((folder / split).glob("*.csv"))
    return {path.stem.removesuffix(f"_{split}"): path for path in files}


def read_questions(path: Path) -> list[Question]:
    """The questions of one CSV file, with or without a header row (see the module docstring)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"{path}: no rows")
    names = [cell.strip().lower() for cell in rows[0]]
    if "question" in names:  # C-Eval / CMMLU: columns by name
        letters = [chr(ord("A") + i) for i in range(26) if chr(ord("a") + i) in names]
        columns = [names.index("question"), *(names.index(x.lower()) for x in letters)]
        answer_column = names.index("answer") if "answer" in names else None
        body, first_line = rows[1:], 2
    else:  # MMLU: question, the choices, answer
        width = len(rows[0])
        letters = [chr(ord("A") + i) for i in range(width - 2)]
        columns, answer_column, body, first_line = list(range(width - 1)), width - 1, rows, 1
    if len(letters) < 2:
        raise DataError(f"{path}:1: expected a question, at least two choices (A, B, ...) and an answer column")
    questions = []
    for lineno, row in enumerate(body, start=first_line):
        where = f"{path}:{lineno}"
        needed = max(columns + [answer_column or 0])
        if len(row) <= needed:
            raise DataError(f"{where}: {len(row)} fields; expected the question, {', '.join(letters)} and the answer")
        answer = row[answer_column].strip().upper() if answer_column is not None else ""
        if answer and answer not in letters:
            raise DataError(f"{where}: field 'answer' is {row[answer_column]!r}; expected one of {', '.join(letters)}")
        questions.append(Question(row[columns[0]], [row[c] for c in columns[1:]], answer or None, where))
    return questions


def prompt_language(questions: list[Question], requested: str) -> str:
    """en or zh: as requested, or (auto) zh when most questions hold CJK characters."""
    if requested != "auto":
        return requested
    chinese = sum(bool(CJK.search(q.text)) for q in questions)
    return "zh" if chinese * 2 > len(questions) else "en"


def render_question(question: Question, language: str, with_answer: bool) -> str:
    letters = [chr(ord("A") + i) for i in range(len(question.choices))]
    lines = [question.text, *(f"{letter}. {choice}" for letter, choice in zip(letters, question.choices))]
    text = "\n".join(lines) + "\n" + ANSWER_CUE[language]
    if with_answer:
        text += f"{LETTER_PREFIX[language]}{question.answer}\n\n"
    return text


def build_prompt(subject: str, shots: list[Question], question: Question, language: str, tokenizer,
                 max_seq_len: int) -> tuple[list[int], int]:
    """Token ids of the k-shot prompt (shots dropped from the last while it is too long) and the shots kept."""
    header = HEADERS[language].format(subject=subject.replace("_", " "))
    kept = len(shots)
    while True:
        text = header + "".join(render_question(s, language, True) for s in shots[:kept])
        ids = tokenizer(text + render_question(question, language, False)).input_ids
        if len(ids) <= max_seq_len or kept == 0:
            return ids, kept
        kept -= 1


def letter_ids(tokenizer, language: str, n_choices: int) -> list[list[int]]:
    """The tokens each letter adds after the answer cue (" A" in English), read off the tokenized prompt end so
    the merge with the cue is the one the prompt sees."""
    cue = tokenizer(ANSWER_CUE[language], add_special_tokens=False).input_ids
    ids = []
    for i in range(n_choices):
        both = tokenizer(ANSWER_CUE[language] + LETTER_PREFIX[language] + chr(ord("A") + i),
                         add_special_tokens=False).input_ids
        if both[: len(cue)] != cue:
            raise UserError(f"the tokenizer merges the answer cue {ANSWER_CUE[language]!r} with the letter; "
                            "letters cannot be scored as a continuation")
        ids.append(both[len(cue):])
    return ids


def score_prompts(model, prompts: list[list[int]], candidates: list[list[int]], pad_id: int, batch_size: int):
    """[prompts, choices] log-likelihoods of each candidate continuation after each prompt, batched with left
    padding: one forward of the prompts when every candidate is one token, else one row per (prompt, candidate)."""
    import torch

    device = model.get_input_embeddings().weight.device  # a layer split's first GPU
    single = all(len(c) == 1 for c in candidates)
    rows = prompts if single else [p + c for p in prompts for c in candidates]
    scores = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate_left_padded([{"input_ids": r} for r in rows[start:start + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            if single:
                logits = model(**batch, logits_to_keep=1).logits[:, -1].float()
                scores.append(torch.log_softmax(logits, -1)[:, [c[0] for c in candidates]].cpu())
                continue
            logprobs = torch.log_softmax(model(**batch).logits.float(), -1)
            for r in range(batch["input_ids"].shape[0]):
                n = len(candidates[(start + r) % len(candidates)])
                targets = batch["input_ids"][r, -n:]
                picked = logprobs[r, -n - 1:-1].gather(1, targets[:, None])
                scores.append(picked.sum().reshape(1, 1).cpu())
    joined = torch.cat(scores)
    return joined if single else joined.reshape(len(prompts), len(candidates))


def evaluate_mcq(args) -> dict:
    import torch

    data = Path(args.data)
    tests = subject_files(data, args.split)
    if not tests:
        raise UserError(f"--data={args.data}: no CSV files in {data / args.split}; expected the MMLU / C-Eval / "
                        "CMMLU layout (<data>/<split>/<subject>_<split>.csv)")
    wanted = [s for s in args.subjects.split(",") if s] if args.subjects else list(tests)
    unknown = [s for s in wanted if s not in tests]
    if unknown:
        raise UserError(f"--subjects: {', '.join(unknown)} not in {data / args.split} ({', '.join(tests)})")
    dev = subject_files(data, "dev") if args.shots else {}
    questions = {s: read_questions(tests[s]) for s in wanted}  # every file read before the model loads
    shots = {s: read_questions(dev[s])[: args.shots] if s in dev else [] for s in wanted}
    model, tokenizer, model_dir, adapter_dir = load_from_args(args)
    subjects, predictions = {}, []
    for subject in wanted:
        language = prompt_language(questions[subject], args.language)
        prompts = [build_prompt(subject, shots[subject], q, language, tokenizer, args.max_seq_len)
                   for q in questions[subject]]
        n_choices = len(questions[subject][0].choices)
        scores = score_prompts(model, [ids for ids, _ in prompts], letter_ids(tokenizer, language, n_choices),
                               tokenizer.pad_token_id, args.batch_size)
        probabilities = torch.softmax(scores.double(), -1)
        answered = [q for q in questions[subject] if q.answer]
        correct = 0
        for q, row, (ids, kept) in zip(questions[subject], probabilities, prompts):
            predicted = chr(ord("A") + int(row.argmax()))
            correct += predicted == q.answer
            predictions.append({"subject": subject, "where": q.where, "answer": q.answer, "predicted": predicted,
                                "probabilities": [round(float(x), 6) for x in row], "shots": kept,
                                "prompt_tokens": len(ids)})
        subjects[subject] = {"accuracy": correct / len(answered) if answered else None, "correct": correct,
                             "questions": len(answered), "language": language,
                             "shots": min((kept for _, kept in prompts), default=0)}
    scored = [s for s in subjects.values() if s["questions"]]
    total = sum(s["questions"] for s in scored)
    return {"model": str(model_dir), "adapter": args.adapter, "data": str(data), "split": args.split,
            "shots": args.shots, "subjects": subjects,
            "average": sum(s["accuracy"] for s in scored) / len(scored) if scored else None,
            "micro": sum(s["correct"] for s in scored) / total if total else None, "questions": total,
            "predictions": predictions}


def table(results: dict) -> str:
    lines = ["| subject | language | shots | questions | accuracy |", "|---|---|---:|---:|---:|"]
    for name, s in results["subjects"].items():
        accuracy = "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
        lines.append(f"| {name} | {s['language']} | {s['shots']} | {s['questions']} | {accuracy} |")
    average = "-" if results["average"] is None else f"{results['average']:.3f}"
    micro = "-" if results["micro"] is None else f"{results['micro']:.3f}"
    lines.append(f"| average over subjects | | | {results['questions']} | {average} (over questions {micro}) |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)  # --model, --adapter, --load_in_4bit, --dtype, --device_map, --max_memory_per_gpu
    p.add_argument("--data", required=True, help="the benchmark folder (<data>/<split>/*.csv, <data>/dev/*.csv)")
    p.add_argument("--split", default="test", help="the split scored: test (MMLU, CMMLU) or val (C-Eval)")
    p.add_argument("--shots", type=int, default=5, help="k-shot examples from <data>/dev (default %(default)s)")
    p.add_argument("--subjects", default="", help="comma list of subjects (default: all of the split)")
    p.add_argument("--language", default="auto", choices=("auto", "en", "zh"), help="the prompt's language")
    p.add_argument("--max_seq_len", type=int, default=2048, help="prompt tokens at most (default %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per forward (default %(default)s)")
    p.add_argument("--out", help="also write the JSON results here")
    p.add_argument("--predictions", help="write one line per question here (answer, prediction, probabilities)")
    args = p.parse_args(argv)
    if args.shots < 0 or args.batch_size < 1 or args.max_seq_len < 8:
        p.error("--shots must be >= 0, --batch_size >= 1 and --max_seq_len >= 8")
    quiet_third_party_logs()
    with exit_on_user_error():
        results = evaluate_mcq(args)
    predictions = results.pop("predictions")
    print(table(results))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if args.predictions:
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)
        atomic_write_text(Path(args.predictions), lines)
    return {**results, "predictions": predictions}


if __name__ == "__main__":
    main()
