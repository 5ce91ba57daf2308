"""Short example posts shared by the model tests (mixed lengths, emoji, scripts)."""

EXAMPLE_TEXTS = [
    "I love this so much, thank you!",
    "This is terrible and I am furious.",
    "ok",
    "What? I did not expect that at all... wow",
    "I'm so sorry for your loss, that is heartbreaking.",
    "meh, whatever you say I guess, not sure it matters to anyone here honestly",
    "Great job everyone 🎉🎉",
    "Why would anyone do that? I'm confused and a bit scared.",
]
