"""Reward functions for rlhf/grpo-qlora, bundled as examples: --reward_fn=rlhf/grpo-qlora/rewards.py:<name>.

Every one is called once per step with the step's completions (each prompt repeated group_size times):
    name(prompts: list[str], completions: list[str], records: list[dict]) -> list[float]
prompts: the rendered prompt texts; completions: the sampled answers (special tokens dropped); records: the data
records, with the reference answer under "answer" (alpaca "output", a final assistant message, or the record's own
"answer"; None when it has none). Return one number per completion; higher is better. Only the differences within
a prompt's group matter (the advantages are taken per group), so a constant offset changes nothing.

Write your own file with the same signature; it is imported as a module of its own, so it may import anything.
"""


def exact_match(prompts, completions, records):
    """1 when the completion equals the reference answer (whitespace at the ends ignored, as tools/evaluate.py
    compares), else 0. A sparse signal: a group where no completion is right, or all are, teaches nothing."""
    return [float(answer is not None and completion.strip() == answer.strip())
            for completion, answer in zip(completions, answers(records), strict=True)]


def format_check(prompts, completions, records):
    """1 when the completion has the reference answer's shape: one line of single characters separated by single
    spaces, as many as the answer has (the synthetic letter tasks' format), else 0."""
    scores = []
    for completion, answer in zip(completions, answers(records), strict=True):
        items = completion.strip().split(" ")
        single = "\n" not in completion.strip() and all(len(item) == 1 for item in items)
        scores.append(float(single and answer is not None and len(items) == len(answer.split())))
    return scores


def position_match(prompts, completions, records):
    """The fraction of the answer's items (space-separated) that the completion has at the same position, over the
    longer of the two, so missing and extra items both cost: a denser signal than exact match, which the tiny model
    needs while most of its answers are partly right."""
    scores = []
    for completion, answer in zip(completions, answers(records), strict=True):
        got, want = completion.split(), (answer or "").split()
        same = sum(a == b for a, b in zip(got, want))
        scores.append(same / max(len(got), len(want), 1))
    return scores


def score(prompts, completions, records):
    """The default: exact match + position match (0 to 2). Exact match is what the run is judged by; position match
    ranks the near misses of a group, so a group with no right answer still has something to learn from."""
    exact = exact_match(prompts, completions, records)
    partial = position_match(prompts, completions, records)
    return [e + p for e, p in zip(exact, partial, strict=True)]


def answers(records) -> list[str | None]:
    return [record.get("answer") for record in records]
