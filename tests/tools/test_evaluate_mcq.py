"""tools/evaluate_mcq.py on the bundled MMLU-layout (English) and C-Eval-layout (Chinese) samples: the letter scores of
a question against a hand-built prompt and a plain forward, accuracy and averages against a hand count, the same
probabilities in a batch of one and of eight (left padding), multi-token letters, the three file layouts, k-shot
trimming, and one-line errors."""
import json
from types import SimpleNamespace

import pytest
import torch

from common.model import load_tokenizer, resolve_model_path
from tests.conftest import REPO, run_script
from tests.tools.conftest import load_tool

mcq = load_tool("evaluate_mcq")
EN, ZH = REPO / "data" / "mcq" / "en", REPO / "data" / "mcq" / "zh"


def run(*argv):
    return mcq.main([*argv])


def test_letter_scores_are_the_next_token_log_likelihoods_of_a_hand_built_prompt(tiny_model, tokenizer):
    results = run("--model=tiny", f"--data={EN}", "--subjects=elementary_arithmetic", "--shots=0")
    first = results["predictions"][0]
    prompt = ("The following are multiple choice questions (with answers) about elementary arithmetic.\n\n"
              "What is 7 + 8?\nA. 14\nB. 16\nC. 15\nD. 13\nAnswer:")
    ids = tokenizer(prompt).input_ids
    assert first["prompt_tokens"] == len(ids) and ids[0] == tokenizer.bos_token_id
    letters = [tokenizer.convert_tokens_to_ids(f"\u2581{x}") for x in "ABCD"]  # SentencePiece: " A" is one token
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[0, -1], -1)[letters]
    expected = torch.softmax(logprobs.double(), -1)
    assert first["probabilities"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert first["predicted"] == "ABCD"[int(expected.argmax())] and first["answer"] == "C"


class AlwaysC(torch.nn.Module):
    """A model whose next token is always the letter C (its logits: 0, and 5 for the ids of " C" and "C")."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab = len(tokenizer)
        self.favoured = [tokenizer.convert_tokens_to_ids("\u2581C"), tokenizer.convert_tokens_to_ids("C")]

    def get_input_embeddings(self):
        return SimpleNamespace(weight=self.anchor)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favoured] = 5.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("data, split, by_subject", [
    (EN, "test", {"elementary_arithmetic": 2 / 5, "world_geography": 1 / 5}),  # answers CADBC and BACDB
    (ZH, "val", {"chinese_geography": 1 / 5, "elementary_mathematics": 2 / 5}),  # DBACB and CABDC
])
def test_accuracy_and_averages_match_a_hand_count(data, split, by_subject, monkeypatch, tokenizer, tmp_path):
    monkeypatch.setattr(mcq, "load_from_args", lambda args: (AlwaysC(tokenizer), tokenizer, "tiny", None))
    out = tmp_path / "results.json"
    results = run("--model=tiny", f"--data={data}", f"--split={split}", f"--out={out}",
                  f"--predictions={tmp_path / 'predictions.jsonl'}")
    assert {name: s["accuracy"] for name, s in results["subjects"].items()} == pytest.approx(by_subject)
    assert results["average"] == pytest.approx(sum(by_subject.values()) / 2)
    assert results["micro"] == pytest.approx(sum(by_subject.values()) * 5 / 10) and results["questions"] == 10
    assert all(p["predicted"] == "C" for p in results["predictions"])
    assert json.loads(out.read_text())["average"] == pytest.approx(results["average"])
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 10
    language = "en" if data == EN else "zh"
    assert all(s["language"] == language and s["shots"] == 3 for s in results["subjects"].values())


def test_a_batch_of_one_and_of_eight_give_the_same_probabilities():
    one = run("--model=tiny", f"--data={ZH}", "--split=val", "--batch_size=1")["predictions"]
    eight = run("--model=tiny", f"--data={ZH}", "--split=val", "--batch_size=8")["predictions"]
    for a, b in zip(one, eight):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


def test_multi_token_continuations_are_scored_in_full(tiny_model, tokenizer):
    prompts = [tokenizer("Answer:").input_ids, tokenizer("The letter is").input_ids]
    candidates = [tokenizer(text, add_special_tokens=False).input_ids for text in (" A B", " C")]
    scores = mcq.score_prompts(tiny_model, prompts, candidates, tokenizer.pad_token_id, batch_size=3)
    for p, prompt in enumerate(prompts):
        for c, candidate in enumerate(candidates):
            ids = torch.tensor([prompt + candidate])
            with torch.no_grad():
                logprobs = torch.log_softmax(tiny_model(ids).logits[0], -1)
            expected = sum(logprobs[len(prompt) - 1 + i, t] for i, t in enumerate(candidate))
            assert float(scores[p, c]) == pytest.approx(float(expected), abs=1e-4)


def test_the_three_layouts_are_read(tmp_path):
    cmmlu = tmp_path / "cmmlu.csv"
    cmmlu.write_text(",Question,A,B,C,D,Answer\n0,一加一等于几？,1,2,3,4,B\n", encoding="utf-8")
    (q,) = mcq.read_questions(cmmlu)
    assert (q.text, q.choices, q.answer, q.where) == ("一加一等于几？", ["1", "2", "3", "4"], "B", f"{cmmlu}:2")
    ceval = mcq.read_questions(ZH / "dev" / "chinese_geography_dev.csv")
    # C-Eval: the id and explanation columns are left out
    assert ceval[0].choices == ["上海", "北京", "广州", "深圳"] and ceval[0].answer == "B"
    mmlu = mcq.read_questions(EN / "test" / "world_geography_test.csv")
    assert len(mmlu) == 5 and mmlu[0].choices == ["Milan", "Rome", "Naples", "Turin"] and mmlu[0].answer == "B"
    no_answers = tmp_path / "test.csv"
    no_answers.write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n")
    assert mcq.read_questions(no_answers)[0].answer is None  # C-Eval's test split


def test_shots_are_dropped_from_the_last_until_the_prompt_fits():
    tokenizer = load_tokenizer(resolve_model_path("tiny"))
    questions = mcq.read_questions(EN / "dev" / "world_geography_dev.csv")
    question = mcq.read_questions(EN / "test" / "world_geography_test.csv")[0]
    full, kept = mcq.build_prompt("world_geography", questions, question, "en", tokenizer, 10_000)
    one_shot, _ = mcq.build_prompt("world_geography", questions[:1], question, "en", tokenizer, 10_000)
    ids, kept = mcq.build_prompt("world_geography", questions, question, "en", tokenizer, len(one_shot))
    assert kept == 1 and ids == one_shot and len(full) > len(one_shot)


def test_bad_rows_and_folders_are_one_line(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("What?,a,b,c,d,A\nWhy?,a,b,c,d,E\n")
    proc = run_script(REPO / "tools" / "evaluate_mcq.py", "--model=tiny", f"--data={tmp_path}", "--shots=0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'test' / 'x_test.csv'}:2: field 'answer' is 'E'; expected one of A, B, C, D" in proc.stderr
    proc = run_script(REPO / "tools" / "evaluate_mcq.py", "--model=tiny", f"--data={tmp_path / 'nothing'}")
    assert proc.returncode == 2 and "no CSV files" in proc.stderr and proc.stderr.strip().count("\n") == 0
