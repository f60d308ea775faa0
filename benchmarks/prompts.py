"""Prompts shared by the generation benchmarks.

Sixteen short English prompts of clearly different lengths: left padding, KV-cache merging
and the trimming of finished rows only get exercised when the lengths differ.
"""

PROMPTS: tuple[str, ...] = (
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a ten year old child in simple words.",
    "List three fruits that are red.",
    "Why is the sky blue? Give a short scientific explanation that mentions Rayleigh scattering.",
    "Translate 'good morning' into Spanish.",
    "Tell me a joke.",
    "Summarize the plot of Romeo and Juliet in two sentences, without spoiling the very end "
    "for someone who has never read or seen the play.",
    "What is 17 times 23?",
    "Give me a name for a grey cat.",
    "Describe the water cycle: evaporation, condensation, precipitation and collection.",
    "How do I boil an egg?",
    "Suggest a title for a blog post about learning to play the guitar as an adult beginner "
    "who only has twenty minutes of practice time each day.",
    "Who wrote Hamlet?",
    "Name the planets of the solar system in order from the sun, and say which is the largest.",
)

# Encyclopedia-style sentences that ``passages`` strings together (retrieval benchmarks).
SENTENCES: tuple[str, ...] = (
    "The river rises in the northern hills and flows south for almost three hundred kilometres.",
    "Most of the town's older houses were built of local limestone in the eighteenth century.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The committee published its final report after two years of hearings.",
    "A soft boiled egg needs about six minutes in gently boiling water.",
    "The bridge was closed for repairs in 2019 and reopened the following spring.",
    "Rayleigh scattering makes short blue wavelengths spread across the whole sky.",
    "Early versions of the engine were heavy, noisy and burned a great deal of coal.",
    "The museum holds more than forty thousand paintings, drawings and prints.",
    "Farmers in the valley grow wheat, barley and sugar beet on small family plots.",
    "Her second novel sold poorly at first but is now taught in many schools.",
    "The treaty set the border along the ridge and gave both sides access to the lake.",
    "Regular exercise lowers blood pressure and improves sleep in most adults.",
    "The team won the championship in its first season under the new coach.",
    "Cats spend much of the day asleep and hunt mainly at dawn and dusk.",
    "The library lends books, music and tools, and runs free evening classes.",
    "Volcanic soil is rich in minerals, which is why vineyards cover the slopes.",
    "The company moved its headquarters to the capital to be closer to its customers.",
    "In the old city the streets are narrow and most of them are closed to cars.",
    "Tides are caused mainly by the pull of the moon and, to a lesser degree, the sun.",
    "The recipe calls for flour, butter, two eggs and a pinch of salt.",
    "Wind farms off the coast now supply about a fifth of the region's electricity.",
    "The festival takes place every August and draws visitors from across the country.",
    "Honey bees communicate the direction of food with a short dance.",
    "The new law requires every building to be inspected at least once in ten years.",
    "Glaciers carved the deep valleys and left long, narrow lakes behind them.",
    "The orchestra was founded in 1882 and gave its first concert in a rented hall.",
    "Blue whales are the largest animals known to have lived on Earth.",
    "The software stores each record twice so that a single disk failure loses nothing.",
    "During the winter months the pass is often blocked by snow for several weeks.",
    "Children learn languages faster when they hear them spoken at home.",
    "The castle changed hands many times before it was finally abandoned.",
)


def passages(count: int, *, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    """``count`` passages of ``min_words``..``max_words`` words (uniform, seeded): ``SENTENCES``
    in a random order, the last one cut to the drawn length and closed with a full stop."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        target = rng.randint(min_words, max_words)
        words: list[str] = []
        while len(words) < target:
            words += rng.choice(SENTENCES).split()
        out.append(" ".join(words[:target]).rstrip(".,") + ".")
    return out
