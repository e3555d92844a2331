"""A small offline stand-in for ``openai/gsm8k``: integer arithmetic word problems in GSM8K's format.

:func:`generate_problems` draws, deterministically for a seed, short problems about a person and some
objects (one to three of + − × ÷ steps) with reasoning lines and a final ``#### N`` answer, as in
``openai/gsm8k``. The names and objects it draws from (:data:`PEOPLE`, :data:`OBJECTS`) are also
what :mod:`lit_attrib.data.gsm8k_noise` falls back on when a question names none.
:func:`lit_attrib.data.gsm8k.write_gsm8k_tiny` writes them to ``data/gsm8k_tiny``.
"""

from __future__ import annotations

import random

__all__ = ["OBJECTS", "PEOPLE", "generate_problems"]

PEOPLE = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Max", "he"),
          ("Lily", "she"), ("Ben", "he"), ("Emma", "she"), ("Noah", "he"), ("Nora", "she"), ("Omar", "he"),
          ("Ruby", "she"), ("Jack", "he"), ("Ella", "she"), ("Tom", "he")]
OBJECTS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "stamps", "shells", "beads",
           "balloons", "oranges", "buttons", "crayons", "eggs", "flowers"]
_CONTAINERS = [("bag", "bags"), ("box", "boxes"), ("pack", "packs"), ("jar", "jars")]
_FINAL_QUESTIONS = ["How many {obj} does {name} have now?", "How many {obj} does {name} end up with?",
                    "How many {obj} does {name} have at the end?"]


def _pronouns(subject: str) -> dict[str, str]:
    return {"she": {"pron": "she", "obj_pron": "her", "pos": "her"},
            "he": {"pron": "he", "obj_pron": "him", "pos": "his"}}[subject]


def _problem(rng: random.Random) -> dict:
    """One problem: sentences, reasoning lines and the structured calculations ``[a, op, b, result]``."""
    (name, subject), (other, _) = rng.sample(PEOPLE, 2)
    p = {"name": name, "other": other, "obj": rng.choice(OBJECTS), **_pronouns(subject)}
    sentences, lines, calculations = [], [], []

    def calc(a: int, op: str, b: int, result: int, line: str) -> None:
        calculations.append([a, op, b, result])
        lines.append(line.format(calc=f"{a} {op} {b} = {result}", **p))

    if rng.random() < 0.3:  # the setup itself is a multiplication
        (one, many), k, m = rng.choice(_CONTAINERS), rng.randint(2, 6), rng.randint(2, 9)
        value = k * m
        sentences.append(f"{name} has {k} {many} with {m} {p['obj']} in each {one}.")
        calc(k, "*", m, value, "{name} starts with {calc} {obj}.")
        steps = rng.randint(0, 2)
    else:
        value = rng.randint(5, 40)
        sentences.append(f"{name} has {value} {p['obj']}.")
        steps = rng.randint(1, 2)
    for _ in range(steps):
        ops = ["+"] + (["-"] if value >= 3 else []) + (["*"] if value <= 40 else [])
        ops += ["/"] if any(value % d == 0 for d in (2, 3, 4)) else []
        op = rng.choice(ops)
        then = rng.choice(["", "Then "])
        pron = p["pron"] if then else p["pron"].capitalize()
        if op == "+":
            k = rng.randint(2, 15)
            sentence = rng.choice(["{then}{pron} buys {k} more {obj}.",
                                   "{then}{other} gives {obj_pron} {k} more {obj}.",
                                   "{then}{pron} finds {k} more {obj}."])
            result = value + k
            calc(value, "+", k, result, "After that, {name} has {calc} {obj}.")
        elif op == "-":
            k = rng.randint(1, value - 1)
            sentence = rng.choice(["{then}{pron} gives {k} {obj} to {other}.", "{then}{pron} loses {k} {obj}.",
                                   "{then}{pron} sells {k} {obj}."])
            result = value - k
            calc(value, "-", k, result, "After that, {name} has {calc} {obj}.")
        elif op == "*" and rng.random() < 0.5:
            (one, many), k, m = rng.choice(_CONTAINERS), rng.randint(2, 5), rng.randint(2, 9)
            sentence = f"{{then}}{{pron}} buys {k} {many} with {m} {{obj}} in each {one}."
            calc(k, "*", m, k * m, "{name} buys {calc} {obj}.")
            result = value + k * m
            calc(value, "+", k * m, result, "After that, {name} has {calc} {obj}.")
        elif op == "*":
            k = rng.choice([2, 3])
            sentence = "{then}{pron} " + ("doubles" if k == 2 else "triples") + " {pos} {obj}."
            result = value * k
            calc(value, "*", k, result, "After that, {name} has {calc} {obj}.")
        else:
            k = rng.choice([d for d in (2, 3, 4) if value % d == 0])
            sentence = "{then}{pron} puts {pos} {obj} into {k} equal piles and keeps one pile."
            result = value // k
            calc(value, "/", k, result, "One pile has {calc} {obj}.")
        sentences.append(sentence.format(then=then, k=k, **{**p, "pron": pron}))
        value = result
    sentences.append(rng.choice(_FINAL_QUESTIONS).format(**p))
    return {"question": " ".join(sentences), "answer": "\n".join(lines + [f"#### {value}"]),
            "calculations": calculations, "result": value}


def generate_problems(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct GSM8K-style arithmetic word problems (deterministic for a seed).

    Each question has 2–4 short sentences (a person, objects, quantities, one to three of
    + − × ÷ steps) and ends with the question asked; integer numbers stay small (below ~200).

    Args:
        n: number of problems.
        seed: random seed.

    Returns:
        Rows with ``question``, ``answer`` (reasoning lines such as ``After that, Mia has 12 + 7 = 19
        apples.`` and a final ``#### 19`` line, as in ``openai/gsm8k``), ``calculations`` (the
        structured steps ``[a, op, b, result]``, op in ``+ - * /``) and ``result`` (the final answer).
    """
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        row = _problem(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows
