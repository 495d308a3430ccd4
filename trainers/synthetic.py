"""Synthetic data for RxT: a fact-recall dialogue task that a stateless model cannot solve
(docs/spec.md#memory-evaluation, docs/experiments/memory-in-15-cpu-minutes.md).

The user states personal facts ("My cat is called Brindle."), the assistant acknowledges them briefly ("Noted: your
cat is called Brindle."), and later turns ask about them ("What is my cat called?" -> "Your cat is called
Brindle.") after distractor turns (chit-chat, other facts). Everything is generated procedurally and deterministically
from a seed; `scripts/make_synthetic_data.py` is the command-line front end.

Value pools
    Every attribute (`ATTRIBUTES`) has `POOL_SIZES["validation"] + POOL_SIZES["test"]` = 100 + 200 held-out values
    and up to `POOL_SIZES["train"]` = 4000 training values (fewer where the attribute has fewer candidates: 324 for
    the word-combination attributes), built by combination (syllable-built names and towns, 4-digit codes, modifier x colour,
    flavour x dish, domain x role, activity x object). The pools are fixed (built from the constant `POOL_SEED`, never
    from the episode seed), all values are distinct across attributes, and the three splits hold **disjoint** values,
    so a model can only answer a test question by carrying the value through its memory. Values are 1-2 words.

Files (all JSON Lines, UTF-8, one object per line), written by `write_synthetic_data` / the CLI:
    - `pretrain_{train,validation}.jsonl`: `{"text": str}` -- a few statements, questions, answers and chit-chat
      joined into one paragraph (stage 1 / tokenizer corpus).
    - `sft_{train,validation}.jsonl`: `{"query": str, "answer": str}` -- single, unconnected turns (stage 2): a
      statement and its acknowledgement, a question and an answer (with a random value: no memory in stage 2), or
      chit-chat.
    - `dialogues_paraphrase_test.jsonl` (`style="diverse"` only): test episodes in the held-out templates.
    - `dialogues_{train,validation,test}.jsonl` (`dialogues_long_range_*.jsonl` with `--long-range`): episodes for
      stages 3-5 and for the memory evaluation (`scripts/eval_memory.py --data`)::

          {"query": str, "answer": str,                       # turn 0
           "interactions": [{"query": str, "answer": str}, ...],  # turns 1 .. n-1
           "probes": [{"turn": int, "distance": int, "attribute": str, "expected": str}, ...]}

      `probes[j].turn` indexes the whole turn list (0 = the top-level query/answer, k = `interactions[k-1]`); that
      turn's query asks about an attribute that was stated in turn `turn - distance` (distance 1 = the question is the
      very next turn), `expected` is the stated value. Guarantees: every episode has at least one probe; `expected`
      appears verbatim in the query of turn `turn - distance` and in the reference answer of turn `turn`; every
      attribute is stated at most once per episode and asked about at most once, so `expected` occurs in no other
      turn (no value is a substring of another value of the episode or of the fixed template / chit-chat text);
      `1 <= distance <= max_distance`.
      A memory evaluation counts a probe as recalled when `expected` appears in the generated answer of that turn
      (normalised match; match at word boundaries, since a value can be a prefix of another value of the pools,
      e.g. a name `Pilon` and `Pilona`).

Episode sampling (one episode; `rng` seeded from `(seed, split)`):
    1. the main probe's distance `d` is uniform on `1 .. min(max_distance, max_turns - 1)` (so every distance is
       equally represented), the episode length `n` uniform on `max(min_turns, d + 1) .. max_turns`, the statement
       turn `s` uniform on `0 .. n - 1 - d`, the question turn `s + d`;
    2. each other turn is, in order of preference, a question about an earlier, not yet asked fact within
       `max_distance` (probability 0.35), a new fact of an unused attribute (0.4), else chit-chat.
    With `long_range=True` (topic-change episodes, "is_long_range" subsets of docs/spec.md#dataset-rows): `n = d + 1`
    with `d` uniform on `max(1, min_turns - 1) .. min(max_distance, max_turns - 1)`; the fact is turn 0, turns
    `1 .. d - 1` are off-topic chit-chat only, the question is turn `d`.

Styles and the template split
    `style="basic"` (the default) is the generator described above: 10 attributes, 2-3 templates per statement,
    acknowledgement, question and answer, 24 fixed chit-chat pairs and four small families. `style="diverse"`
    (`diverse_attributes`, tables in `trainers.synthetic_diverse`) has 14 attributes (more relations, a street, a room
    number) and builds every template as a *core* (the clause carrying the fact: "my cat is called {v}", "{v} is the
    name of my cat", "my cat, {v}, says hello") in a *frame* ("{c}.", "By the way, {c}.", "{c}, by the way.", "Do
    you recall {q}?" for indirect questions): 8 statement cores x 12 frames, 8 reply cores x 8 acknowledgement and
    x 8 answer frames, 5 question cores each in 8 direct and 8 indirect frames, per attribute. Values have varied
    shapes: names of 1-4 syllables of several forms, one- and two-word towns, streets, 4-digit codes in digits or
    spelled digit by digit, room numbers in digits or words ("four hundred and twenty-one"), two- and three-word
    colours, dishes, jobs and hobbies; no value is a run of words of another value or of the fixed text. Distractor
    turns come from fixed pairs and families (topics, recommendations, moods, how-tos, arithmetic).
    Template split: every `HELD_OUT_EVERY`-th core and every `HELD_OUT_EVERY`-th frame (index % 4 == 3) is held
    out; a template whose core or frame is held out is a held-out template (42 of 96 statement templates, 28 of 64
    acknowledgement and answer templates, 32 of 80 question templates: 43 % in all). Training data (every file, every
    split, `templates="train"`) uses only the other templates; the held-out ones appear only in the `paraphrase`
    test set (`generate_dialogues(..., split="test", style="diverse", templates="held_out")`,
    `dialogues_paraphrase_test.jsonl`), whose values are the test pools' as for the in-template test set. The basic
    style's output does not depend on the diverse one (its seed streams and pools are unchanged).

Chance level (`chance_level(split)`): the probability of naming the right value by guessing uniformly from the
attribute's pool of that split, averaged over attributes (episodes draw attributes uniformly): mean over attributes
of `1 / |pool(attribute, split)|` = 1/100 (validation), 1/200 = 0.005 (test); train pools are large on purpose
(a model cannot memorise thousands of names per attribute, so it has to learn to copy values). A model that memorised
the *train* pools and guesses from them scores 0 on test, so this is an upper bound for guessing.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from functools import cache
from itertools import product
from pathlib import Path

from . import synthetic_diverse as _diverse

__all__ = [
    "ATTRIBUTES",
    "HELD_OUT_EVERY",
    "POOL_SEED",
    "POOL_SIZES",
    "SPLITS",
    "STYLES",
    "TEMPLATE_SETS",
    "chance_level",
    "diverse_attributes",
    "generate_dialogues",
    "generate_pretrain",
    "generate_sft",
    "other_template",
    "value_pools",
    "write_jsonl",
    "write_synthetic_data",
]

SPLITS = ("train", "validation", "test")
POOL_SIZES = {"train": 4000, "validation": 100, "test": 200}  # train: at most (limited by the candidates)
POOL_SEED = 20251020  # fixes the value pools and their split; independent of the episode seed

# --------------------------------------------------------------------------------------------------------------------
# Attributes and templates. `{v}` is the value; `{a}` the indefinite article of the value ("a" / "an").


@dataclass(frozen=True)
class Attribute:
    name: str
    statements: tuple[str, ...]  # user states the fact
    acks: tuple[str, ...]  # assistant acknowledges (echoes the value)
    questions: tuple[str, ...]  # user asks (no value)
    answers: tuple[str, ...]  # assistant answers (contains the value)


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "name",
        ("My name is {v}.", "Call me {v}, please.", "Hi, I am {v}."),
        ("Nice to meet you, {v}.", "Hello {v}, good to meet you."),
        ("What is my name?", "Do you remember my name?", "What am I called?"),
        ("Your name is {v}.", "You are {v}."),
    ),
    Attribute(
        "cat",
        ("My cat is called {v}.", "I have a cat named {v}.", "Our cat's name is {v}."),
        ("Noted: your cat is called {v}.", "A cat named {v}, lovely."),
        ("What is my cat called?", "What is the name of my cat?", "Do you remember my cat's name?"),
        ("Your cat is called {v}.", "Your cat's name is {v}."),
    ),
    Attribute(
        "dog",
        ("My dog is called {v}.", "I have a dog named {v}.", "Our dog's name is {v}."),
        ("Noted: your dog is called {v}.", "A dog named {v}, how nice."),
        ("What is my dog called?", "What is the name of my dog?", "Do you remember my dog's name?"),
        ("Your dog is called {v}.", "Your dog's name is {v}."),
    ),
    Attribute(
        "sister",
        ("My sister is called {v}.", "My sister's name is {v}.", "I have a sister named {v}."),
        ("Noted: your sister is called {v}.", "Your sister {v}, got it."),
        ("What is my sister called?", "What is my sister's name?", "Do you remember my sister's name?"),
        ("Your sister is called {v}.", "Your sister's name is {v}."),
    ),
    Attribute(
        "city",
        ("I live in {v}.", "My home town is {v}.", "I moved to {v} last year."),
        ("Noted: you live in {v}.", "I will remember that you live in {v}."),
        ("Where do I live?", "Which town do I live in?", "What is my home town?"),
        ("You live in {v}.", "Your home town is {v}."),
    ),
    Attribute(
        "locker_code",
        ("My locker code is {v}.", "The code of my locker is {v}.", "Please remember my locker code: {v}."),
        ("Noted: your locker code is {v}.", "Locker code {v}, saved."),
        ("What is my locker code?", "Which code opens my locker?", "Do you remember my locker code?"),
        ("Your locker code is {v}.", "The code is {v}."),
    ),
    Attribute(
        "colour",
        ("My favourite colour is {v}.", "I like the colour {v} best.", "The colour I love most is {v}."),
        ("Noted: your favourite colour is {v}.", "A fine choice, {v} it is."),
        ("What is my favourite colour?", "Which colour do I like best?", "Do you remember my favourite colour?"),
        ("Your favourite colour is {v}.", "You like {v} best."),
    ),
    Attribute(
        "job",
        ("I work as {a} {v}.", "My job: I am {a} {v}.", "I earn my living as {a} {v}."),
        ("Noted: you work as {a} {v}.", "Interesting, you are {a} {v}."),
        ("What is my job?", "What do I do for a living?", "Do you remember my job?"),
        ("You work as {a} {v}.", "You are {a} {v}."),
    ),
    Attribute(
        "food",
        ("My favourite food is {v}.", "I love eating {v}.", "Nothing beats {v} for me."),
        ("Noted: your favourite food is {v}.", "Sounds tasty: {v}."),
        ("What is my favourite food?", "What do I love to eat?", "Do you remember my favourite food?"),
        ("Your favourite food is {v}.", "You love {v}."),
    ),
    Attribute(
        "hobby",
        ("My hobby is {v}.", "In my free time I enjoy {v}.", "I spend weekends {v}."),
        ("Noted: your hobby is {v}.", "What a nice hobby: {v}."),
        ("What is my hobby?", "What do I enjoy in my free time?", "Do you remember my hobby?"),
        ("Your hobby is {v}.", "You enjoy {v}."),
    ),
)
_ATTRIBUTE_BY_NAME = {attribute.name: attribute for attribute in ATTRIBUTES}

# Off-topic turns. Fixed pairs plus a few combinatorial families (no pool values in them).
_CHITCHAT = _diverse.CHITCHAT_PAIRS
_CHITCHAT_TOPICS = ("history", "space", "the ocean", "birds", "old trains", "mountains", "rivers", "insects")
_CHITCHAT_GENRES = ("mystery", "adventure", "science fiction", "poetry", "fantasy", "travel")


def _chitchat(rng: random.Random) -> tuple[str, str]:
    kind = rng.random()
    if kind < 0.6:
        return rng.choice(_CHITCHAT)
    if kind < 0.75:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind < 0.9:
        topic = rng.choice(_CHITCHAT_TOPICS)
        return f"Tell me a fact about {topic}.", f"There is a lot to learn about {topic}; it is a fun subject."
    genre = rng.choice(_CHITCHAT_GENRES)
    article = "an" if genre[0] in "aeiou" else "a"
    return f"Can you recommend {article} {genre} book?", f"Try a short {genre} book from your local library."


# --------------------------------------------------------------------------------------------------------------------
# Value pools.

_ONSETS = ("b", "br", "d", "f", "g", "j", "k", "l", "m", "n", "p", "r", "s", "st", "t", "v", "z", "h")
_VOWELS = ("a", "e", "i", "o", "u")
_NAME_ENDINGS = ("", "n", "l", "ra", "na", "th", "x", "ssa", "mo", "ri")
_TOWN_CODAS = ("", "n", "l", "r", "m", "s")
_TOWN_SUFFIXES = (
    "ford", "ton", "by", "ville", "burg", "mouth", "field", "port", "wick", "dale", "haven", "stead", "bridge",
    "holm", "moor",
)  # fmt: skip
_COLOUR_MODIFIERS = (
    "light", "dark", "pale", "deep", "bright", "soft", "dusty", "misty", "warm", "cool", "neon", "pastel", "muted",
    "vivid", "smoky", "frosty", "sunny", "stormy", "rich", "faded", "glossy", "electric", "royal", "dull",
)  # fmt: skip
_COLOURS = (
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "grey", "black", "white", "teal", "gold",
    "silver", "violet", "navy", "olive", "coral", "mint", "peach", "lilac", "amber", "cream", "rust", "plum", "jade",
)  # fmt: skip
_FLAVOURS = (
    "spicy", "sweet", "lemon", "garlic", "cheese", "mushroom", "tomato", "chicken", "beef", "honey", "ginger",
    "coconut", "pumpkin", "apple", "cherry", "salmon", "potato", "onion", "pepper", "bean", "carrot", "spinach",
    "banana", "walnut", "chocolate",
)  # fmt: skip
_DISHES = (
    "soup", "pie", "noodles", "curry", "salad", "tacos", "pizza", "stew", "bread", "pancakes", "dumplings", "risotto",
    "burgers", "pasta", "omelette", "sandwiches", "cake", "muffins", "waffles", "rolls", "skewers", "fritters",
    "toast", "porridge", "crumble",
)  # fmt: skip
_JOB_DOMAINS = (
    "piano", "bike", "boat", "garden", "bread", "music", "science", "history", "art", "dance", "film", "software",
    "bridge", "furniture", "jewellery", "toy", "shoe", "clock", "map", "book", "glass", "candle", "kite", "tea", "ice",
)  # fmt: skip
_JOB_ROLES = (
    "teacher", "maker", "designer", "repairer", "seller", "tester", "builder", "painter", "collector", "inspector",
    "photographer", "writer", "engineer", "dealer", "restorer", "mechanic", "cleaner", "buyer", "critic", "curator",
    "trader", "keeper", "polisher", "printer", "planner",
)  # fmt: skip
_HOBBY_ACTIVITIES = (
    "painting", "collecting", "drawing", "building", "photographing", "sketching", "carving", "repairing", "sorting",
    "racing", "flying", "restoring", "designing", "decorating", "cleaning", "counting", "trading", "printing",
    "polishing", "making", "knitting", "sewing", "gluing", "folding", "weaving",
)  # fmt: skip
_HOBBY_OBJECTS = (
    "stamps", "coins", "kites", "boats", "shells", "maps", "clocks", "lamps", "birds", "trains", "rocks", "leaves",
    "cards", "bottles", "robots", "puzzles", "masks", "bells", "candles", "gliders", "fossils", "posters", "models",
    "tiles", "badges",
)  # fmt: skip


@cache
def _name_candidates() -> tuple[str, ...]:
    return tuple(
        (o1 + v1 + o2 + v2 + end).capitalize()
        for o1, v1, o2, v2, end in product(_ONSETS, _VOWELS, _ONSETS, _VOWELS, _NAME_ENDINGS)
    )


def _town_candidates() -> list[str]:
    return [(o + v + c + s).capitalize() for o, v, c, s in product(_ONSETS, _VOWELS, _TOWN_CODAS, _TOWN_SUFFIXES)]


_CANDIDATES = {
    "name": _name_candidates,
    "cat": _name_candidates,
    "dog": _name_candidates,
    "sister": _name_candidates,
    "city": _town_candidates,
    "locker_code": lambda: [str(number) for number in range(1000, 10000)],
    "colour": lambda: [f"{m} {c}" for m, c in product(_COLOUR_MODIFIERS, _COLOURS)],
    "food": lambda: [f"{f} {d}" for f, d in product(_FLAVOURS, _DISHES)],
    "job": lambda: [f"{d} {r}" for d, r in product(_JOB_DOMAINS, _JOB_ROLES)],
    "hobby": lambda: [f"{a} {o}" for a, o in product(_HOBBY_ACTIVITIES, _HOBBY_OBJECTS)],
}

_POOLS: dict[str, dict[str, tuple[str, ...]]] | None = None


def _fixed_text() -> str:
    """All fixed text of the generator (templates, chit-chat), lower-cased: no value may occur in it."""
    parts = [text for pair in _CHITCHAT for text in pair] + list(_CHITCHAT_TOPICS) + list(_CHITCHAT_GENRES)
    for attribute in ATTRIBUTES:
        parts += [*attribute.statements, *attribute.acks, *attribute.questions, *attribute.answers]
    return "\n".join(parts).lower()


def _build_pools() -> dict[str, dict[str, tuple[str, ...]]]:
    rng = random.Random(POOL_SEED)
    held_out = POOL_SIZES["validation"] + POOL_SIZES["test"]
    fixed_text = _fixed_text()
    used: set[str] = set()
    pools: dict[str, dict[str, tuple[str, ...]]] = {split: {} for split in SPLITS}
    for attribute in ATTRIBUTES:
        candidates = sorted(c for c in set(_CANDIDATES[attribute.name]()) - used if c.lower() not in fixed_text)
        sizes = {**POOL_SIZES, "train": min(POOL_SIZES["train"], len(candidates) - held_out)}
        if sizes["train"] < 100:
            raise RuntimeError(f"only {len(candidates)} candidate values for {attribute.name!r}, need >= {held_out + 100}")
        chosen = rng.sample(candidates, sum(sizes.values()))
        used.update(chosen)
        start = 0
        for split in SPLITS:
            pools[split][attribute.name] = tuple(chosen[start : start + sizes[split]])
            start += sizes[split]
    return pools


def value_pools(split: str, style: str = "basic") -> dict[str, tuple[str, ...]]:
    """The value pool of every attribute for `split` (`"train"`, `"validation"` or `"test"`): `{attribute: values}`.
    Fixed (independent of any seed); disjoint between splits and between attributes. `style="diverse"`: the pools of
    the diverse style's attributes."""
    global _POOLS
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}.")
    if style != "basic":
        return _style_parts(style, split, "train")[2]
    if _POOLS is None:
        _POOLS = _build_pools()
    return dict(_POOLS[split])


def chance_level(split: str = "test", style: str = "basic") -> float:
    """Probability of naming the expected value by guessing: mean over attributes of `1 / |pool(attribute, split)|`
    (0.005 for the test split of either style)."""
    pools = value_pools(split, style)
    return sum(1.0 / len(values) for values in pools.values()) / len(pools)


# --------------------------------------------------------------------------------------------------------------------
# Generation.


def _rng(seed: int, *parts: str) -> random.Random:
    digest = hashlib.sha256("/".join([str(int(seed)), *parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _fill(template: str, value: str) -> str:
    article = "an" if value[:1].lower() in "aeiou" else "a"
    text = template.format(v=value, a=article)
    if template.startswith("{v}"):  # the value stays verbatim ("four eight two one opens my locker.")
        return text
    return text[:1].upper() + text[1:]


def other_template(answer: str) -> str:
    """The content of an assistant `answer` in the generator's other template (every acknowledgement and answer has
    two templates: "Your cat is called Brindle." <-> "Your cat's name is Brindle."); chit-chat answers, which follow
    from their query, come back unchanged. A policy that recalls every value still draws the template the reference
    drew only by chance, so the mean reward of the references and of their other templates is what it can expect."""
    for attribute in ATTRIBUTES:
        for templates in (attribute.acks, attribute.answers):
            for index, template in enumerate(templates):
                pattern = re.escape(template).replace(re.escape("{v}"), "(?P<v>.+)").replace(re.escape("{a}"), "an?")
                match = re.fullmatch(pattern, answer[:1].lower() + answer[1:]) or re.fullmatch(pattern, answer)
                if match and match["v"] in _all_values(attribute.name) and _fill(template, match["v"]) == answer:
                    return _fill(templates[1 - index], match["v"])
    return answer


@cache
def _all_values(attribute: str) -> frozenset[str]:
    return frozenset(value for split in SPLITS for value in value_pools(split)[attribute])


def _statement(rng: random.Random, attribute: Attribute, value: str) -> tuple[str, str]:
    return _fill(rng.choice(attribute.statements), value), _fill(rng.choice(attribute.acks), value)


def _question(rng: random.Random, attribute: Attribute, value: str) -> tuple[str, str]:
    return rng.choice(attribute.questions), _fill(rng.choice(attribute.answers), value)


def _draw(rng: random.Random, pool: tuple[str, ...], taken) -> str:
    """A value of `pool` that is not a substring of a value already in the episode, nor contains one (so a probe's
    value occurs only in its statement and question turns)."""
    taken = [value.lower() for value in taken]
    while True:
        value = rng.choice(pool)
        lowered = value.lower()
        if not any(lowered in other or other in lowered for other in taken):
            return value


def _check_episode_args(min_turns: int, max_turns: int, max_distance: int, long_range: bool) -> None:
    if min_turns < 2:
        raise ValueError(f"min_turns={min_turns}: an episode needs at least 2 turns (a fact and a question).")
    if max_turns < min_turns:
        raise ValueError(f"max_turns={max_turns} < min_turns={min_turns}.")
    if max_distance < 1:
        raise ValueError(f"max_distance={max_distance}: expected >= 1.")
    if long_range and min_turns - 1 > max_distance:
        raise ValueError(
            f"long_range episodes have distance = turns - 1, but min_turns - 1 = {min_turns - 1} > "
            f"max_distance={max_distance}."
        )


def _episode(
    rng: random.Random, pools: dict[str, tuple[str, ...]], min_turns: int, max_turns: int, max_distance: int,
    long_range: bool, attributes: tuple[Attribute, ...] = ATTRIBUTES, chitchat=_chitchat,
) -> dict:  # fmt: skip
    if long_range:
        distance = rng.randint(max(1, min_turns - 1), min(max_distance, max_turns - 1))
        num_turns, stated_at = distance + 1, 0
    else:
        distance = rng.randint(1, min(max_distance, max_turns - 1))
        num_turns = rng.randint(max(min_turns, distance + 1), max_turns)
        stated_at = rng.randint(0, num_turns - 1 - distance)
    asked_at = stated_at + distance

    by_name = {attribute.name: attribute for attribute in attributes}
    unused = [attribute.name for attribute in attributes]
    rng.shuffle(unused)
    main = unused.pop()
    values = {main: _draw(rng, pools[main], ())}
    stated: dict[str, int] = {main: stated_at}  # attribute -> statement turn
    asked: set[str] = {main}
    turns: list[tuple[str, str]] = []
    probes: list[dict] = []

    for turn in range(num_turns):
        if turn == stated_at:
            turns.append(_statement(rng, by_name[main], values[main]))
            continue
        if turn == asked_at:
            turns.append(_question(rng, by_name[main], values[main]))
            probes.append({"turn": turn, "distance": distance, "attribute": main, "expected": values[main]})
            continue
        if long_range:
            turns.append(chitchat(rng))
            continue
        askable = sorted(name for name, at in stated.items() if name not in asked and 0 < turn - at <= max_distance)
        roll = rng.random()
        if askable and roll < 0.35:
            name = rng.choice(askable)
            asked.add(name)
            turns.append(_question(rng, by_name[name], values[name]))
            probes.append({"turn": turn, "distance": turn - stated[name], "attribute": name, "expected": values[name]})
        elif unused and roll < 0.75:
            name = unused.pop()
            values[name] = _draw(rng, pools[name], values.values())
            stated[name] = turn
            turns.append(_statement(rng, by_name[name], values[name]))
        else:
            turns.append(chitchat(rng))

    probes.sort(key=lambda probe: probe["turn"])
    (query, answer), rest = turns[0], turns[1:]
    return {
        "query": query,
        "answer": answer,
        "interactions": [{"query": q, "answer": a} for q, a in rest],
        "probes": probes,
    }


# --------------------------------------------------------------------------------------------------------------------
# The diverse style (`style="diverse"`): many paraphrases per fact, question and reply, values of varied shapes, more
# attributes, a broad distractor pool, and a template split (module docstring, "Styles and the template split").

STYLES = ("basic", "diverse")
TEMPLATE_SETS = ("train", "held_out")
HELD_OUT_EVERY = 4  # the diverse style holds out every 4th core and every 4th frame (index % 4 == 3)


def _held_out(core_index: int, frame_index: int) -> bool:
    return core_index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 or frame_index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def _framed(cores, frames, slot: str, template_set: str) -> tuple[str, ...]:
    want = template_set == "held_out"
    return tuple(
        frame.replace(slot, core)
        for i, core in enumerate(cores)
        for j, frame in enumerate(frames)
        if _held_out(i, j) == want
    )


@cache
def diverse_attributes(template_set: str = "train") -> tuple[Attribute, ...]:
    """The attributes of the diverse style with the templates of `template_set`: `"train"` (the templates training
    data uses) or `"held_out"` (the others: only the `paraphrase` test set uses them). A template is a core in a frame
    (`trainers.synthetic_diverse`); it is held out when its core or its frame is (`HELD_OUT_EVERY`)."""
    if template_set not in TEMPLATE_SETS:
        raise ValueError(f"templates={template_set!r}: expected one of {TEMPLATE_SETS}.")
    attributes = []
    for name, cores in _diverse.ATTRIBUTE_CORES.items():
        direct = [q for q, _ in cores["questions"]]
        indirect = [q for _, q in cores["questions"]]
        attributes.append(Attribute(
            name,
            _framed(cores["statements"], _diverse.STATEMENT_FRAMES, "{c}", template_set),
            _framed(cores["replies"], _diverse.ACK_FRAMES, "{c}", template_set),
            _framed(direct, _diverse.DIRECT_QUESTION_FRAMES, "{q}", template_set)
            + _framed(indirect, _diverse.INDIRECT_QUESTION_FRAMES, "{q}", template_set),
            _framed(cores["replies"], _diverse.ANSWER_FRAMES, "{c}", template_set),
        ))  # fmt: skip
    return tuple(attributes)


def _diverse_chitchat(rng: random.Random) -> tuple[str, str]:
    kind = rng.random()
    if kind < 0.35:
        return rng.choice(_diverse.DISTRACTOR_PAIRS)
    if kind < 0.45:
        if rng.random() < 0.5:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"How much is {a} times {b}?", f"{a} times {b} is {a * b}."
    if kind < 0.65:
        topic = rng.choice(_diverse.DISTRACTOR_TOPICS)
        question = rng.choice(_diverse.DISTRACTOR_TOPIC_QUESTIONS).format(t=topic)
        return question, _capitalised(rng.choice(_diverse.DISTRACTOR_TOPIC_ANSWERS).format(t=topic))
    if kind < 0.75:
        genre, medium = rng.choice(_diverse.DISTRACTOR_GENRES), rng.choice(_diverse.DISTRACTOR_MEDIA)
        article = "an" if genre[0] in "aeiou" else "a"
        return f"Can you recommend {article} {genre} {medium}?", f"Try a well-loved {genre} {medium}; ask a friend too."
    if kind < 0.87:
        mood, reply = rng.choice(_diverse.DISTRACTOR_MOODS)
        return f"I feel {mood} today.", reply
    task, reply = rng.choice(_diverse.DISTRACTOR_TASKS)
    return f"How do I {task}?", reply


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _words(text: str) -> list[str]:
    """Lower-cased words of `text` with punctuation as spaces: the word split of `trainers.memory_eval.normalise`,
    which decides recall."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _spelled(number: int) -> str:
    """101..999 (not a multiple of 10) in words: "three hundred and twelve", "four hundred and twenty-one"."""
    hundreds, rest = divmod(number, 100)
    if rest < 10:
        tail = _diverse.DIGIT_WORDS[rest]
    elif rest < 20:
        tail = _diverse.TEEN_WORDS[rest - 10]
    else:
        tail = f"{_diverse.TENS_WORDS[rest // 10]}-{_diverse.DIGIT_WORDS[rest % 10]}"
    return f"{_diverse.DIGIT_WORDS[hundreds]} hundred and {tail}"


def _diverse_candidates(kind: str, rng: random.Random) -> list[str]:
    d = _diverse
    if kind == "name":  # 1-4 syllables of several shapes: "Bo", "Ilo", "Brenx", "Tamerina", "Shouvelette"
        names = set()
        for _ in range(60000):
            syllables = rng.choices((1, 2, 3, 4), weights=(2, 5, 3, 1))[0]
            parts = []
            for k in range(syllables):
                onset = rng.choice(d.NAME_ONSETS) if k or rng.random() < 0.85 else ""
                vowel = rng.choice(d.NAME_VOWELS[:5]) if rng.random() < 0.8 else rng.choice(d.NAME_VOWELS[5:])
                parts.append(onset + vowel)
            coda = rng.choice(d.NAME_CODAS)
            name = "".join(parts) + (coda or (rng.choice(d.NAME_ENDINGS) if syllables < 3 else ""))
            if 2 <= len(name) <= 12:
                names.add(name.capitalize())
        return sorted(names)
    if kind == "town":  # every third base with a prefix: "Port Dalby"; the base is then no town of its own
        bases = sorted({(o + v + c + s).capitalize() for o, v, c, s in
                        product(d.NAME_ONSETS, d.NAME_VOWELS[:5], ("", "n", "l", "r"), d.TOWN_SUFFIXES)})  # fmt: skip
        return [f"{d.TOWN_PREFIXES[(i // 3) % len(d.TOWN_PREFIXES)]} {b}" if i % 3 == 0 else b for i, b in enumerate(bases)]
    if kind == "street":
        return [f"{w} {k}" for w, k in product(d.STREET_WORDS, d.STREET_KINDS)]
    if kind == "code":  # digits or spelled digit by digit: "4821", "four eight two one"
        return [str(n) for n in range(1000, 10000)] + [" ".join(d.DIGIT_WORDS[int(c)] for c in str(n)) for n in range(1000, 10000)]
    if kind == "room":  # digits or words; no multiple of 10, so no number in words is the start of another
        numbers = [n for n in range(101, 1000) if n % 10]
        return [str(n) for n in numbers] + [_spelled(n) for n in numbers]
    products = {"colour": (d.COLOUR_MODIFIERS, d.COLOURS), "food": (d.FLAVOURS, d.DISHES),
                "job": (d.JOB_DOMAINS, d.JOB_ROLES), "hobby": (d.HOBBY_ACTIVITIES, d.HOBBY_OBJECTS)}  # fmt: skip
    return [f"{a} {b}" for a, b in product(*products[kind])]


def _diverse_fixed_phrases() -> set[str]:
    """Every run of 1-6 words of the diverse style's fixed text (templates, distractors): no value may be one."""
    d = _diverse
    texts = [t for pair in d.DISTRACTOR_PAIRS for t in pair] + [q for _, q in d.DISTRACTOR_MOODS]
    texts += list(d.DISTRACTOR_TOPICS) + list(d.DISTRACTOR_TOPIC_ANSWERS) + list(d.DISTRACTOR_TOPIC_QUESTIONS)
    texts += list(d.DISTRACTOR_GENRES) + list(d.DISTRACTOR_MEDIA) + [m for m, _ in d.DISTRACTOR_MOODS]
    texts += [t for pair in d.DISTRACTOR_TASKS for t in pair] + ["Try a well-loved ; ask a friend too.", "I feel today."]
    for template_set in TEMPLATE_SETS:
        for attribute in diverse_attributes(template_set):
            texts += [*attribute.statements, *attribute.acks, *attribute.questions, *attribute.answers]
    phrases = set()
    for text in texts:
        words = _words(text)
        phrases.update(" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, min(i + 7, len(words) + 1)))
    return phrases


def _build_diverse_pools() -> dict[str, dict[str, tuple[str, ...]]]:
    """As `_build_pools`, for the diverse style; values are also no run of words of the fixed text nor of another
    value (so recall, a match at word boundaries, can only be earned by the value itself)."""
    rng = random.Random(POOL_SEED + 1)
    candidates = {kind: _diverse_candidates(kind, rng) for kind in sorted(set(_diverse.VALUE_KINDS.values()))}
    parts_of_others = set()  # proper runs of words of multi-word candidates
    for values in candidates.values():
        for value in values:
            words = _words(value)
            parts_of_others.update(" ".join(words[i:j]) for i in range(len(words))
                                   for j in range(i + 1, len(words) + 1) if j - i < len(words))  # fmt: skip
    blocked = _diverse_fixed_phrases() | parts_of_others
    held_out = POOL_SIZES["validation"] + POOL_SIZES["test"]
    used: set[str] = set()
    pools: dict[str, dict[str, tuple[str, ...]]] = {split: {} for split in SPLITS}
    for attribute, kind in _diverse.VALUE_KINDS.items():
        allowed = [c for c in candidates[kind] if c not in used and " ".join(_words(c)) not in blocked]
        sizes = {**POOL_SIZES, "train": min(POOL_SIZES["train"], len(allowed) - held_out)}
        if sizes["train"] < 100:
            raise RuntimeError(f"only {len(allowed)} candidate values for {attribute!r}, need >= {held_out + 100}")
        chosen = rng.sample(allowed, sum(sizes.values()))
        used.update(chosen)
        start = 0
        for split in SPLITS:
            pools[split][attribute] = tuple(chosen[start : start + sizes[split]])
            start += sizes[split]
    return pools


_DIVERSE_POOLS: dict[str, dict[str, tuple[str, ...]]] | None = None


def _style_parts(style: str, split: str, templates: str):
    """`(attributes, chitchat, pools)` of a style and template set, with the argument checks."""
    global _DIVERSE_POOLS
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected one of {STYLES}.")
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"templates={templates!r}: expected one of {TEMPLATE_SETS}.")
    if style == "basic":
        if templates != "train":
            raise ValueError("templates='held_out' needs style='diverse'; the basic style has no template split.")
        return ATTRIBUTES, _chitchat, value_pools(split)
    if templates == "held_out" and split == "train":
        raise ValueError("templates='held_out' with split='train': held-out templates never appear in training data; "
                         "expected split='validation' or 'test'.")  # fmt: skip
    value_pools(split)  # checks the split name
    if _DIVERSE_POOLS is None:
        _DIVERSE_POOLS = _build_diverse_pools()
    return diverse_attributes(templates), _diverse_chitchat, dict(_DIVERSE_POOLS[split])


def _stream(style: str, templates: str) -> tuple[str, ...]:
    return () if style == "basic" else (style, templates)  # the basic style keeps its seed streams


def generate_dialogues(
    num: int,
    seed: int = 0,
    split: str = "train",
    min_turns: int = 2,
    max_turns: int = 10,
    max_distance: int = 8,
    long_range: bool = False,
    style: str = "basic",
    templates: str = "train",
) -> list[dict]:
    """Generate `num` recall episodes with values from `split`'s pools (format in the module docstring).

    `style="diverse"` uses the diverse templates, values and distractors; `templates="held_out"` (diverse style,
    validation / test split only) the held-out templates: the `paraphrase` test set. Deterministic in all arguments;
    the first `k` episodes do not depend on `num`.
    """
    _check_episode_args(min_turns, max_turns, max_distance, long_range)
    attributes, chitchat, pools = _style_parts(style, split, templates)
    rng = _rng(seed, "dialogues", split, "long_range" if long_range else "mixed", *_stream(style, templates))
    return [_episode(rng, pools, min_turns, max_turns, max_distance, long_range, attributes, chitchat)
            for _ in range(num)]  # fmt: skip


def _random_turn(rng: random.Random, pools: dict[str, tuple[str, ...]], attributes=ATTRIBUTES,
                 chitchat=_chitchat) -> tuple[str, str]:  # fmt: skip
    roll = rng.random()
    if roll < 0.65:
        attribute = rng.choice(attributes)
        value = rng.choice(pools[attribute.name])
        return (_statement if roll < 0.4 else _question)(rng, attribute, value)
    return chitchat(rng)


def generate_sft(num: int, seed: int = 0, split: str = "train", style: str = "basic") -> list[dict]:
    """`num` single-turn rows `{"query", "answer"}`: statement + acknowledgement (40 %), question + answer with a
    random value of `split`'s pools (25 %), chit-chat (35 %); training templates of `style`."""
    attributes, chitchat, pools = _style_parts(style, split, "train")
    rng = _rng(seed, "sft", split, *_stream(style, "train"))
    rows = []
    for _ in range(num):
        query, answer = _random_turn(rng, pools, attributes, chitchat)
        rows.append({"query": query, "answer": answer})
    return rows


def generate_pretrain(num: int, seed: int = 0, split: str = "train", style: str = "basic") -> list[dict]:
    """`num` rows `{"text"}`: 2-4 random turns (query and answer) of `generate_sft`'s kinds joined by spaces."""
    attributes, chitchat, pools = _style_parts(style, split, "train")
    rng = _rng(seed, "pretrain", split, *_stream(style, "train"))
    rows = []
    for _ in range(num):
        parts = []
        for _ in range(rng.randint(2, 4)):
            parts.extend(_random_turn(rng, pools, attributes, chitchat))
        rows.append({"text": " ".join(parts)})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write `rows` as JSON Lines (UTF-8, one object per line, keys in insertion order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_synthetic_data(
    output_dir: str | Path = "runs/data",
    seed: int = 0,
    num_train: int = 4000,
    num_validation: int = 200,
    num_test: int = 500,
    min_turns: int = 2,
    max_turns: int = 10,
    max_distance: int = 8,
    num_pretrain: int = 10000,
    num_pretrain_validation: int | None = None,
    num_sft: int = 5000,
    num_sft_validation: int | None = None,
    long_range: bool = False,
    mrl_steps: tuple[int, ...] | list[int] | None = None,
    style: str = "basic",
) -> dict[str, Path]:
    """Write every file of the module docstring into `output_dir`; returns `{file stem: path}`.

    `mrl_steps` (e.g. `(1, 2, 4)`) also writes one MRL curriculum subset per step count `n`,
    `{prefix}_steps-{n}_{split}.jsonl`: episodes of exactly `n` follow-ups after the interaction to remember
    (`n + 1` turns, probe distances up to `min(max_distance, n)`), like the hub datasets' `steps-n` subsets.

    Validation sizes of the pre-training / SFT files default to a tenth of the training size (at least 1).

    `style="diverse"` writes every file in the diverse style (training templates only) and also
    `{prefix}_paraphrase_test.jsonl`: `num_test` test episodes in the held-out templates.
    """
    _check_episode_args(min_turns, max_turns, max_distance, long_range)
    output_dir = Path(output_dir)
    written: dict[str, Path] = {}

    def put(stem: str, rows: list[dict]) -> None:
        written[stem] = write_jsonl(rows, output_dir / f"{stem}.jsonl")

    if num_pretrain_validation is None:
        num_pretrain_validation = max(1, num_pretrain // 10)
    if num_sft_validation is None:
        num_sft_validation = max(1, num_sft // 10)
    _style_parts(style, "train", "train")  # checks the style before anything is written
    put("pretrain_train", generate_pretrain(num_pretrain, seed, "train", style))
    put("pretrain_validation", generate_pretrain(num_pretrain_validation, seed, "validation", style))
    put("sft_train", generate_sft(num_sft, seed, "train", style))
    put("sft_validation", generate_sft(num_sft_validation, seed, "validation", style))
    prefix = "dialogues_long_range" if long_range else "dialogues"
    for split, num in (("train", num_train), ("validation", num_validation), ("test", num_test)):
        rows = generate_dialogues(num, seed, split, min_turns, max_turns, max_distance, long_range, style)
        put(f"{prefix}_{split}", rows)
    if style != "basic":
        rows = generate_dialogues(num_test, seed, "test", min_turns, max_turns, max_distance, long_range, style,
                                  templates="held_out")  # fmt: skip
        put(f"{prefix}_paraphrase_test", rows)
    for steps in mrl_steps or ():
        if steps < 1:
            raise ValueError(f"mrl_steps: {steps} follow-ups; expected >= 1.")
        for split, num in (("train", num_train), ("validation", num_validation), ("test", num_test)):
            rows = generate_dialogues(num, seed, split, steps + 1, steps + 1, min(max_distance, steps), long_range,
                                      style)  # fmt: skip
            put(f"{prefix}_steps-{steps}_{split}", rows)
    return written
