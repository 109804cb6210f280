"""Regenerate the bundled pretraining sample: raw files in several formats under data/pretrain/raw/ and their shards.

    python data_scripts/make_pretrain_sample.py            # writes data/pretrain/raw/ (deterministic)
    python data_scripts/shard_corpus.py --inputs data/pretrain/raw --out_dir data/pretrain/shards --max_lines 512

Both outputs are committed, and both commands are deterministic: the shards and manifest come out byte-identical
from any working folder (sources are named raw/<file>) and with any --workers. The text is the sentences already
bundled in data/sft/*.jsonl and data/cls/*.jsonl (English and Chinese; no made-up facts, no preference "rejected"
answers), recombined into documents: review paragraphs, question-and-answer pages and dialogues, each in one language
and written in varying surface forms. About 420 KB of text in five files, one per input format shard_corpus reads:
    raw/pile_en.jsonl            The Pile   {"text", "meta": {"pile_set_name"}}     English documents
    raw/wudao_zh.json            WuDao      [{"id", "dataType", "title", "content"}]  Chinese documents (a JSON list)
    raw/wudao_zh_extra.jsonl.zst WuDao      {"title", "content"}                     Chinese, zstd-compressed
    raw/notes.txt                plain text, documents separated by blank lines       both languages
    raw/instructions.jsonl       Alpaca {"instruction","input","output"} and PandaLLM {"input","target"}, verbatim
Enough for a tiny model to train a few hundred steps of 256-token sequences; the source text is small (about 50 KB
of distinct sentences), so the documents reuse sentences in new orders and forms.
"""
import argparse
import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CJK = re.compile(r"[\u4e00-\u9fff]")
QA_FORMS = {  # surface forms of one question and answer, so the same fact shows up in different contexts
    "en": ["Q: {q}\nA: {a}", "Question: {q}\nAnswer: {a}", "{q}\n{a}", "Someone asked: {q} The answer: {a}"],
    "zh": ["问：{q}\n答：{a}", "问题：{q}\n回答：{a}", "{q}\n{a}", "有人问：{q}回答是：{a}"],
}
SPEAKERS = {"en": ("User", "Assistant"), "zh": ("用户", "助手")}
SENTENCE_JOINER = {"en": " ", "zh": ""}


def language(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def one_line(text: str) -> str:
    return " ".join(text.split())


def collect_units(data_dir: Path) -> dict:
    """Distinct review sentences, question/answer pairs and dialogues from the bundled sft and cls data, by language."""
    units = {lang: {"review": {}, "qa": {}, "dialogue": {}} for lang in ("en", "zh")}  # dicts: ordered and unique

    def add(kind, value, lang_text):
        units[language(lang_text)][kind][value] = None

    for path in sorted((data_dir / "sft").glob("*.jsonl")) + sorted((data_dir / "cls").glob("*.jsonl")):
        for r in read_jsonl(path):
            if "messages" in r:
                turns = tuple((m["role"], one_line(m["content"])) for m in r["messages"] if m["role"] != "system")
                add("dialogue", turns, turns[0][1])
            elif "instruction" in r:  # "Add the two numbers." + "13 and 99" -> "Add the two numbers: 13 and 99"
                question, extra = one_line(r["instruction"]), one_line(r.get("input", ""))
                if extra:
                    colon = "：" if language(question) == "zh" else ": "
                    question = question.rstrip(".。?？") + colon + extra
                add("qa", (question, one_line(r["output"])), question)
            elif "target" in r:  # PandaLLM "Question: ...\nAnswer:" prompts: keep the question part
                question = re.sub(r"^(Question: |问题：)|\n?(Answer:|回答：)\s*$", "", r["input"].strip())
                add("qa", (one_line(question), one_line(r["target"])), question)
            elif "prompt" in r:  # preference pairs: the chosen answer only
                add("qa", (one_line(r["prompt"]), one_line(r["chosen"])), r["prompt"])
            elif "text" in r:
                add("review", one_line(r["text"]), r["text"])
    return {lang: {kind: list(values) for kind, values in kinds.items()} for lang, kinds in units.items()}


def title_of(text: str) -> str:
    return re.split(r"[。？！.?!\n]", text, maxsplit=1)[0][:24]


def make_document(rng: random.Random, units: dict, lang: str) -> tuple[str, str, str]:
    """(kind, title, text) of one document in one language; the title is its first sentence or question."""
    kind = rng.choices(["review", "qa", "dialogue"], weights=[4, 5, 1])[0]
    if kind == "review":
        paragraphs = [rng.sample(units[lang]["review"], rng.randint(3, 9)) for _ in range(rng.randint(1, 3))]
        return kind, title_of(paragraphs[0][0]), "\n".join(SENTENCE_JOINER[lang].join(p) for p in paragraphs)
    if kind == "qa":
        form = rng.choice(QA_FORMS[lang])
        pairs = rng.sample(units[lang]["qa"], rng.randint(2, 7))
        return kind, title_of(pairs[0][0]), "\n".join(form.format(q=q, a=a) for q, a in pairs)
    user, assistant = SPEAKERS[lang]
    dialogues = rng.sample(units[lang]["dialogue"], rng.randint(1, 2))
    text = "\n".join(f"{user if role == 'user' else assistant}: {line}" for d in dialogues for role, line in d)
    return kind, title_of(dialogues[0][0][1]), text


def make_documents(rng, units, lang, text_bytes: int) -> list[tuple[str, str, str]]:
    docs, size = [], 0
    while size < text_bytes:
        docs.append(make_document(rng, units, lang))
        size += len(docs[-1][2].encode("utf-8"))
    return docs


def write_text(path: Path, text: str):
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} ({len(text.encode()):,} bytes)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(REPO / "data"), help="where data/sft and data/cls are")
    p.add_argument("--out_dir", default=str(REPO / "data" / "pretrain" / "raw"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import zstandard

    rng = random.Random(args.seed)
    units = collect_units(Path(args.data_dir))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    pile_names = {"review": "sample-reviews", "qa": "sample-qa", "dialogue": "sample-dialogue"}
    pile = [{"text": text, "meta": {"pile_set_name": pile_names[kind]}}
            for kind, _, text in make_documents(rng, units, "en", 160_000)]
    write_text(out / "pile_en.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pile))

    data_types = {"review": "评论", "qa": "问答", "dialogue": "对话"}
    wudao = [{"id": i, "dataType": data_types[kind], "title": title, "content": text}
             for i, (kind, title, text) in enumerate(make_documents(rng, units, "zh", 130_000))]
    write_text(out / "wudao_zh.json", json.dumps(wudao, ensure_ascii=False, indent=1) + "\n")

    extra = "".join(json.dumps({"title": title, "content": text}, ensure_ascii=False) + "\n"
                    for _, title, text in make_documents(rng, units, "zh", 40_000))
    (out / "wudao_zh_extra.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=19).compress(extra.encode()))
    print(f"wrote {out / 'wudao_zh_extra.jsonl.zst'} ({len(extra.encode()):,} bytes before compression)")

    notes = [text for lang in ("en", "zh") for _, _, text in make_documents(rng, units, lang, 25_000)]
    rng.shuffle(notes)
    write_text(out / "notes.txt", "\n\n".join(notes) + "\n")

    records = [r for name in ("train.jsonl", "eval.jsonl", "panda.jsonl")
               for r in read_jsonl(Path(args.data_dir) / "sft" / name)]
    write_text(out / "instructions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


if __name__ == "__main__":
    main()
