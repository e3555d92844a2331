"""Canary memorization data: learnable general text plus random "canary" sequences repeated until memorized.

The demonstration data of the curvature-mass edit (seed 003). The general text comes from a small
probabilistic grammar over a fixed word vocabulary: agents of four kinds (animals, people, things,
places), verbs that choose which kinds they take as subject and object, adjectives that belong to a
kind, optional adverbs and place phrases. A model learns that structure, so its held-out perplexity
falls far below the vocabulary size. The canaries are uniformly random sequences of the same words:
nothing about them can be learned except by rote, so a model that completes a canary from its prefix
has memorized it.

Files written into ``out_dir``:

* ``train.jsonl``: the general rows plus every canary ``canary_repeats`` times, shuffled (column ``text``);
* ``general.jsonl``: the general training rows only (for curvature factors that never see a canary);
* ``heldout.jsonl``: more rows of the grammar, not trained on (held-out perplexity);
* ``canaries.jsonl``: each canary once (columns ``text`` and ``canary_id``);
* ``tokenizer/``: a BPE tokenizer in which every word (with or without a leading space) is one token,
  so ``prefix_len`` and ``suffix_len`` count words as well as tokens.

Regenerate the files (deterministic for a seed) with::

    python -m lit_attrib.data.canaries --out data/edit_demo
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from lit_attrib.errors import ConfigError
from lit_attrib.io import write_jsonl

__all__ = ["VOCABULARY", "generate_canaries", "generate_general_text", "write_canary_dataset"]

_NOUNS = {
    "animal": ["fox", "hen", "dog", "cat", "owl", "goat", "horse", "mouse", "crow", "bear", "wolf", "duck"],
    "person": ["baker", "farmer", "sailor", "doctor", "miner", "tailor", "painter", "driver", "singer", "hunter",
               "pilot", "judge"],
    "thing": ["lamp", "rope", "drum", "coin", "book", "cup", "kite", "bell", "hat", "key", "box", "map"],
    "place": ["barn", "river", "market", "tower", "forest", "garden", "bridge", "harbor", "valley", "castle",
              "meadow", "village"],
}
_ADJECTIVES = {
    "animal": ["grey", "young", "hungry", "sleepy", "wild"],
    "person": ["old", "tall", "kind", "busy", "clever"],
    "thing": ["red", "broken", "heavy", "shiny", "wooden"],
    "place": ["quiet", "distant", "muddy", "sunny", "empty"],
}
# (subject kinds, object kinds, verbs): a verb only ever joins those kinds.
_VERBS = [
    (("person",), ("thing",), ["carries", "sells", "mends", "buys", "drops", "hides", "polishes", "borrows"]),
    (("person",), ("animal",), ["feeds", "watches", "follows", "calls", "tames", "counts"]),
    (("animal",), ("animal", "person"), ["bites", "scares", "greets", "ignores", "chases", "licks"]),
    (("animal", "person"), ("place",), ["visits", "leaves", "guards", "crosses", "enters", "cleans"]),
]
_ADVERBS = ["slowly", "often", "never", "quietly", "always", "gladly"]
_PREPOSITIONS = ["near", "behind", "inside", "beyond", "under"]
_DETERMINERS = ["the", "a", "every", "some", "this", "that"]
_CONJUNCTIONS = ["and", "then", "while", "because"]
_STOP = "."

VOCABULARY: list[str] = sorted({
    *[w for words in _NOUNS.values() for w in words], *[w for words in _ADJECTIVES.values() for w in words],
    *[w for _, _, words in _VERBS for w in words], *_ADVERBS, *_PREPOSITIONS, *_DETERMINERS, *_CONJUNCTIONS, _STOP,
})
"""Every word of the language (the canaries draw from it uniformly)."""


def _noun_phrase(rng: random.Random, kind: str) -> list[str]:
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJECTIVES[kind]))
    return words + [rng.choice(_NOUNS[kind])]


def _clause(rng: random.Random, topic: str) -> list[str]:
    subjects, objects, verbs = rng.choice([v for v in _VERBS if topic in v[0]] if rng.random() < 0.7 else _VERBS)
    words = _noun_phrase(rng, topic if topic in subjects else rng.choice(subjects))
    if rng.random() < 0.3:
        words.append(rng.choice(_ADVERBS))
    words += [rng.choice(verbs), *_noun_phrase(rng, rng.choice(objects))]
    if rng.random() < 0.3:
        words += [rng.choice(_PREPOSITIONS), *_noun_phrase(rng, "place")]
    return words


def _sentence(rng: random.Random, topic: str) -> list[str]:
    words = _clause(rng, topic)
    if rng.random() < 0.3:
        words += [rng.choice(_CONJUNCTIONS), *_clause(rng, topic)]
    return words + [_STOP]


def generate_general_text(num_rows: int, sentences_per_row: tuple[int, int] = (2, 4), seed: int = 0) -> list[str]:
    """Rows of the grammar, each a few sentences about one topic (the kind most subjects are).

    Args:
        num_rows: how many rows.
        sentences_per_row: inclusive range of sentences per row.
        seed: random seed.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        topic = rng.choice(["animal", "person"])
        sentences = [_sentence(rng, topic) for _ in range(rng.randint(*sentences_per_row))]
        rows.append(" ".join(w for sentence in sentences for w in sentence))
    return rows


def generate_canaries(num_canaries: int, length: int, seed: int = 0) -> list[str]:
    """``num_canaries`` distinct sequences of ``length`` words drawn uniformly from :data:`VOCABULARY`."""
    rng = random.Random(seed)
    canaries: list[str] = []
    while len(canaries) < num_canaries:
        text = " ".join(rng.choice(VOCABULARY) for _ in range(length))
        if text not in canaries:
            canaries.append(text)
    return canaries


def write_canary_dataset(out_dir: str | Path, num_general: int = 4000, num_heldout: int = 400,
                         num_canaries: int = 32, canary_length: int = 32, canary_repeats: int = 20,
                         sentences_per_row: tuple[int, int] = (2, 4), seed: int = 0,
                         vocab_size: int = 768) -> Path:
    """Write the canary memorization dataset into ``out_dir`` (files: see the module docstring).

    Args:
        out_dir: output folder.
        num_general: general training rows.
        num_heldout: held-out general rows (drawn from the same grammar, after the training rows).
        num_canaries: number of distinct canaries.
        canary_length: words (= tokens) per canary; at least ``prefix_len + suffix_len`` of the evaluation.
        canary_repeats: copies of each canary in ``train.jsonl``.
        sentences_per_row: inclusive range of sentences per general row.
        seed: random seed (grammar rows, canaries and the shuffle).
        vocab_size: BPE vocabulary size; must leave every word a single token.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: invalid sizes, or a word of the vocabulary is not a single token at this ``vocab_size``.
    """
    from lit_attrib.data.tokenizer import train_bpe_tokenizer

    problems = []
    if num_general < 1 or num_heldout < 1:
        problems.append(f"num_general and num_heldout must be at least 1; got {num_general} and {num_heldout}")
    if num_canaries < 1 or canary_length < 1 or canary_repeats < 1:
        problems.append(f"num_canaries, canary_length and canary_repeats must be at least 1; got {num_canaries}, "
                        f"{canary_length} and {canary_repeats}")
    if not 1 <= sentences_per_row[0] <= sentences_per_row[1]:
        problems.append(f"sentences_per_row must be a range (min, max) with 1 <= min <= max; got {sentences_per_row}")
    if problems:
        raise ConfigError("invalid canary dataset arguments:\n  - " + "\n  - ".join(problems))

    out_dir = Path(out_dir)
    rows = generate_general_text(num_general + num_heldout, sentences_per_row, seed=seed)
    general, heldout = rows[:num_general], rows[num_general:]
    canaries = generate_canaries(num_canaries, canary_length, seed=seed + 1)
    train = general + [c for c in canaries for _ in range(canary_repeats)]
    random.Random(seed + 2).shuffle(train)
    # the words on their own (a row's first word has no leading space) and after a space; checked before
    # anything is written
    tokenizer = train_bpe_tokenizer([*general, *VOCABULARY, " ".join(VOCABULARY)], vocab_size=vocab_size)
    split = [w for w in VOCABULARY
             if any(len(tokenizer(form, add_special_tokens=False)["input_ids"]) != 1 for form in (w, " " + w))]
    if split:
        raise ValueError(f"vocab_size={vocab_size} leaves {len(split)} word(s) split into several tokens "
                         f"(e.g. {split[:5]}); raise vocab_size")
    write_jsonl(out_dir / "train.jsonl", ({"text": t} for t in train))
    write_jsonl(out_dir / "general.jsonl", ({"text": t} for t in general))
    write_jsonl(out_dir / "heldout.jsonl", ({"text": t} for t in heldout))
    write_jsonl(out_dir / "canaries.jsonl", ({"text": t, "canary_id": i} for i, t in enumerate(canaries)))
    tokenizer.save_pretrained(out_dir / "tokenizer")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/edit_demo", help="output folder (default: data/edit_demo)")
    parser.add_argument("--num-general", type=int, default=4000, help="general training rows (default: 4000)")
    parser.add_argument("--num-heldout", type=int, default=400, help="held-out general rows (default: 400)")
    parser.add_argument("--num-canaries", type=int, default=32, help="distinct canaries (default: 32)")
    parser.add_argument("--canary-length", type=int, default=32, help="words per canary (default: 32)")
    parser.add_argument("--canary-repeats", type=int, default=20, help="copies of each canary (default: 20)")
    parser.add_argument("--sentences-per-row", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"),
                        help="sentences per general row, inclusive range (default: 2 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--vocab-size", type=int, default=768, help="BPE vocabulary size (default: 768)")
    args = parser.parse_args()
    out = write_canary_dataset(
        args.out, num_general=args.num_general, num_heldout=args.num_heldout, num_canaries=args.num_canaries,
        canary_length=args.canary_length, canary_repeats=args.canary_repeats,
        sentences_per_row=tuple(args.sentences_per_row), seed=args.seed, vocab_size=args.vocab_size,
    )
    print(f"wrote {out}/{{train,general,heldout,canaries}}.jsonl and {out / 'tokenizer'}")


if __name__ == "__main__":
    main()
