"""Writes data/example/: a small synthetic Classical <-> Modern Chinese instruction dataset.

Same record layout as the NTU ADL 2023 HW3 data ({"id", "instruction", "output"}, a JSON list)
and the same kinds of instruction templates, but every sentence is composed here from a small
hand-written glossary, so the project can ship it. Fixed seed: re-running rewrites identical files.

    python scripts/make_example_data.py            # -> data/example/{train,eval,test,predict}.json
The committed data/example/ is its output (the tests read it). No paper section.
"""
import argparse
import json
import random
import uuid
from pathlib import Path

# Glossary slots: (modern, classical) pairs.
PEOPLE = [
    ("我", "吾"), ("你", "汝"), ("他", "彼"), ("我們", "吾等"), ("你們", "汝等"),
    ("國王", "王"), ("皇帝", "帝"), ("將軍", "將軍"), ("大臣", "臣"), ("老人", "老者"),
    ("百姓", "民"), ("學生", "弟子"), ("老師", "師"), ("朋友", "友人"), ("使者", "使者"),
    ("太守", "太守"), ("士兵", "士卒"), ("商人", "賈人"), ("農夫", "農人"), ("母親", "母"),
]
PLACES = [
    ("京城", "京師"), ("山上", "山中"), ("河邊", "河畔"), ("宮殿", "宮"), ("家裡", "家"),
    ("市場", "市"), ("南方", "南方"), ("北方", "北地"), ("城裡", "城中"), ("鄉下", "鄉里"),
    ("軍營", "營"), ("朝廷", "朝"),
]
TIMES = [
    ("今天", "今日"), ("明天", "明日"), ("昨天", "昨日"), ("從前", "昔"), ("現在", "今"),
    ("早上", "旦"), ("晚上", "夜"), ("第二年", "明年"), ("不久", "未幾"), ("當時", "時"),
]
THINGS = [
    ("書", "書"), ("馬", "馬"), ("酒", "酒"), ("錢", "金"), ("衣服", "衣"), ("劍", "劍"),
    ("信", "書信"), ("糧食", "糧"), ("兵器", "兵"), ("土地", "地"), ("船", "舟"), ("牛", "牛"),
]
ACTS = [  # intransitive verb phrases
    ("回家", "歸"), ("讀書", "讀書"), ("出兵", "出兵"), ("答應", "許之"), ("休息", "息"),
    ("離開", "去"), ("出發", "行"), ("投降", "降"), ("進攻", "攻之"), ("哭泣", "泣"),
    ("逃走", "遁"), ("辭官", "辭官"),
]
TAKES = [  # transitive verbs, followed by a THING
    ("得到", "得"), ("拿走", "取"), ("賣掉", "鬻"), ("買", "市"), ("送出", "贈"), ("帶著", "攜"),
    ("看", "觀"), ("找", "求"),
]
FEELINGS = [
    ("很高興", "甚喜"), ("非常生氣", "大怒"), ("十分害怕", "大懼"), ("很難過", "甚悲"),
    ("很累", "甚疲"), ("很驚訝", "大驚"), ("很慚愧", "甚慚"),
]
NUMBERS = [("三", "三"), ("五", "五"), ("十", "十"), ("兩", "二"), ("二十", "二十")]

# Sentence templates: (modern, classical). Slot letters: S/S2 people, P place, T time,
# O thing, A act, V transitive verb, F feeling, N number.
SENTENCES = [
    ("{S}{T}要去{P}。", "{S}{T}將往{P}。"),
    ("{S}對{S2}說：「你為什麼不{A}？」", "{S}謂{S2}曰：「汝何故不{A}？」"),
    ("{S}聽到這件事，{F}。", "{S}聞之，{F}。"),
    ("{S}沒有{O}。", "{S}無{O}。"),
    ("{S}想要{V}{O}。", "{S}欲{V}{O}。"),
    ("如果{S}不{A}，{S2}就會{F}。", "若{S}不{A}，{S2}必{F}。"),
    ("這些{O}是{S}的。", "此{O}，{S}之物也。"),
    ("{S}已經{A}了。", "{S}已{A}矣。"),
    ("{S}在{P}住了{N}年。", "{S}居{P}{N}年。"),
    ("{S}問{S2}：「你要去哪裡？」", "{S}問{S2}曰：「汝將安往？」"),
    ("{T}，{S}帶著{O}離開了{P}。", "{T}，{S}攜{O}去{P}。"),
    ("{S}因為{F}，所以沒有{A}。", "{S}以{F}，故不{A}。"),
    ("{S}非常喜歡{O}。", "{S}甚好{O}。"),
    ("{S}不知道{S2}是什麼人。", "{S}不知{S2}何人也。"),
    ("{S}應該{A}。", "{S}當{A}。"),
    ("{T}，{S}派{S2}到{P}去{V}{O}。", "{T}，{S}遣{S2}之{P}{V}{O}。"),
    ("{S}能夠{A}嗎？", "{S}能{A}乎？"),
    ("{S}的{O}被{S2}拿走了。", "{S}之{O}為{S2}所取。"),
]

TO_CLASSICAL = [  # (instruction template, output prefix)
    ("{x}\n翻譯成文言文：", ""),
    ("翻譯成文言文：\n{x}", ""),
    ("翻譯成文言文：\n{x}\n答案：", ""),
    ("{x}\n幫我把這句話翻譯成文言文", ""),
    ("{x}\n把這句話翻譯成文言文：", ""),
    ("{x}\n翻譯成古文：", ""),
    ("{x}\n這句話在古代怎麼說：", ""),
    ("{x}\n這句話在中國古代怎麼說：", ""),
    ("將下面句子翻譯成文言文：\n{x}", ""),
]
TO_MODERN = [
    ("{x}\n翻譯成現代文：", ""),
    ("翻譯成現代文：\n{x}", ""),
    ("翻譯成現代文：\n{x}\n答案：", ""),
    ("{x}\n翻譯成白話文：", ""),
    ("文言文翻譯：\n{x}", "答案："),
    ("{x}\n幫我把這句話翻譯成現代文", ""),
    ("{x}\n把這句話翻譯成現代文。", ""),
    ("將下面句子翻譯成現代文：\n{x}", ""),
]

SLOTS = {"S": PEOPLE, "S2": PEOPLE, "P": PLACES, "T": TIMES, "O": THINGS, "A": ACTS,
         "V": TAKES, "F": FEELINGS, "N": NUMBERS}


def make_pair(rng):
    """One (modern, classical) sentence pair: one or two templates filled from the glossary."""
    modern, classical = [], []
    for _ in range(rng.choice([1, 1, 2])):
        m, c = rng.choice(SENTENCES)
        fill = {k: rng.choice(v) for k, v in SLOTS.items()}
        while fill["S2"] == fill["S"]:
            fill["S2"] = rng.choice(PEOPLE)
        modern.append(m.format(**{k: v[0] for k, v in fill.items()}))
        classical.append(c.format(**{k: v[1] for k, v in fill.items()}))
    return "".join(modern), "".join(classical)


def make_record(rng, pair, to_classical):
    modern, classical = pair
    template, prefix = rng.choice(TO_CLASSICAL if to_classical else TO_MODERN)
    source, target = (modern, classical) if to_classical else (classical, modern)
    rid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return {"id": rid, "instruction": template.format(x=source), "output": prefix + target}


def make_splits(seed, sizes):
    """sizes: {split name: record count}. No sentence, modern or classical, is in two records;
    half of each split asks for modern -> classical, half for classical -> modern."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < sum(sizes.values()):
        pair = make_pair(rng)
        if pair[0] not in seen and pair[1] not in seen:
            seen.update(pair)
            pairs.append(pair)
    splits, start = {}, 0
    for name, n in sizes.items():
        directions = [i % 2 == 0 for i in range(n)]
        rng.shuffle(directions)
        splits[name] = [make_record(rng, p, d) for p, d in zip(pairs[start:start + n], directions)]
        start += n
    return splits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/example")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=60)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--predict", type=int, default=20)
    args = ap.parse_args()

    sizes = {"train": args.train, "eval": args.eval, "test": args.test, "predict": args.predict}
    splits = make_splits(args.seed, sizes)
    # predict.json mimics the course's private_test.json: id and instruction only.
    splits["predict"] = [{"id": r["id"], "instruction": r["instruction"]} for r in splits["predict"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        path = out / f"{name}.json"
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path} ({len(records)} records)")


if __name__ == "__main__":
    main()
