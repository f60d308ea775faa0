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
