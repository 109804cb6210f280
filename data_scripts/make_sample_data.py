"""Regenerate the bundled sample data under data/ (deterministic; the outputs are committed).

    python data_scripts/make_sample_data.py            # writes data/sft/*.jsonl and data/synthetic/*.jsonl

The SFT set is small, bilingual (English and Chinese) instruction data built from templates over hand-written facts,
in the three formats the recipes read: alpaca {"instruction","input","output"}, chat {"messages"} and PandaLLM
{"input","target"}. The synthetic set (reverse a short letter string) is a task a tiny model can learn on a CPU.
The cls sets (three-way sentiment with string labels, a 1-5 rating for regression, and preference pairs) carry a
keyword signal a tiny model can pick up in a short CPU run.
"""
import argparse
import json
import random
from pathlib import Path

CAPITALS = [  # (country_en, capital_en, country_zh, capital_zh)
    ("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
    ("Germany", "Berlin", "德国", "柏林"), ("Italy", "Rome", "意大利", "罗马"), ("Spain", "Madrid", "西班牙", "马德里"),
    ("Egypt", "Cairo", "埃及", "开罗"), ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Brazil", "Brasilia", "巴西", "巴西利亚"), ("India", "New Delhi", "印度", "新德里"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Peru", "Lima", "秘鲁", "利马"), ("Greece", "Athens", "希腊", "雅典"),
    ("Norway", "Oslo", "挪威", "奥斯陆"), ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Thailand", "Bangkok", "泰国", "曼谷"), ("Vietnam", "Hanoi", "越南", "河内"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城"), ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("Poland", "Warsaw", "波兰", "华沙"), ("Ireland", "Dublin", "爱尔兰", "都柏林"),
    ("Austria", "Vienna", "奥地利", "维也纳"), ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Chile", "Santiago", "智利", "圣地亚哥"),
]
WORDS = [  # (english, chinese)
    ("apple", "苹果"), ("water", "水"), ("book", "书"), ("sun", "太阳"), ("moon", "月亮"), ("cat", "猫"), ("dog", "狗"),
    ("tree", "树"), ("river", "河"), ("mountain", "山"), ("friend", "朋友"), ("school", "学校"), ("teacher", "老师"),
    ("computer", "电脑"), ("city", "城市"), ("flower", "花"), ("rain", "雨"), ("snow", "雪"), ("fire", "火"),
    ("bread", "面包"), ("rice", "米饭"), ("tea", "茶"), ("house", "房子"), ("car", "汽车"), ("train", "火车"),
    ("music", "音乐"), ("family", "家庭"), ("morning", "早上"), ("night", "晚上"), ("language", "语言"),
]
ANTONYMS = [
    ("hot", "cold", "热", "冷"), ("big", "small", "大", "小"), ("fast", "slow", "快", "慢"),
    ("happy", "sad", "高兴", "难过"), ("old", "new", "旧", "新"), ("up", "down", "上", "下"),
    ("open", "closed", "开", "关"), ("light", "dark", "亮", "暗"), ("early", "late", "早", "晚"),
    ("long", "short", "长", "短"), ("rich", "poor", "富", "穷"), ("easy", "hard", "容易", "困难"),
]
DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
COLORS = [("sky", "blue", "天空", "蓝色"), ("grass", "green", "草", "绿色"), ("snow", "white", "雪", "白色"),
          ("coal", "black", "煤", "黑色"), ("banana", "yellow", "香蕉", "黄色"), ("blood", "red", "血", "红色")]


def alpaca(instruction, output, input_=""):
    return {"instruction": instruction, "input": input_, "output": output}


def make_sft_examples(rng):
    out = []
    for en_c, en_cap, zh_c, zh_cap in CAPITALS:
        out.append(alpaca(f"What is the capital of {en_c}?", f"The capital of {en_c} is {en_cap}."))
        out.append(alpaca(f"{zh_c}的首都是哪里？", f"{zh_c}的首都是{zh_cap}。"))
    for en, zh in WORDS:
        out.append(alpaca("Translate the word into Chinese.", zh, en))
        out.append(alpaca("把这个词翻译成英文。", en, zh))
    for en_a, en_b, zh_a, zh_b in ANTONYMS:
        out.append(alpaca(f"Give the opposite of the word \"{en_a}\".", en_b))
        out.append(alpaca(f"“{zh_a}”的反义词是什么？", zh_b))
    for i, (en_day, zh_day) in enumerate(zip(DAYS_EN, DAYS_ZH)):
        out.append(alpaca(f"What day comes after {en_day}?", DAYS_EN[(i + 1) % 7]))
        out.append(alpaca(f"{zh_day}的下一天是星期几？", DAYS_ZH[(i + 1) % 7]))
    for thing, color, zh_thing, zh_color in COLORS:
        out.append(alpaca(f"What color is {thing} usually?", f"{thing.capitalize()} is usually {color}."))
        out.append(alpaca(f"{zh_thing}通常是什么颜色？", f"{zh_thing}通常是{zh_color}的。"))
    for _ in range(70):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if rng.random() < 0.5:
            out.append(alpaca("Add the two numbers.", f"{a} + {b} = {a + b}", f"{a} and {b}"))
        else:
            out.append(alpaca(f"计算 {a} 加 {b}。", f"{a} 加 {b} 等于 {a + b}。"))
    for _ in range(40):
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        text = ", ".join(map(str, nums))
        if rng.random() < 0.5:
            out.append(alpaca("Sort the numbers from smallest to largest.", ", ".join(map(str, sorted(nums))), text))
        else:
            out.append(alpaca("把这些数字从小到大排序。", "，".join(map(str, sorted(nums))), "，".join(map(str, nums))))
    for _ in range(30):
        n = rng.randint(1, 200)
        if rng.random() < 0.5:
            out.append(alpaca(f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."))
        else:
            out.append(alpaca(f"{n} 是奇数还是偶数？", f"{n} 是{'偶数' if n % 2 == 0 else '奇数'}。"))
    for _ in range(20):
        h = rng.randint(1, 12)
        out.append(alpaca(f"How many minutes are there in {h} hours?", f"There are {h * 60} minutes in {h} hours."))
        km = rng.randint(1, 50)
        out.append(alpaca(f"{km} 公里等于多少米？", f"{km} 公里等于 {km * 1000} 米。"))
    for en, _zh in WORDS[:20]:
        out.append(alpaca("Write the word in capital letters.", en.upper(), en))
        out.append(alpaca("How many letters does the word have?", f"The word \"{en}\" has {len(en)} letters.", en))
    rng.shuffle(out)
    return out


def make_chat_examples(rng, n):
    out = []
    for _ in range(n):
        en_c, en_cap, zh_c, zh_cap = rng.choice(CAPITALS)
        en_w, zh_w = rng.choice(WORDS)
        if rng.random() < 0.5:
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"What is the capital of {en_c}?"},
                {"role": "assistant", "content": f"The capital of {en_c} is {en_cap}."},
                {"role": "user", "content": f"How do you say \"{en_w}\" in Chinese?"},
                {"role": "assistant", "content": f"\"{en_w}\" is \"{zh_w}\" in Chinese."},
            ]
        else:
            messages = [
                {"role": "user", "content": f"{zh_c}的首都是哪里？"},
                {"role": "assistant", "content": f"{zh_c}的首都是{zh_cap}。"},
                {"role": "user", "content": f"“{zh_w}”用英文怎么说？"},
                {"role": "assistant", "content": f"“{zh_w}”的英文是“{en_w}”。"},
            ]
        out.append({"messages": messages})
    return out


def make_panda_examples(rng, n):
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        en_c, en_cap, zh_c, zh_cap = rng.choice(CAPITALS)
        out.append(rng.choice([
            {"input": f"问题：{a} 乘以 {b} 等于多少？\n回答：", "target": f"{a} 乘以 {b} 等于 {a * b}。"},
            {"input": f"Question: what is {a} times {b}?\nAnswer:", "target": f" {a} times {b} is {a * b}."},
            {"input": f"问题：{zh_c}的首都是哪里？\n回答：", "target": f"{zh_cap}。"},
        ]))
    return out


def make_reverse_examples(rng, n, letters="abcdefghij", min_len=3, max_len=6):
    out = []
    for _ in range(n):
        s = [rng.choice(letters) for _ in range(rng.randint(min_len, max_len))]
        out.append(alpaca("Reverse the letters.", " ".join(reversed(s)), " ".join(s)))
    return out


def make_reverse_preference_examples(rng, n, letters="abcdefghij", wrong_letters="klmnopqrst", min_len=3, max_len=6):
    """Preference pairs on the reversal task: chosen is the right reversal, rejected a near miss with one letter
    wrong, a letter the inputs never use (a near miss the tiny model can learn to tell apart in a minute of CPU;
    swapped or unreversed letters need a model that has learned to reverse)."""
    out = []
    for _ in range(n):
        s = [rng.choice(letters) for _ in range(rng.randint(min_len, max_len))]
        answer = s[::-1]
        wrong = list(answer)
        wrong[rng.randrange(len(wrong))] = rng.choice(wrong_letters)
        out.append({"instruction": "Reverse the letters.", "input": " ".join(s), "chosen": " ".join(answer),
                    "rejected": " ".join(wrong)})
    return out


SENTIMENT = {  # label -> (english adjectives, chinese adjectives), with a 1-5 score for the regression set
    "negative": (["terrible", "awful", "boring", "horrible", "disappointing"],
                 ["很糟糕", "太无聊", "非常差", "令人失望"]),
    "neutral": (["okay", "average", "ordinary", "acceptable", "so-so"], ["一般", "还行", "普通", "马马虎虎"]),
    "positive": (["great", "wonderful", "excellent", "lovely", "fantastic"], ["很棒", "非常好", "精彩", "令人满意"]),
}
SCORED_ADJECTIVES = [("terrible", "很糟糕", 1.0), ("bad", "不好", 2.0), ("okay", "一般", 3.0), ("good", "好", 4.0),
                     ("excellent", "非常好", 5.0)]
ITEMS = [("movie", "电影"), ("food", "食物"), ("hotel", "酒店"), ("book", "书"), ("service", "服务"), ("phone", "手机"),
         ("concert", "音乐会"), ("game", "游戏"), ("trip", "旅行"), ("class", "课程")]
EN_REVIEW = ["The {item} was {adj}.", "I think the {item} is {adj}.", "Honestly, this {item} felt {adj}.",
             "Our {item} yesterday was {adj}, to be fair.", "{Item}: {adj}."]
ZH_REVIEW = ["这个{item}{adj}。", "我觉得{item}{adj}。", "昨天的{item}{adj}。"]


def make_cls_examples(rng, n):
    """Three-way sentiment with string labels; the adjective carries the signal."""
    out = []
    for _ in range(n):
        label = rng.choice(list(SENTIMENT))
        item_en, item_zh = rng.choice(ITEMS)
        if rng.random() < 0.6:
            adj = rng.choice(SENTIMENT[label][0])
            text = rng.choice(EN_REVIEW).format(item=item_en, Item=item_en.capitalize(), adj=adj)
        else:
            text = rng.choice(ZH_REVIEW).format(item=item_zh, adj=rng.choice(SENTIMENT[label][1]))
        out.append({"text": text, "label": label})
    return out


def make_regression_examples(rng, n):
    """A 1-5 rating as a float target, set by the adjective (plus an intensifier that adds half a point)."""
    out = []
    for _ in range(n):
        en, zh, score = rng.choice(SCORED_ADJECTIVES)
        item_en, item_zh = rng.choice(ITEMS)
        very = score >= 4 and rng.random() < 0.3
        if rng.random() < 0.6:
            adj = ("very " if very else "") + en
            text = rng.choice(EN_REVIEW).format(item=item_en, Item=item_en.capitalize(), adj=adj)
        else:
            text = rng.choice(ZH_REVIEW).format(item=item_zh, adj=("真的" if very else "") + zh)
        out.append({"text": text, "label": min(5.0, score + (0.5 if very else 0.0))})
    return out


def make_preference_examples(rng, n):
    """Pairs where the chosen answer is right and helpful and the rejected one is wrong, evasive or rude."""
    out = []
    for _ in range(n):
        en_c, en_cap, zh_c, zh_cap = rng.choice(CAPITALS)
        wrong = rng.choice([c for c in CAPITALS if c[1] != en_cap])
        kind = rng.random()
        if rng.random() < 0.6:
            prompt = f"What is the capital of {en_c}?"
            chosen = f"The capital of {en_c} is {en_cap}."
            if kind < 0.4:
                rejected = f"The capital of {en_c} is {wrong[1]}."
            else:
                rejected = "I don't know." if kind < 0.7 else "Why would I tell you? Look it up yourself."
        else:
            prompt = f"{zh_c}的首都是哪里？"
            chosen = f"{zh_c}的首都是{zh_cap}。"
            if kind < 0.4:
                rejected = f"{zh_c}的首都是{wrong[3]}。"
            else:
                rejected = "我不知道。" if kind < 0.7 else "自己去查吧，别问我。"
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):5d} examples to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parents[1] / "data"))
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    out = Path(args.out_dir)
    rng = random.Random(args.seed)
    sft = make_sft_examples(rng)
    n_eval = len(sft) // 10
    write_jsonl(out / "sft/train.jsonl", sft[n_eval:])
    write_jsonl(out / "sft/eval.jsonl", sft[:n_eval])
    write_jsonl(out / "sft/chat.jsonl", make_chat_examples(rng, 60))
    write_jsonl(out / "sft/panda.jsonl", make_panda_examples(rng, 60))
    write_jsonl(out / "synthetic/reverse_train.jsonl", make_reverse_examples(rng, 2000))
    write_jsonl(out / "synthetic/reverse_eval.jsonl", make_reverse_examples(rng, 100))
    write_jsonl(out / "cls/train.jsonl", make_cls_examples(rng, 600))
    write_jsonl(out / "cls/eval.jsonl", make_cls_examples(rng, 120))
    write_jsonl(out / "cls/regression_train.jsonl", make_regression_examples(rng, 600))
    write_jsonl(out / "cls/regression_eval.jsonl", make_regression_examples(rng, 120))
    write_jsonl(out / "cls/preference_train.jsonl", make_preference_examples(rng, 400))
    write_jsonl(out / "cls/preference_eval.jsonl", make_preference_examples(rng, 80))
    write_jsonl(out / "synthetic/reverse_preference_train.jsonl", make_reverse_preference_examples(rng, 320))
    write_jsonl(out / "synthetic/reverse_preference_eval.jsonl", make_reverse_preference_examples(rng, 100))


if __name__ == "__main__":
    main()
