"""The embedded contrastive sentiment set for the default encoder run (deterministic, offline).

Training pairs are templated sentences that differ only in sentiment: the same subject and frame
with a positive or a negative word; the run's seed decides which of them are drawn. The held-out
pairs use subjects, frames and sentiment words that never occur in training, so an adapter that
passes the held-out evaluation has learnt the trait, not the templates. Half of the held-out
subjects, with hand-written labelled sentences, train the evaluation probe; the other half give
the opinionated evaluation sentences. Neutral sentences with paraphrases measure the trait score
and content preservation.
"""

import random

OPINIONATED_PAIRS = 48  # opinionated evaluation pairs (96 sentences: 48 positive, 48 negative)
OPINIONATED_SEED = 1234  # fixed: every run seed is evaluated on the same sentences

# ---------------------------------------------------------------- training vocabulary
TRAIN_SUBJECTS = (
    "the hotel room",
    "the pasta",
    "the concert",
    "the new phone",
    "the customer service",
    "the movie",
    "the coffee",
    "the flight",
    "the book",
    "the restaurant",
    "the laptop",
    "the training course",
    "the apartment",
    "the video game",
    "the haircut",
    "the car rental",
    "the pizza",
    "the software update",
    "the weekend trip",
    "the wedding venue",
    "the dentist visit",
    "the headphones",
    "the hiking trail",
    "the theatre play",
)
TRAIN_ADJECTIVES = (  # (positive, negative)
    ("wonderful", "terrible"),
    ("excellent", "awful"),
    ("delightful", "dreadful"),
    ("great", "horrible"),
    ("fantastic", "disappointing"),
    ("amazing", "unbearable"),
    ("pleasant", "unpleasant"),
    ("perfect", "useless"),
)
TRAIN_ADJ_FRAMES = (
    "{S} was {A}.",
    "I thought {S} was {A}.",
    "Honestly, {S} turned out to be {A}.",
    "Everyone agreed that {S} was {A}.",
    "Our experience with {S} was {A}.",
    "In the end, {S} felt {A}.",
)
TRAIN_VERBS = (  # (positive, negative)
    ("loved", "hated"),
    ("enjoyed", "regretted"),
    ("adored", "despised"),
)
TRAIN_VERB_FRAMES = (
    "We {V} {S}.",
    "My friends {V} {S}.",
    "I really {V} {S} last week.",
)

# ---------------------------------------------------------------- held-out vocabulary (disjoint)
HELDOUT_SUBJECTS = (
    "the museum tour",
    "the bicycle",
    "the lecture",
    "the sushi bar",
    "the jazz album",
    "the train journey",
    "the yoga class",
    "the sofa",
    "the podcast",
    "the campsite",
    "the bakery",
    "the tax advisor",
)
HELDOUT_ADJECTIVES = (
    ("superb", "dismal"),
    ("lovely", "miserable"),
    ("brilliant", "atrocious"),
    ("charming", "appalling"),
)
HELDOUT_ADJ_FRAMES = (
    "My sister found {S} {A}.",
    "According to the reviews, {S} is {A}.",
    "Looking back, {S} seemed {A} to me.",
)
HELDOUT_VERBS = (("cherished", "loathed"), ("admired", "detested"))
HELDOUT_VERB_FRAMES = ("The kids {V} {S}.", "Frankly, my parents {V} {S}.")

# ---------------------------------------------------------------- probe (labelled, hand-written)
PROBE_POSITIVE = (
    "This is the best day I have had in years.",
    "The staff were kind and incredibly helpful.",
    "What a beautiful, uplifting story.",
    "I am so happy with how everything worked out.",
    "The garden looks gorgeous in the spring.",
    "She gave a warm and inspiring speech.",
    "Dinner was delicious and the company was even better.",
    "I would gladly recommend this place to anyone.",
    "The team did an outstanding job on the project.",
    "Our holiday by the sea was pure joy.",
    "He is a generous and thoughtful neighbour.",
    "The results exceeded all of our hopes.",
    "It was a cheerful afternoon full of laughter.",
    "The new design is elegant and a pleasure to use.",
    "I feel grateful for such good friends.",
    "The children had a marvellous time at the fair.",
    "This song always puts me in a great mood.",
    "The repair was quick, cheap and flawless.",
    "We were thrilled by the warm welcome.",
    "The view from the summit was breathtaking.",
    "Everything about the evening was just right.",
    "Her paintings are vibrant and full of life.",
    "The service was friendly and attentive.",
    "I am proud of what we achieved together.",
)
PROBE_NEGATIVE = (
    "This is the worst day I have had in years.",
    "The staff were rude and completely unhelpful.",
    "What a bleak, depressing story.",
    "I am so upset with how everything turned out.",
    "The garden looks neglected and ugly this spring.",
    "She gave a cold and boring speech.",
    "Dinner was bland and the company was even worse.",
    "I would warn anyone against this place.",
    "The team did a sloppy job on the project.",
    "Our holiday by the sea was pure misery.",
    "He is a selfish and inconsiderate neighbour.",
    "The results fell far short of our hopes.",
    "It was a gloomy afternoon full of arguments.",
    "The new design is clumsy and a pain to use.",
    "I feel betrayed by people I trusted.",
    "The children had a wretched time at the fair.",
    "This song always puts me in a foul mood.",
    "The repair was slow, expensive and botched.",
    "We were annoyed by the hostile reception.",
    "The view from the summit was hidden by filthy smog.",
    "Everything about the evening went wrong.",
    "Her paintings are dull and lifeless.",
    "The service was slow and careless.",
    "I am ashamed of the mess we made.",
)

# ---------------------------------------------------------------- neutral sentences + paraphrases
NEUTRAL_PARAPHRASES = (
    ("The meeting starts at ten in the morning.", "At ten a.m. the meeting begins."),
    (
        "The library is on the corner of Main Street.",
        "You can find the library at the corner of Main Street.",
    ),
    (
        "The train to Berlin leaves from platform four.",
        "Platform four is where the Berlin train departs.",
    ),
    ("My brother works as an electrician.", "My brother is employed as an electrician."),
    ("The package arrived on Tuesday.", "On Tuesday the parcel was delivered."),
    ("The museum closes at six on weekdays.", "On weekdays, the museum shuts at six."),
    ("She moved to Canada in 2015.", "In 2015 she relocated to Canada."),
    ("The recipe calls for two cups of flour.", "Two cups of flour are needed for the recipe."),
    (
        "The bridge crosses the river near the old mill.",
        "Near the old mill, the bridge spans the river.",
    ),
    ("The report has twelve pages.", "There are twelve pages in the report."),
    ("The bus stops in front of the school.", "The school has a bus stop right in front of it."),
    ("He plays the violin in an orchestra.", "He is a violinist in an orchestra."),
    ("The store sells shoes and bags.", "Shoes and bags are sold at the store."),
    ("The lake freezes over in January.", "In January the lake becomes covered with ice."),
    ("Our office is on the third floor.", "We have our office on the third floor."),
    ("The cat sleeps on the windowsill.", "The windowsill is where the cat takes its naps."),
    ("The conference takes place in Lisbon.", "Lisbon is the venue of the conference."),
    ("The printer is next to the kitchen.", "You will find the printer beside the kitchen."),
    ("The course lasts eight weeks.", "The course runs for eight weeks."),
    (
        "My grandmother was born in a small village.",
        "A small village is where my grandmother was born.",
    ),
    ("The farmer grows wheat and barley.", "Wheat and barley are the crops the farmer grows."),
    ("The film is about two sailors.", "Two sailors are the subject of the film."),
    ("The store opens at nine on Sundays.", "On Sundays the shop opens its doors at nine."),
    ("The children walk to school together.", "The kids go to school on foot as a group."),
    (
        "The laptop has a fourteen inch screen.",
        "The screen of the laptop measures fourteen inches.",
    ),
    ("The bakery is run by a family.", "A family operates the bakery."),
    ("The road goes through the forest.", "The road passes through the woods."),
    ("He drinks tea every afternoon.", "Every afternoon he has a cup of tea."),
    ("The city has three universities.", "There are three universities in the city."),
    ("The parcel weighs two kilograms.", "The package has a weight of two kilos."),
    ("The painting hangs in the hallway.", "In the hallway there is the painting on the wall."),
    ("We usually eat dinner at seven.", "Dinner is normally at seven for us."),
    ("The ferry crosses the bay twice a day.", "Twice daily the ferry goes across the bay."),
    ("The manual is written in French.", "The instructions are in French."),
    ("The garage holds two cars.", "There is room for two cars in the garage."),
    ("The dog waits by the door.", "By the door, the dog is waiting."),
    ("The exam is scheduled for Friday.", "Friday is the date of the exam."),
    ("The river flows into the sea at the harbour.", "At the harbour the river reaches the sea."),
    ("Her flat has two bedrooms.", "There are two bedrooms in her apartment."),
    ("The hotel is near the airport.", "The hotel is located close to the airport."),
)


def _pairs(subjects, adjectives, adj_frames, verbs, verb_frames) -> list[dict]:
    out = []
    for s in subjects:
        for frame in adj_frames:
            for pos, neg in adjectives:
                out.append(
                    {
                        "chosen": _cap(frame.format(S=s, A=pos)),
                        "rejected": _cap(frame.format(S=s, A=neg)),
                    }
                )
        for frame in verb_frames:
            for pos, neg in verbs:
                out.append(
                    {
                        "chosen": _cap(frame.format(S=s, V=pos)),
                        "rejected": _cap(frame.format(S=s, V=neg)),
                    }
                )
    return out


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def train_pairs(n: int = 240, seed: int = 0) -> list[dict]:
    """``n`` training pairs ``{"chosen": positive, "rejected": negative}`` drawn deterministically.

    Args:
        n: how many pairs (at most the number of templated combinations, 1368).
        seed: shuffling seed.
    """
    pool = _pairs(
        TRAIN_SUBJECTS, TRAIN_ADJECTIVES, TRAIN_ADJ_FRAMES, TRAIN_VERBS, TRAIN_VERB_FRAMES
    )
    if not 0 < n <= len(pool):
        raise ValueError(f"n must be in [1, {len(pool)}], got {n}")
    random.Random(seed).shuffle(pool)
    return pool[:n]


def heldout_pairs(part: str = "all") -> list[dict]:
    """Held-out pairs: subjects, frames and sentiment words never seen in training.

    Args:
        part: ``"all"`` (192 pairs); ``"probe"``: the pairs of the even-numbered held-out subjects
            (96, they label the evaluation probe); ``"opinionated"``: 48 pairs drawn with a fixed
            seed from the odd-numbered subjects (the opinionated evaluation sentences, never seen
            by the probe or by training; the same for every run seed).
    """
    if part == "all":
        subjects = HELDOUT_SUBJECTS
    elif part in ("probe", "opinionated"):
        subjects = HELDOUT_SUBJECTS[0::2] if part == "probe" else HELDOUT_SUBJECTS[1::2]
    else:
        raise ValueError(f"part must be 'all', 'probe' or 'opinionated', got {part!r}")
    pairs = _pairs(
        subjects, HELDOUT_ADJECTIVES, HELDOUT_ADJ_FRAMES, HELDOUT_VERBS, HELDOUT_VERB_FRAMES
    )
    if part == "opinionated":
        pairs = random.Random(OPINIONATED_SEED).sample(pairs, OPINIONATED_PAIRS)
    return pairs


def probe_sentences() -> tuple[list[str], list[int]]:
    """Labelled sentences for the evaluation probe: ``(texts, labels)`` with 1 = positive."""
    texts = list(PROBE_POSITIVE) + list(PROBE_NEGATIVE)
    return texts, [1] * len(PROBE_POSITIVE) + [0] * len(PROBE_NEGATIVE)


def neutral_paraphrases() -> tuple[list[str], list[str]]:
    """Neutral held-out sentences and, index for index, a paraphrase of each."""
    return [a for a, _ in NEUTRAL_PARAPHRASES], [b for _, b in NEUTRAL_PARAPHRASES]
