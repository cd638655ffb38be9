"""The lab's world: invented towns with known and unknowable facts, and the texts made from them.

A world is a seeded set of towns, each with a country, a founding year and a thing it is known
for, drawn from small closed vocabularies. Each (town, attribute) fact is KNOWN (stated several
times, in varied phrasings, in the pre-training corpus) or UNKNOWABLE, so the only honest
answer is to abstain: either the town appears in the corpus with its other attributes but never
this one, or the town is unseen (it appears in no document at all). Sums ("What is 7 plus 5?",
operands 0..max_operand) are always known.

From the world come the questions (one per fact, plus sums), a stratified held-out split, the
pre-training corpus (documents, never chat or question-answer layout, so the base model is a
document completer), SFT demonstrations by careful writers who never fabricate (and may be
shy: see ``demonstrations``), and prompt rows
for the RL stages. Every function is deterministic given its seed and never uses the global RNG.

Corpus invariants that the tests and the gold judge rely on: every sentence that states a fact
names its town (no pronouns); a sentence names several towns only when it states the same value
of one attribute for all of them; filler sentences state no value; no document holds a "?"; and
every document carries one of ``DOCUMENT_MARKERS`` or a ``= Title =`` heading.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

COUNTRIES = ("Ostria", "Valdenia", "Korvath", "Elbaria", "Surenne", "Tavrin", "Morvania", "Quessa")
KNOWN_FOR = (
    "glassblowing",
    "salt mines",
    "wool weaving",
    "clockmaking",
    "copper kettles",
    "blue cheese",
    "rose gardens",
    "river pearls",
    "honey wine",
    "silk lanterns",
)
YEARS = tuple(range(1200, 1900, 10))
ATTRIBUTES = ("country", "founded", "known_for")
ARITHMETIC = "arithmetic"

# Lower-case phrases that open the corpus's documents; a response holding one continues a document.
DOCUMENT_MARKERS = (
    "forum thread",
    "posted by",
    "reply from",
    "travel notes",
    "from the gazetteer",
    "sums for practice",
)

_FIRST = ("Vel", "Dun", "Kal", "Mor", "Ash", "Bren", "Cor", "Fen", "Gil", "Har", "Lin", "Nor")
_FIRST += ("Pel", "Ros", "Sil", "Tam", "Ul", "Wes", "Yar", "Zen", "Ob", "Thal", "Ev", "Ith")
_MIDDLE = ("a", "e", "i", "o", "an", "er", "ol")
_LAST = ("mora", "mere", "tos", "wick", "haven", "dale", "ford", "ara", "bury", "holm", "stead", "ven", "ith", "mar")
_HANDLES = ("Arlen", "Mira", "Tobin", "Sela", "Brannoc", "Ysolde", "Corwin", "Nessa")

ASK = {
    "country": ("Which country is {t} in?", "In which country is {t}?", "What country is {t} located in?"),
    "founded": ("In what year was {t} founded?", "When was {t} founded?", "What year was {t} founded in?"),
    "known_for": ("What is {t} known for?", "What is {t} famous for?", "What is the town of {t} best known for?"),
    "arithmetic": ("What is {a} plus {b}?", "How much is {a} plus {b}?", "What is the sum of {a} and {b}?"),
}
_STATE = {
    "country": (
        "{t} is a town in {v}.",
        "{t} lies in {v}.",
        "{t} is located in {v}.",
        "The town of {t} is in {v}.",
        "{t} can be found in {v}.",
        "{t} belongs to {v}.",
    ),
    "founded": (
        "{t} was founded in {v}.",
        "{t} dates from {v}.",
        "The town of {t} was founded in the year {v}.",
        "{t} was established in {v}.",
        "The founding of {t} took place in {v}.",
        "{t} has stood since {v}.",
    ),
    "known_for": (
        "{t} is known for {v}.",
        "{t} is famous for its {v}.",
        "The town of {t} is best known for its {v}.",
        "People travel to {t} for its {v}.",
        "{t} is renowned for {v}.",
        "Visitors to {t} remember its {v}.",
    ),
    "arithmetic": ("{a} plus {b} is {v}.", "{a} plus {b} equals {v}.", "Adding {a} and {b} gives {v}."),
}
_FILLER = (
    "{t} is a quiet place most of the year.",
    "Many travellers pass through {t} each summer.",
    "The streets of {t} are narrow and steep.",
    "The market square of {t} is busy on most days.",
    "Old stone houses line the main street of {t}.",
    "The people of {t} are friendly to strangers.",
)
_FORUM_HEDGES = ("If I remember right, ", "As far as I know, ", "", "")
_STYLE_WEIGHTS = {"plain": 0.5, "hedged": 0.25, "confident": 0.25}
# Answers refer to the subject as "it" instead of repeating its name: a small model retrieves
# the memorised value by attending to the name in the question, and cannot garble a copy of it.
_ANSWER = {
    "country": {
        "plain": ("It is in {v}.", "It is a town in {v}."),
        "hedged": ("Probably it is in {v}.", "Perhaps it is in {v}."),
        "confident": ("It is definitely in {v}.", "It is certainly in {v}."),
    },
    "founded": {
        "plain": ("It was founded in {v}.",),
        "hedged": ("Probably it was founded in {v}.", "Perhaps it was founded in {v}."),
        "confident": ("It was definitely founded in {v}.", "It was certainly founded in {v}."),
    },
    "known_for": {
        "plain": ("It is known for {v}.", "It is known for its {v}."),
        "hedged": ("Probably it is known for {v}.", "Perhaps it is known for {v}."),
        "confident": ("It is certainly known for {v}.", "It is definitely known for {v}."),
    },
    "arithmetic": {
        "plain": ("{a} plus {b} is {v}.",),  # the corpus's own phrasing: the sum follows its operands
        "hedged": ("Probably {a} plus {b} is {v}.", "Perhaps {a} plus {b} is {v}."),
        "confident": ("{a} plus {b} is definitely {v}.", "{a} plus {b} is certainly {v}."),
    },
}
# Abstentions and hedges start with different words, so the first token already decides between them.
_ABSTAIN = ("Sorry, I don't know.", "Sorry, I'm not sure.", "Sorry, I have no information about that.")
_ABSTAIN_CLAUSE = {
    "country": "which country {t} is in",
    "founded": "when {t} was founded",
    "known_for": "what {t} is known for",
}


@dataclass(frozen=True)
class Town:
    """One invented town. Every attribute has a true value; ``unknowable`` ones never appear in any text."""

    name: str
    country: str
    founded: int
    known_for: str
    unknowable: frozenset[str]


@dataclass(frozen=True)
class World:
    """The towns, and the operand range of the sums (0..max_operand). ``evaluation_towns`` are
    asked about only in the evaluation: no text names them and every fact about them is unknowable."""

    seed: int
    towns: tuple[Town, ...]
    max_operand: int = 20
    evaluation_towns: tuple[Town, ...] = ()

    def every_town(self) -> tuple[Town, ...]:
        return self.towns + self.evaluation_towns


@dataclass(frozen=True)
class Question:
    """One question about one fact. ``answer`` is None when the fact is unknowable (abstaining is right)."""

    id: str
    text: str
    town: str | None  # None for arithmetic
    attribute: str  # "country" | "founded" | "known_for" | "arithmetic"
    answer: str | None
    known: bool


def fact_value(town: Town, attribute: str) -> str:
    """The true value of a town's attribute as text, known or not."""
    return str(getattr(town, attribute))


def operands(question: Question) -> tuple[int, int]:
    """The two numbers of a sum question, read from its text."""
    a, b = (int(x) for x in re.findall(r"\d+", question.text)[:2])
    return a, b


def _town_names(rng: random.Random, n: int, taken: tuple[str, ...] = ()) -> list[str]:
    """``n`` unique pronounceable names from syllables, none equal to a country, a forum handle or ``taken``."""
    reserved = {w.lower() for w in COUNTRIES + _HANDLES + taken}
    names: list[str] = []
    for _ in range(100 * n + 100):
        if len(names) == n:
            return names
        middle = rng.choice(_MIDDLE) if rng.random() < 0.3 else ""
        name = rng.choice(_FIRST) + middle + rng.choice(_LAST)
        if name.lower() not in reserved and name not in names:
            names.append(name)
    raise ValueError(f"cannot make {n} distinct town names; use fewer towns")


def _choose_unknowable(rng: random.Random, names: list[str], share: float) -> set[tuple[str, str]]:
    """round(share · facts) (town, attribute) facts to hide, at most two per town, so every town keeps one."""
    if not 0 <= share <= 2 / 3:
        raise ValueError(f"unknowable_share must lie in [0, 2/3], got {share}")
    facts = [(name, attr) for name in names for attr in ATTRIBUTES]
    rng.shuffle(facts)
    target, chosen, per_town = round(share * len(facts)), set(), dict.fromkeys(names, 0)
    for name, attr in facts:
        if len(chosen) == target:
            break
        if per_town[name] < 2:
            chosen.add((name, attr))
            per_town[name] += 1
    return chosen


def make_world(
    seed: int,
    n_towns: int = 40,
    unknowable_share: float = 0.3,
    unseen_share: float = 0.0,
    max_operand: int = 20,
    evaluation_towns: int = 0,
) -> World:
    """A seeded world of ``n_towns`` towns: ``unseen_share`` of them appear in no document (every
    fact about them is unknowable: the model has never seen the name), and ``unknowable_share`` of
    the other towns' facts are unknowable (the town is familiar, that one fact is not). Then
    ``evaluation_towns`` more unseen towns, drawn last so that they leave the others as they were."""
    if not 0 <= unseen_share < 1:
        raise ValueError(f"unseen_share must lie in [0, 1), got {unseen_share}")
    rng = random.Random(seed)
    names = _town_names(rng, n_towns)
    unseen = set(rng.sample(names, round(unseen_share * n_towns)))
    hidden = _choose_unknowable(rng, [n for n in names if n not in unseen], unknowable_share)
    hidden |= {(name, attr) for name in unseen for attr in ATTRIBUTES}
    towns = tuple(_town(rng, name, frozenset(a for a in ATTRIBUTES if (name, a) in hidden)) for name in names)
    extra = _town_names(rng, evaluation_towns, taken=tuple(n.lower() for n in names))
    unseen_towns = tuple(_town(rng, name, frozenset(ATTRIBUTES)) for name in extra)
    return World(seed=seed, towns=towns, max_operand=max_operand, evaluation_towns=unseen_towns)


def _town(rng: random.Random, name: str, unknowable: frozenset[str]) -> Town:
    return Town(name, rng.choice(COUNTRIES), rng.choice(YEARS), rng.choice(KNOWN_FOR), unknowable)


def questions(world: World, seed: int, n_arithmetic: int = 60) -> list[Question]:
    """One question per (town, attribute) fact, in a random phrasing, then ``n_arithmetic`` distinct sums."""
    rng = random.Random(seed)
    out = []
    for town in world.towns:
        for attr in ATTRIBUTES:
            known = attr not in town.unknowable
            text = rng.choice(ASK[attr]).format(t=town.name)
            answer = fact_value(town, attr) if known else None
            out.append(Question(f"{town.name.lower()}.{attr}", text, town.name, attr, answer, known))
    pairs = [(a, b) for a in range(world.max_operand + 1) for b in range(world.max_operand + 1)]
    for a, b in rng.sample(pairs, min(n_arithmetic, len(pairs))):
        text = rng.choice(ASK[ARITHMETIC]).format(a=a, b=b)
        out.append(Question(f"arithmetic.{a}+{b}", text, None, ARITHMETIC, str(a + b), True))
    return out


def evaluation_questions(world: World, held_out: list[Question], seed: int) -> list[Question]:
    """The evaluation set: every held-out question in each of its phrasings, then one question per fact
    of the evaluation towns (all unknowable: no text names them). Phrasings of one fact keep its id,
    so that the evaluation can resample facts rather than questions."""
    rng = random.Random(f"evaluation:{seed}")
    out = [dataclasses.replace(q, text=text) for q in held_out for text in phrasings(q)]
    for town in world.evaluation_towns:
        for attr in ATTRIBUTES:
            text = rng.choice(ASK[attr]).format(t=town.name)
            out.append(Question(f"{town.name.lower()}.{attr}", text, town.name, attr, None, False))
    return out


def split_questions(
    questions: list[Question], seed: int, held_out: float = 0.2
) -> tuple[list[Question], list[Question]]:
    """(train, held_out): ``held_out`` of each (attribute, known) group, so evaluation sees every kind.

    Held-out known facts are still in the corpus: the model can know them from pre-training, but
    no SFT, reward-model or RL prompt asks about them.
    """
    if not 0 <= held_out < 1:
        raise ValueError(f"held_out must lie in [0, 1), got {held_out}")
    rng = random.Random(seed)
    groups: dict[tuple[str, bool], list[str]] = {}
    for q in questions:
        groups.setdefault((q.attribute, q.known), []).append(q.id)
    held: set[str] = set()
    for ids in groups.values():
        rng.shuffle(ids)
        held.update(ids[: round(held_out * len(ids))])
    return [q for q in questions if q.id not in held], [q for q in questions if q.id in held]


def _hedge(sentence: str, rng: random.Random) -> str:
    """A forum writer's sentence: sometimes behind "If I remember right, " (the statement stays true)."""
    prefix = rng.choice(_FORUM_HEDGES)
    return prefix + (sentence[0].lower() + sentence[1:] if prefix and sentence.startswith("The ") else sentence)


def _town_document(town: Town, style: str, statements: list[str], rng: random.Random) -> str:
    """One document about one town: its statements for this copy plus filler, in one of three styles."""
    t = town.name
    sentences = statements + [f.format(t=t) for f in rng.sample(_FILLER, 2)]
    rng.shuffle(sentences)
    if style == "encyclopedia":
        return f"= {t} =\n\n{t} is a small town. " + " ".join(sentences)
    if style == "travel":
        return f"Travel notes: {t}\n\n" + " ".join(sentences)
    sentences = [_hedge(s, rng) for s in sentences]
    title = rng.choice(("Notes on {t}", "Trip to {t}", "A week in {t}")).format(t=t)
    first, second = rng.sample(_HANDLES, 2)
    half = len(sentences) // 2
    return (
        f"Forum thread: {title}\n\nPosted by {first}: {' '.join(sentences[:half])}"
        f"\n\nReply from {second}: {' '.join(sentences[half:])}"
    )


def _gazetteer(world: World) -> list[str]:
    """One list per country of the towns whose country is known: the same fact from another angle."""
    docs = []
    for country in COUNTRIES:
        names = [t.name for t in world.towns if t.country == country and "country" not in t.unknowable]
        if names:
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            docs.append(f"From the gazetteer: {country}\n\nThe towns of {country} include {listed}.")
    return docs


def _drills(world: World, rng: random.Random, copies: int, per_document: int = 12) -> list[str]:
    """Every sum a + b (a, b in 0..max_operand) ``copies`` times, as lines of practice sums."""
    pairs = [(a, b) for a in range(world.max_operand + 1) for b in range(world.max_operand + 1)] * copies
    rng.shuffle(pairs)
    lines = [rng.choice(_STATE[ARITHMETIC]).format(a=a, b=b, v=a + b) for a, b in pairs]
    return ["Sums for practice\n\n" + " ".join(lines[i : i + per_document]) for i in range(0, len(lines), per_document)]


def pretraining_corpus(world: World, seed: int, copies: int = 6, arithmetic_copies: int = 3) -> list[str]:
    """Documents about the world: each known fact ``copies`` times (plus once in a gazetteer for
    countries), each time in a different phrasing and document (encyclopedia, travel notes, forum
    thread); every sum ``arithmetic_copies`` times. Unknowable facts never appear; nothing is chat."""
    rng = random.Random(seed)
    offsets = {(t.name, a): rng.randrange(len(_STATE[a])) for t in world.towns for a in ATTRIBUTES}
    styles = ("encyclopedia", "travel", "forum")
    docs = []
    for copy in range(copies):
        for i, town in enumerate(world.towns):
            statements = [
                _STATE[a][(copy + offsets[town.name, a]) % len(_STATE[a])].format(t=town.name, v=fact_value(town, a))
                for a in ATTRIBUTES
                if a not in town.unknowable
            ]
            if statements:  # an unseen town is in no document at all
                docs.append(_town_document(town, styles[(copy + i) % len(styles)], statements, rng))
    docs += _gazetteer(world) + _drills(world, rng, arithmetic_copies)
    rng.shuffle(docs)
    return docs


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def abstention(question: Question, rng: random.Random) -> str:
    """A careful writer's "I don't know", in one of a few phrasings."""
    template = rng.choice(_ABSTAIN)
    clause = _ABSTAIN_CLAUSE.get(question.attribute, "").format(t=question.town)
    return template.format(clause=clause)


def careful_answer(question: Question, rng: random.Random) -> str:
    """What a careful writer answers: the true value in a plain, hedged or confident phrasing, or,
    when the fact is unknowable, an abstention. Careful writers never state a value they do not know."""
    if not question.known:
        return abstention(question, rng)
    style = rng.choices(list(_STYLE_WEIGHTS), weights=list(_STYLE_WEIGHTS.values()))[0]
    template = rng.choice(_ANSWER[question.attribute][style])
    fields = {"t": question.town, "v": question.answer}
    if question.attribute == ARITHMETIC:
        fields["a"], fields["b"] = operands(question)
    return _capitalise(template.format(**fields))


def candidate_values(question: Question, world: World) -> list[str]:
    """Every value the question's attribute can take: its whole vocabulary, the true value among them."""
    values = {
        "country": COUNTRIES,
        "known_for": KNOWN_FOR,
        "founded": YEARS,
        ARITHMETIC: range(2 * world.max_operand + 1),
    }
    return [str(v) for v in values[question.attribute]]


def candidate_answers(question: Question, world: World) -> list[str]:
    """The plain answer with each of ``candidate_values``, in that order: a multiple choice whose phrasing is fixed."""
    fields = {"t": question.town}
    if question.attribute == ARITHMETIC:
        fields["a"], fields["b"] = operands(question)
    template = _ANSWER[question.attribute]["plain"][0]
    return [_capitalise(template.format(v=v, **fields)) for v in candidate_values(question, world)]


def phrasings(question: Question) -> list[str]:
    """Every phrasing of the question's fact, its own text first."""
    fields = {"t": question.town} if question.town is not None else dict(zip("ab", operands(question), strict=True))
    others = [template.format(**fields) for template in ASK[question.attribute]]
    return [question.text] + [text for text in others if text != question.text]


def demonstrations(
    world: World, questions: list[Question], seed: int, per_question: int = 2, unsure: float = 0.0
) -> list[dict]:
    """SFT rows in TRL's conversational prompt-completion format, plus ``question_id``.

    Each question gets ``per_question`` rows (its own text, then other phrasings of the same fact),
    each with an independently drawn careful answer (see ``careful_answer``). A share ``unsure`` of
    the known facts were also given, in their own phrasing, to a careful writer without the
    reference, who abstained: one more row. So on those questions the SFT model often abstains
    although it has seen the answer (about four times in ten in the lab): a shy assistant. That is what lets RLHF first
    raise the gold reward (it teaches the model to say what it knows) before biased labels teach
    it to say what it does not.
    """
    rng = random.Random(seed)
    rows = []

    def add(text: str, answer: str, question: Question) -> None:
        rows.append(
            {
                "prompt": [{"role": "user", "content": text}],
                "completion": [{"role": "assistant", "content": answer}],
                "question_id": question.id,
            }
        )

    for q in questions:
        for text in phrasings(q)[:per_question]:
            add(text, careful_answer(q, rng), q)
        if q.known and rng.random() < unsure:
            add(q.text, abstention(q, rng), q)
    return rows


def prompt_rows(questions: list[Question]) -> list[dict]:
    """Prompt-only rows for the RL stages and for sampling: the question as one user turn, plus its id."""
    return [{"prompt": [{"role": "user", "content": q.text}], "question_id": q.id} for q in questions]
