"""Out-of-distribution evaluation sets, generated here (no hub): posts the model was not trained to
read, to measure whether the OOD signals catch them (``emoworker evaluate --ood``).

* ``lang-<code>``: sentences in other languages. Faker's lorem word lists where it has one
  (German, Spanish, French, Italian, Dutch, Polish, Czech, Danish, Vietnamese, Russian, Ukrainian,
  Greek, Arabic, Persian, Hebrew, Armenian, Bengali, Chinese, Japanese, Thai); for Portuguese,
  Turkish, Indonesian and Hindi (Devanagari), which Faker has no lorem for, words drawn by
  frequency from wordfreq's lists. Real posts are grammatical, these are word salad in the right
  language: language identification finds these at least as hard as real sentences;
* ``code``: lines of Python source from the installed packages;
* ``logs``: log lines (timestamps, levels, hosts, paths, status codes);
* ``urls-hashtags``: posts that are only links, hashtags and mentions;
* ``docs-prose``: sentences from the installed packages' own descriptions (technical English);
* ``shuffled``: in-distribution posts with their words shuffled (English words, no syntax).

Each set is a text file, one post per line, seeded and reproducible. Only the tooling uses this
module (the ``ood-sets`` extra: faker, wordfreq).
"""

from __future__ import annotations

import importlib.metadata
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

FAKER_LANGUAGES = {
    "de": "de_DE",
    "es": "es_ES",
    "fr": "fr_FR",
    "it": "it_IT",
    "nl": "nl_NL",
    "pl": "pl_PL",
    "cs": "cs_CZ",
    "da": "da_DK",
    "vi": "vi_VN",
    "ru": "ru_RU",
    "uk": "uk_UA",
    "el": "el_GR",
    "ar": "ar_AA",
    "fa": "fa_IR",
    "he": "he_IL",
    "hy": "hy_AM",
    "bn": "bn_BD",
    "zh": "zh_CN",
    "ja": "ja_JP",
    "th": "th_TH",
}
WORDFREQ_LANGUAGES = ("pt", "tr", "id", "hi")
NO_SPACES = frozenset({"zh", "ja", "th"})
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")


def _post_length(rng: random.Random) -> int:
    """Words per post: GoEmotions posts are short (median about 12 words)."""
    return max(3, min(40, int(rng.lognormvariate(2.4, 0.5))))


def faker_posts(language: str, n: int, seed: int) -> list[str]:
    from faker import Faker

    fake = Faker(FAKER_LANGUAGES[language])
    fake.seed_instance(seed)
    rng = random.Random(seed)
    joiner = "" if language in NO_SPACES else " "
    posts = []
    for _ in range(n):
        words = fake.words(nb=_post_length(rng))
        text = joiner.join(words)
        posts.append(text[:1].upper() + text[1:] + rng.choice(("", ".", "!", "?", "!!")))
    return posts


def wordfreq_posts(language: str, n: int, seed: int) -> list[str]:
    import wordfreq

    vocabulary = [w for w in wordfreq.top_n_list(language, 3000) if not w.isdigit()]
    weights = [wordfreq.word_frequency(w, language) for w in vocabulary]
    rng = random.Random(seed)
    posts = []
    for _ in range(n):
        words = rng.choices(vocabulary, weights=weights, k=_post_length(rng))
        text = " ".join(words)
        posts.append(text[:1].upper() + text[1:] + rng.choice(("", ".", "!", "?")))
    return posts


def _package_files(suffix: str) -> list[Path]:
    roots = [Path(p) for p in sys.path if p.endswith("site-packages")]
    files: list[Path] = []
    for root in roots:
        for name in ("json", "email", "http", "pydantic", "rich", "typer", "orjson", "yaml"):
            folder = root / name
            if folder.is_dir():
                files.extend(sorted(folder.rglob(f"*{suffix}"))[:40])
    std = Path(random.__file__).parent
    files.extend(sorted(std.glob(f"*{suffix}"))[:60])
    return files


def code_posts(n: int, seed: int) -> list[str]:
    lines: list[str] = []
    for path in _package_files(".py"):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            stripped = line.strip()
            if len(stripped) >= 25 and not stripped.startswith(("#", '"', "'")):
                lines.append(stripped)
    rng = random.Random(seed)
    return rng.sample(lines, min(n, len(lines)))


def log_posts(n: int, seed: int) -> list[str]:
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    shapes: list[Callable[[], str]] = [
        lambda: (
            f'{fake.ipv4()} - - [{fake.date_time():%d/%b/%Y:%H:%M:%S} +0000] "'
            f'{rng.choice(("GET", "POST", "PUT"))} {fake.uri_path()} HTTP/1.1" '
            f"{rng.choice((200, 301, 404, 500, 503))} {rng.randint(100, 90000)}"
        ),
        lambda: (
            f"{fake.iso8601()} {rng.choice(LOG_LEVELS)} [{fake.word()}-worker-"
            f"{rng.randint(1, 16)}] {fake.file_path(depth=3)}:{rng.randint(1, 900)} "
            f"connection to {fake.ipv4()}:{fake.port_number()} "
            f"{rng.choice(('refused', 'reset by peer', 'timed out after 30000 ms'))}"
        ),
        lambda: (
            f"{fake.date_time():%b %d %H:%M:%S} {fake.hostname()} "
            f"{rng.choice(('sshd', 'kernel', 'systemd', 'cron'))}[{rng.randint(100, 65000)}]: "
            f"{rng.choice(('Accepted publickey for', 'session opened for user', 'Started'))} "
            f"{fake.user_name()} uid={rng.randint(0, 2000)} pid={rng.randint(2, 99999)}"
        ),
    ]
    return [rng.choice(shapes)() for _ in range(n)]


def url_posts(n: int, seed: int) -> list[str]:
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    posts = []
    for _ in range(n):
        parts = [fake.url() + fake.uri_path() if rng.random() < 0.5 else fake.url()]
        parts += [f"#{fake.word()}{fake.word().title()}" for _ in range(rng.randint(0, 5))]
        parts += [f"@{fake.user_name()}" for _ in range(rng.randint(0, 2))]
        rng.shuffle(parts)
        posts.append(" ".join(parts))
    return posts


def docs_prose_posts(n: int, seed: int) -> list[str]:
    sentences: list[str] = []
    for dist in importlib.metadata.distributions():
        text = " ".join(
            filter(None, [dist.metadata.get("Summary"), dist.metadata.get_payload()])  # type: ignore[attr-defined]
        )
        text = re.sub(r"```.*?```|`[^`]*`|\[[^\]]*\]\([^)]*\)|<[^>]+>|[#*=|>_-]{2,}", " ", text)
        for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            words = sentence.split()
            if 5 <= len(words) <= 40 and sentence[:1].isupper() and "http" not in sentence:
                sentences.append(sentence)
    rng = random.Random(seed)
    unique = sorted(set(sentences))
    return rng.sample(unique, min(n, len(unique)))


def shuffled_posts(texts: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    long_enough = [t for t in texts if len(t.split()) >= 5]
    posts = []
    for text in rng.sample(long_enough, min(n, len(long_enough))):
        words = text.split()
        rng.shuffle(words)
        posts.append(" ".join(words))
    return posts


def make_ood_sets(
    output: Path, in_distribution: list[str], n_per_set: int = 300, seed: int = 0
) -> dict[str, int]:
    """Write every set to ``output/<name>.txt``; returns the posts written per set."""
    sets: dict[str, list[str]] = {}
    for k, language in enumerate(FAKER_LANGUAGES):
        sets[f"lang-{language}"] = faker_posts(language, n_per_set, seed + k)
    for k, language in enumerate(WORDFREQ_LANGUAGES):
        sets[f"lang-{language}"] = wordfreq_posts(language, n_per_set, seed + 100 + k)
    sets["code"] = code_posts(n_per_set, seed)
    sets["logs"] = log_posts(n_per_set, seed)
    sets["urls-hashtags"] = url_posts(n_per_set, seed)
    sets["docs-prose"] = docs_prose_posts(n_per_set, seed)
    if in_distribution:
        sets["shuffled"] = shuffled_posts(in_distribution, n_per_set, seed)
    output.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, posts in sets.items():
        lines = [" ".join(p.split()) for p in posts if p.strip()]
        (output / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written[name] = len(lines)
    return written
