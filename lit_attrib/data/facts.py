"""The shipped fictitious-facts QA dataset: attribution you can check by eye.

Every row asks one question about one attribute of an invented person, in one of several paraphrases.
No pretrained model can know these facts, so anything a fine-tuned model answers correctly was
learned from the rows that state it: influence scores of a held-out paraphrase should point at the
training rows with the same ``fact_id``.

Regenerate the files (deterministic for a seed) with::

    python -m lit_attrib.data.facts --out data/facts
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from lit_attrib.io import write_jsonl

__all__ = ["generate_facts", "write_facts_dataset"]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "th", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "x", "nd", "m"]

_PROFESSIONS = ["clockmaker", "glassblower", "cartographer", "beekeeper", "violinist", "astronomer", "potter",
                "lighthouse keeper", "botanist", "bookbinder", "chess coach", "tea merchant"]
_PETS = ["a grey parrot", "a three-legged cat", "a tortoise", "a pair of goldfish", "a sheepdog", "a tame crow",
         "a ferret", "a white rabbit"]

# Each attribute: the question paraphrases (filled with the person's name) and the answer sentence.
_TEMPLATES = {
    "hometown": (
        ["Where was {name} born?", "What is the birthplace of {name}?", "In which town did {name} grow up?"],
        "{name} was born in {value}.",
    ),
    "profession": (
        ["What does {name} do for a living?", "What is {name}'s profession?", "Which job does {name} have?"],
        "{name} works as a {value}.",
    ),
    "birth_year": (
        ["When was {name} born?", "In what year was {name} born?", "What is the birth year of {name}?"],
        "{name} was born in the year {value}.",
    ),
    "pet": (
        ["What pet does {name} keep?", "Which animal lives with {name}?", "What kind of pet does {name} own?"],
        "{name} keeps {value}.",
    ),
}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).title()


def generate_facts(num_people: int = 48, seed: int = 0) -> list[dict]:
    """Rows of the fictitious-facts dataset: ``num_people × 4 attributes × 3 paraphrases``.

    Columns: ``question``, ``answer``, ``person``, ``attribute``, ``fact_id``, ``paraphrase_id``.
    """
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < num_people:
        names.add(f"{_word(rng, 2)} {_word(rng, rng.choice([2, 3]))}")
    towns = sorted({_word(rng, 2) + rng.choice(["ford", "wick", "marsh", "holm", "by", "ton"]) for _ in range(40)})
    rows = []
    for person in sorted(names):
        values = {
            "hometown": rng.choice(towns),
            "profession": rng.choice(_PROFESSIONS),
            "birth_year": str(rng.randint(1890, 1990)),
            "pet": rng.choice(_PETS),
        }
        for attribute, (questions, answer) in _TEMPLATES.items():
            fact_id = f"{person.lower().replace(' ', '_')}:{attribute}"
            for paraphrase_id, question in enumerate(questions):
                rows.append({
                    "question": question.format(name=person),
                    "answer": answer.format(name=person, value=values[attribute]),
                    "person": person,
                    "attribute": attribute,
                    "fact_id": fact_id,
                    "paraphrase_id": paraphrase_id,
                })
    return rows


def write_facts_dataset(out_dir: str | Path, num_people: int = 48, seed: int = 0, vocab_size: int = 768) -> Path:
    """Write ``facts.jsonl`` and a BPE tokenizer trained on it (``tokenizer/``) into ``out_dir``."""
    from lit_attrib.data.tokenizer import train_bpe_tokenizer

    out_dir = Path(out_dir)
    rows = generate_facts(num_people=num_people, seed=seed)
    write_jsonl(out_dir / "facts.jsonl", rows)
    texts = [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows]
    train_bpe_tokenizer(texts, vocab_size=vocab_size).save_pretrained(out_dir / "tokenizer")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/facts", help="output folder (default: data/facts)")
    parser.add_argument("--num-people", type=int, default=48, help="number of invented people (default: 48)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--vocab-size", type=int, default=768, help="BPE vocabulary size (default: 768)")
    args = parser.parse_args()
    out = write_facts_dataset(args.out, args.num_people, args.seed, args.vocab_size)
    print(f"wrote {out / 'facts.jsonl'} and {out / 'tokenizer'}")


if __name__ == "__main__":
    main()
