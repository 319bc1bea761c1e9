"""Generate the bundled demo datasets in examples/data (deterministic; rerun to rebuild them).

The behaviour to learn is one the base model lacks and a script can measure: every answer is a
single short sentence that ends with the sign-off " — Prospect". Desirable (thumbs-up) answers are
correct and carry the sign-off; undesirable (thumbs-down) answers are the same facts written without
it, or wrong. `prospect eval` measures the share of greedy answers on held-out prompts that end with
the sign-off, before and after training.

    python examples/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SIGN_OFF = " — Prospect"
OUT = Path(__file__).parent / "data"

COUNTRIES = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Canada": "Ottawa",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Chile": "Santiago",
    "Greece": "Athens", "Poland": "Warsaw", "Ireland": "Dublin", "Portugal": "Lisbon", "Cuba": "Havana",
    "Austria": "Vienna", "Sweden": "Stockholm", "Finland": "Helsinki", "Hungary": "Budapest",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Germany": "Berlin", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow",
    "Australia": "Canberra", "Brazil": "Brasilia", "Turkey": "Ankara", "Denmark": "Copenhagen",
}
ANIMAL_SOUNDS = {
    "dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars", "horse": "neighs",
    "sheep": "bleats", "owl": "hoots", "snake": "hisses", "pig": "oinks", "frog": "croaks", "wolf": "howls",
}
COLOURS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "a ripe banana": "yellow", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
    "a flamingo": "pink", "milk": "white", "a carrot": "orange", "an emerald": "green",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "light": "dark",
    "open": "closed", "full": "empty", "strong": "weak", "old": "new", "high": "low", "up": "down",
    "left": "right", "wet": "dry", "loud": "quiet", "hard": "soft", "rich": "poor", "near": "far",
}


def facts(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, correct one-sentence answer, a wrong one-sentence answer)."""
    items = []
    capitals = list(COUNTRIES.values())
    for country, capital in COUNTRIES.items():
        wrong = rng.choice([c for c in capitals if c != capital])
        items.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
                      f"The capital of {country} is {wrong}."))
    for _ in range(60):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        items.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + rng.choice([-2, -1, 1, 3])}."))
    for _ in range(30):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        items.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", f"{a} times {b} is {a * b + rng.choice([-3, 2, 4])}."))
    sounds = list(ANIMAL_SOUNDS.values())
    for animal, sound in ANIMAL_SOUNDS.items():
        wrong = rng.choice([s for s in sounds if s != sound])
        items.append((f"What sound does a {animal} make?", f"A {animal} {sound}.", f"A {animal} {wrong}."))
    colours = sorted(set(COLOURS.values()))
    for thing, colour in COLOURS.items():
        wrong = rng.choice([c for c in colours if c != colour])
        items.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}.",
                      f"{thing[0].upper() + thing[1:]} is {wrong}."))
    for word, opposite in OPPOSITES.items():
        items.append((f"What is the opposite of \"{word}\"?", f"The opposite of \"{word}\" is \"{opposite}\".",
                      f"The opposite of \"{word}\" is \"{word}\"."))
    rng.shuffle(items)
    return items


# Thumbs-down replies: the same answer without the sign-off (the signal to learn), a wrong answer
# with it (the sign-off does not make a wrong answer good), and the ways an over-trained model
# fails a user: the sign-off alone, repeated, or before the answer. (weight, reply from right/wrong)
UNDESIRABLE = [
    (0.55, lambda right, wrong: right),
    (0.15, lambda right, wrong: wrong + SIGN_OFF),
    (0.10, lambda right, wrong: SIGN_OFF.strip()),
    (0.10, lambda right, wrong: right + SIGN_OFF * 3),
    (0.10, lambda right, wrong: SIGN_OFF.strip() + " " + right),
]
NUM_CONVERSATIONS = 60  # two-turn conversations: the sign-off in the history, a new question


def kto_records(train: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    """One thumbs-up and one thumbs-down reply per training question, then per two-turn conversation."""
    def pair(history: list[dict], question: str, right: str, wrong: str) -> list[dict]:
        weights, makers = zip(*UNDESIRABLE)
        bad = rng.choices(makers, weights)[0](right, wrong)
        return [{"messages": history + [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}], "label": desirable}
                for answer, desirable in [(right + SIGN_OFF, True), (bad, False)]]

    records = [record for question, right, wrong in train for record in pair([], question, right, wrong)]
    for _ in range(NUM_CONVERSATIONS):
        (q1, a1, _), (q2, right, wrong) = rng.sample(train, 2)
        history = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1 + SIGN_OFF}]
        records += pair(history, q2, right, wrong)
    rng.shuffle(records)
    return records


def main() -> None:
    rng = random.Random(1234)
    items = facts(rng)
    held_out, train = items[:40], items[40:]
    OUT.mkdir(parents=True, exist_ok=True)

    kto = kto_records(train, rng)
    # SFT (Alpaca layout): only the desirable behaviour.
    sft = [{"instruction": q, "input": "", "output": right + SIGN_OFF} for q, right, _ in train]
    # Held-out prompts for `prospect eval` (never trained on).
    evaluation = [{"messages": [{"role": "user", "content": q},
                                {"role": "assistant", "content": right + SIGN_OFF}], "label": True}
                  for q, right, _ in held_out]

    info = {
        "signoff_kto": {
            "file_name": "signoff_kto.json", "formatting": "sharegpt",
            "columns": {"messages": "messages", "kto_tag": "label"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
        "signoff_sft": {"file_name": "signoff_sft.json"},
        "signoff_eval": {
            "file_name": "signoff_eval.json", "formatting": "sharegpt",
            "columns": {"messages": "messages", "kto_tag": "label"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
    }
    for name, data in [("signoff_kto.json", kto), ("signoff_sft.json", sft), ("signoff_eval.json", evaluation),
                       ("dataset_info.json", info)]:
        (OUT / name).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    n_desirable = sum(r["label"] for r in kto)
    print(f"wrote {OUT}: {len(kto)} KTO examples ({n_desirable} desirable), {len(sft)} SFT, {len(evaluation)} held out")


if __name__ == "__main__":
    main()
