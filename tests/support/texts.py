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

# A mixed stream for the out-of-distribution tests: plain English posts, and posts in other
# languages and scripts (each long enough for language identification: 10 letters or more)
ENGLISH_POSTS = [
    "I can't believe how happy this made me, thank you so much!",
    "This is the worst customer service I have ever dealt with.",
    "Honestly not sure what to think about the new season yet.",
    "My dog passed away this morning and the house feels so empty.",
    "Wow, that goal in the last minute was absolutely insane!",
    "Could someone explain why the update broke my settings again?",
    "I'm so proud of my sister for finishing her degree this year.",
    "That joke was terrible but I still laughed way too hard.",
    "Really nervous about the interview tomorrow, wish me luck.",
    "Thanks for the advice, it actually worked for me.",
    "I don't get why people are so angry about this movie.",
    "What a beautiful sunset over the lake tonight.",
]
FOREIGN_POSTS = [
    ("de", "Ich kann gar nicht glauben, wie sehr mich das gefreut hat, vielen Dank!"),
    ("es", "No puedo creer lo feliz que me hizo esto, muchas gracias a todos."),
    ("fr", "Je ne sais vraiment pas quoi penser de cette nouvelle saison."),
    ("pt", "Meu cachorro morreu hoje de manhã e a casa parece tão vazia."),
    ("it", "Che tramonto meraviglioso sul lago questa sera, sono senza parole."),
    ("tr", "Yarınki mülakat için çok gerginim, bana şans dileyin lütfen."),
    ("id", "Terima kasih atas sarannya, ternyata benar-benar berhasil untukku."),
    ("ru", "Не понимаю, почему все так злятся из-за этого фильма."),
    ("uk", "Я дуже пишаюся своєю сестрою, що вона закінчила навчання."),
    ("ar", "لا أصدق كم أسعدني هذا، شكرا جزيلا لكم جميعا."),
    ("hi", "मुझे विश्वास नहीं हो रहा कि इससे मुझे कितनी खुशी मिली, बहुत धन्यवाद!"),
    ("zh", "我简直不敢相信这让我多么开心，非常感谢大家的帮助！"),
]
