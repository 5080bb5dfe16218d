"""The built-in demo task: short generated facts that only the sender's context can answer.

Each context holds one or two facts such as "Bob lives in Brackenford." or "Alice's code is 4821."; the question asks
about one of them and the receiver's answer starts with a completion prefix ("Bob lives in"), so even a 135M model
answers with the fact itself. Towns are invented and codes random, so the receiver alone cannot guess them.
"""

from __future__ import annotations

import random

from kvcomm.tasks.base import Example, TaskSplit

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Leo",
         "Maria", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tina", "Victor"]
TOWNS = ["Brackenford", "Eastmere", "Ollerby", "Quillhaven", "Dunmarsh", "Fenwick Cross", "Harrowgate",
         "Marlowby", "Pemberdale", "Ravensholt", "Sedgefield", "Thornwick", "Wexcombe", "Yarrowton",
         "Ashbourne Vale", "Caldermoor", "Glenhollow", "Kingsbrook", "Lowerby", "Nettlecombe"]

DEFAULT_SIZE = 30
CALIBRATION_SIZE = 10
FACTS_PER_CONTEXT = (1, 2)
MAX_NEW_TOKENS = 8


def _fact(rng: random.Random, name: str) -> tuple[str, str, str, str]:
    """(fact sentence, question, answer prefix, gold) for one person."""
    if rng.random() < 0.5:
        town = rng.choice(TOWNS)
        return f"{name} lives in {town}.", f"Where does {name} live?", f"{name} lives in", town
    code = str(rng.randint(1000, 9999))
    return f"{name}'s code is {code}.", f"What is {name}'s code?", f"{name}'s code is", code


def generate_items(count: int, seed: int, prefix: str) -> list[Example]:
    """``count`` items from a seeded generator; ids are ``{prefix}-{index:04d}``."""
    rng = random.Random(seed)
    items = []
    for index in range(count):
        people = rng.sample(NAMES, rng.choice(FACTS_PER_CONTEXT))
        facts = [_fact(rng, name) for name in people]
        sentence, question, answer_prefix, gold = facts[rng.randrange(len(facts))]
        context = " ".join(fact[0] for fact in facts)
        items.append(Example.qa(context=context, question=question, answers=[gold], id=f"{prefix}-{index:04d}",
                                max_new_tokens=MAX_NEW_TOKENS, answer_prefix=answer_prefix))
    return items


def load(data_dir: object = None) -> TaskSplit:
    """The demo needs no data files; ``data_dir`` is ignored."""
    return TaskSplit(test=generate_items(DEFAULT_SIZE * 10, seed=42, prefix="demo"),
                     calibration=generate_items(CALIBRATION_SIZE, seed=7, prefix="demo-calib"))
