"""Out-of-distribution signals on fixed examples, their combination, the bundle round trip, the
policy's actions and cap, and the evaluation's separation figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from schemas import EnrichedPost, ReviewRequest, SocialPost
from worker.inference.engine import EngineConfig, McDropoutEngine
from worker.inference.loading import Classifier
from worker.inference.uncertainty import McSummary
from worker.ood.calibration import (
    OodCalibration,
    Reference,
    builtin_calibration,
    choose_cut,
    read_calibration,
    write_calibration,
)
from worker.ood.density import fit_class_gaussians
from worker.ood.language import MAX_SCORE, NO_EVIDENCE_FACTOR, LanguageSignal, primary_subtag
from worker.ood.scorer import OodBatch, OodScorer
from worker.ood.tokens import TokenSignals
from worker.routing.budget import ReviewBudget
from worker.routing.policy import OOD_PRIORITY, ReviewPolicy
from worker.routing.rate_cap import RateCap
from worker.routing.router import Router
from worker.settings import OodSettings, ReviewSettings

ENGLISH = "I can't believe how happy this made me, thank you so much!"
GERMAN = "Ich kann nicht glauben, wie glücklich mich das gemacht hat, vielen Dank!"
RUSSIAN = "Я не могу поверить, как это меня обрадовало, большое спасибо!"


# -- language -------------------------------------------------------------------------------------


def test_language_signal_scores_supported_posts_low_and_others_high() -> None:
    signal = LanguageSignal(["en"])
    en, de, ru = signal.score([ENGLISH, GERMAN, RUSSIAN], [None, None, None])
    assert en.language == "en" and en.source == "detected" and en.score < 0.1
    assert de.language == "de" and de.score > 3
    assert ru.language == "ru" and ru.score > 10
    # German becomes supported: its score drops, Russian's stays
    de2, ru2 = LanguageSignal(["en", "de"]).score([GERMAN, RUSSIAN], [None, None])
    assert de2.score < 0.1 and ru2.score > 10


def test_the_producers_lang_wins_over_detection() -> None:
    signal = LanguageSignal(["en"])
    tagged = signal.score([ENGLISH, GERMAN, GERMAN, ENGLISH], ["de-AT", "EN_gb", "und", " "])
    assert [(v.score, v.language, v.source) for v in tagged[:2]] == [
        (MAX_SCORE, "de", "producer"),
        (0.0, "en", "producer"),
    ]
    assert tagged[2].source == "detected" and tagged[2].language == "de"  # und: not set
    assert tagged[3].source == "detected" and tagged[3].language == "en"


def test_a_post_without_letters_gives_the_identifier_nothing_to_go_on() -> None:
    texts = ["lol", "haha ok", "1234567890 12345", "🎉🎉🎉 so so happy 🎉🎉🎉 💕💕💕💕💕💕"]
    short, short2, digits, emoji = LanguageSignal(["en"]).score(texts, [None] * 4)
    assert [v.score for v in (short, short2, digits)] == [0.0] * 3
    assert {short.language, short2.language, digits.language} == {"und"}
    assert emoji.score < 0.3  # emoji are no language, not another language


MIXED = [
    ENGLISH,
    GERMAN,
    RUSSIAN,
    "Je ne peux pas croire à quel point cela m'a rendu heureux, merci beaucoup !",
    "No puedo creer lo feliz que me hizo esto, ¡muchas gracias!",
    "これがどれほど嬉しかったか信じられません、本当にありがとう！",
    "THIS IS THE BEST THING THAT HAPPENED TO ME ALL WEEK",  # all upper: lower-cased first
    "Cafe\u0301 au lait, the combining accent is normalised to NFC first",
    "def route(self, posts): return [p for p in posts if p.score > 0.5]",
    "🎉🎉🎉 so so happy 🎉🎉🎉 💕💕💕💕💕💕",
    "Ich freue mich so sehr! " * 40,  # a long post: the automaton walks far past the others
    "qzxj vbnm wrtp ghkl qzxj vbnm",
    "",
]


def test_the_batched_identifier_gives_py3langids_probabilities_text_by_text() -> None:
    from worker.ood.language import _batch_identifier, _identifier

    batched = _batch_identifier()
    got = batched.probabilities(MIXED)
    for text, row in zip(MIXED, got, strict=True):
        expected = dict(_identifier().rank(text))  # py3langid, one text at a time
        assert set(expected) == set(batched.classes)
        reference = np.array([expected[c] for c in batched.classes])
        np.testing.assert_allclose(row, reference, atol=1e-5)
        assert batched.classes[int(row.argmax())] == max(expected, key=expected.__getitem__)
    assert got.shape == (len(MIXED), len(batched.classes)) and len(batched.classes) > 100
    # no n-gram: uniform over py3langid's columns (a folded script alias holds two)
    n_classes = len(batched.classes)
    assert 0.5 / n_classes < got[-1].min() and got[-1].max() < NO_EVIDENCE_FACTOR / n_classes
    # a batch's texts do not change each other's answers; a small batch (py3langid text by
    # text) gives the same as a large one
    np.testing.assert_allclose(batched.probabilities(MIXED[1:2])[0], got[1], atol=1e-5)
    np.testing.assert_allclose(batched.probabilities(MIXED[:3]), got[:3], atol=1e-5)


def test_language_tags_and_unknown_languages() -> None:
    assert primary_subtag("pt-BR") == "pt" and primary_subtag("zxx") is None
    assert primary_subtag(None) is None
    with pytest.raises(ValueError, match="does not know"):
        LanguageSignal(["en", "klingon"])


# -- tokens ---------------------------------------------------------------------------------------


def test_token_signals_count_pieces_per_word_and_unknown_pieces(
    test_classifier: Classifier,
) -> None:
    tokenizer = test_classifier.tokenizer
    signals = TokenSignals(tokenizer, max_length=128)
    texts = ["hello world", "Ok 🙂 🙂", "2024-01-01T00:00:00Z GET /api/v1/users?id=42 503"]
    ids = tokenizer(texts)["input_ids"]  # with [CLS] and [SEP], which are left out
    per_word, unknown = signals.score(texts, ids)
    assert per_word[0] == 1.0 and unknown[0] == 0.0
    # "ok" and two emoji the vocabulary lacks: 3 pieces for 3 words, 2 unknown
    assert per_word[1] == 1.0 and unknown[1] == pytest.approx(2 / 3)
    assert per_word[2] > 5


def test_a_truncated_post_is_measured_on_its_first_characters(
    test_classifier: Classifier,
) -> None:
    tokenizer = test_classifier.tokenizer
    signals = TokenSignals(tokenizer, max_length=16)
    text = "abcd-efgh " * 200  # 200 words of 4+ pieces each
    cut = tokenizer([text], truncation=True, max_length=16)["input_ids"]
    per_word, _ = signals.score([text], cut)
    assert per_word[0] > 2  # not 14 pieces over 200 words


# -- density --------------------------------------------------------------------------------------


def test_density_is_the_mahalanobis_distance_to_the_nearest_class() -> None:
    rng = np.random.default_rng(0)
    # two classes along the first axis, after scaling to unit length
    x = np.concatenate([rng.normal([5, 0, 0], 0.3, (400, 3)), rng.normal([0, 5, 0], 0.3, (400, 3))])
    labels = [[0]] * 400 + [[1]] * 400
    gaussians = fit_class_gaussians(x, labels, n_classes=3)
    assert gaussians.means.shape == (2, 3)  # class 2 has no post: left out
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cov = np.zeros((3, 3))
    for rows in (slice(0, 400), slice(400, 800)):
        r = unit[rows] - unit[rows].mean(axis=0)
        cov += r.T @ r
    cov /= 800
    cov += np.eye(3) * 1e-6 * np.trace(cov) / 3
    probe = np.array([[1.0, 1.0, 1.0], [5.0, 0.1, 0.0]])
    u = probe / np.linalg.norm(probe, axis=1, keepdims=True)
    by_hand = [
        min(float((v - m) @ np.linalg.inv(cov) @ (v - m)) for m in gaussians.means) for v in u
    ]
    np.testing.assert_allclose(gaussians.distance(probe), by_hand, rtol=1e-6)
    assert by_hand[0] > 100 * by_hand[1]


def test_the_engine_collects_the_middle_layers_mean_over_tokens(
    test_classifier: Classifier,
) -> None:
    texts = ["short one", "a somewhat longer post with more words in it"]
    ids = test_classifier.tokenize(texts)
    engine = McDropoutEngine(
        test_classifier, EngineConfig(mode="off", precision="fp32", feature_layer=3)
    )
    features = engine.predict(ids).features
    assert features is not None and features.shape == (2, 384)
    model = test_classifier.model
    with torch.inference_mode():
        for i, row in enumerate(ids):
            hidden = model.base_model(torch.tensor([row]), output_hidden_states=True)
            expected = hidden.hidden_states[3][0].mean(dim=0).numpy()
            np.testing.assert_allclose(features[i], expected, rtol=1e-4, atol=1e-5)
    assert McDropoutEngine(test_classifier, EngineConfig(mode="off")).predict(ids).features is None


# -- combination, calibration ---------------------------------------------------------------------


def calibration(**changes: Any) -> OodCalibration:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 4))
    density = fit_class_gaussians(x, [[i % 3] for i in range(200)], 3)
    values: dict[str, Any] = {
        "supported_languages": ("en",),
        "references": {
            "language": Reference(0.0, 2.0),
            "density": Reference(10.0, 20.0),
            "tokens_per_word": Reference(1.0, 3.0),
            "unknown_share": Reference(0.0, 0.1),
        },
        "cut": 1.5,
        "false_alarm_rate": 0.01,
        "layer": 3,
        "density": density,
        "source": "bundle",
        "measured": {"reference_posts": 200},
    }
    return OodCalibration(**(values | changes))


def test_reference_scale_and_cut() -> None:
    ref = Reference.of(np.arange(101, dtype=float))
    assert (ref.median, ref.high) == (50.0, 99.0)
    np.testing.assert_allclose(ref.z(np.array([50.0, 99.0, 148.0])), [0.0, 1.0, 2.0])
    scores = np.arange(1000, dtype=float)
    cut = choose_cut(scores, 0.01)
    assert np.mean(scores > cut) == pytest.approx(0.01, abs=0.001)


def test_the_combined_score_is_the_largest_z_and_names_its_signal(
    test_classifier: Classifier,
) -> None:
    cal = calibration()
    scorer = OodScorer(cal, test_classifier.tokenizer, 128)
    texts = [ENGLISH, GERMAN, "x-y-z-w-v-u-t-s-r-q"]
    ids = test_classifier.tokenize(texts)
    features = np.random.default_rng(2).normal(size=(3, 4))
    batch = scorer.score(texts, [None, "de", None], ids, features)
    z = np.stack([batch.z[k] for k in ("language", "density", "tokens_per_word", "unknown_share")])
    np.testing.assert_allclose(batch.score, z.max(axis=0))
    np.testing.assert_allclose(batch.z["density"], (cal.density.distance(features) - 10) / 10)
    assert batch.flagged.tolist() == (batch.score > 1.5).tolist()
    assert batch.flagged[1] and batch.fired[1] == "language"  # the producer said de: z = 15
    assert batch.flagged[2] and batch.fired[2] == "tokens_per_word"
    # without features the density is NaN and the others decide
    no_features = scorer.score(texts, [None, "de", None], ids, None)
    assert np.isnan(no_features.signals["density"]).all()
    assert no_features.flagged[1] and no_features.fired[1] == "language"


def test_a_bundles_calibration_round_trips(tmp_path: Path) -> None:
    cal = calibration()
    write_calibration(tmp_path, cal)
    back = read_calibration(tmp_path)
    assert back is not None
    assert back.references == cal.references and back.cut == cal.cut and back.layer == 3
    assert back.supported_languages == ("en",) and back.measured == cal.measured
    assert back.density is not None and cal.density is not None
    np.testing.assert_allclose(back.density.means, cal.density.means, rtol=1e-6)
    np.testing.assert_allclose(back.density.whitening, cal.density.whitening, rtol=1e-6)
    probe = np.random.default_rng(3).normal(size=(5, 4))
    np.testing.assert_allclose(back.density.distance(probe), cal.density.distance(probe), 1e-5)
    assert read_calibration(tmp_path / "missing") is None
    # a calibration without density leaves no tensor file behind
    write_calibration(tmp_path, builtin_calibration())
    assert not (tmp_path / "ood.safetensors").exists()
    assert read_calibration(tmp_path).signals == ("language",)  # type: ignore[union-attr]


def test_calibration_refuses_a_density_without_statistics() -> None:
    with pytest.raises(ValueError, match="density"):
        calibration(density=None)
    with pytest.raises(ValueError, match="unknown OOD signals"):
        calibration(references={"colour": Reference(0, 1)}, density=None, layer=0)


# -- policy ---------------------------------------------------------------------------------------

LABELS = ["joy", "sadness", "neutral"]
THRESHOLDS = np.array([0.5, 0.5, 0.5])


def stats(n: int) -> McSummary:
    mean = np.tile([0.1, 0.1, 0.9], (n, 1))
    mean[::4, 0] = 0.48  # every fourth post is near a threshold: the budget's candidates
    return McSummary(
        mean=mean,
        std=np.full((n, 3), 0.05),
        n_samples=np.full(n, 10),
        predictive_entropy=np.zeros(n),
        expected_entropy=np.zeros(n),
        mutual_information=np.zeros(n),
        flip_rate=np.zeros((n, 3)),
    )


def ood_batch(flagged: list[bool]) -> OodBatch:
    f = np.array(flagged)
    language = np.where(f, 12.0, 0.1)
    return OodBatch(
        signals={"language": language},
        z={"language": language / 2},
        score=language / 2,
        flagged=f,
        fired=["language" if x else None for x in flagged],
        languages=None,
        cut=1.5,
        references={"language": Reference(0.0, 2.0)},
        supported_languages=("en",),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def route(action: str, flagged: list[bool], cap: float | None = None, clock: Any = None) -> Any:
    review = ReviewSettings(target_rate=0.25, warmup_posts=0)
    budget = ReviewBudget(0.25, warmup=0)
    policy = ReviewPolicy(
        review,
        LABELS,
        THRESHOLDS,
        budget=budget,
        ood=OodSettings(action=action, max_per_minute=cap),  # type: ignore[arg-type]
        ood_cap=RateCap(cap, clock) if clock is not None else None,
    )
    router = Router(
        policy, LABELS, THRESHOLDS, {"name": "t", "n_samples": 10, "mc_mode": "full"}, "w"
    )
    posts = [SocialPost(id=f"p{i}", text="hola" if f else "hello") for i, f in enumerate(flagged)]
    routed = router.route(posts, [None] * len(posts), stats(len(posts)), ood_batch(flagged))
    return routed, budget


def test_review_action_routes_flagged_posts_past_the_budget_without_counting_them() -> None:
    flagged = [i % 10 == 9 for i in range(400)]  # 40 foreign posts among 360 English ones
    routed, budget = route("review", flagged, cap=None)
    for r, f in zip(routed, flagged, strict=True):
        EnrichedPost.model_validate(r.enriched_event())
        ood = r.enriched["uncertainty"]["ood"]
        assert ood["flagged"] is f and ood["signal"] == ("language" if f else None)
        if f:
            assert r.review is not None and r.ood == "review" and ood["action"] == "review"
            request = ReviewRequest.model_validate(r.review_event())
            assert request.reasons[0].rule == "out_of_distribution"
            assert request.reasons[0].signal == "language"
            assert request.priority == OOD_PRIORITY
    # the budget saw only the 360 English posts and routed its quarter of them
    assert budget.seen == 360
    pairs = zip(routed, flagged, strict=True)
    english_routed = sum(r.review is not None for r, f in pairs if not f)
    assert english_routed == budget.routed == 90


def test_the_review_cap_holds_back_a_flood_and_counts_it() -> None:
    clock = Clock()
    flagged = [True] * 50
    routed, budget = route("review", flagged, cap=20, clock=clock)
    assert sum(r.review is not None for r in routed) == 20
    assert [r.ood for r in routed].count("capped") == 30
    assert all(r.enriched["uncertainty"]["ood"]["flagged"] for r in routed)
    assert budget.seen == 0  # capped posts do not fall back to the budget either


def test_rate_cap_is_per_sixty_seconds() -> None:
    clock = Clock()
    cap = RateCap(3, clock)
    assert [cap.take() for _ in range(5)] == [True, True, True, False, False]
    clock.now = 59.9
    assert not cap.take()
    clock.now = 60.0
    assert cap.take() and cap.take() and cap.take() and not cap.take()


def test_topic_action_marks_flagged_posts_for_the_unsupported_topic() -> None:
    flagged = [i % 5 == 0 for i in range(100)]
    routed, budget = route("topic", flagged)
    assert [r.unsupported for r in routed] == flagged
    assert all(r.review is None for r, f in zip(routed, flagged, strict=True) if f)
    assert budget.seen == 80


def test_tag_action_leaves_the_routing_alone_and_explains_a_routed_post() -> None:
    flagged = [i % 5 == 0 for i in range(100)]
    tagged, tag_budget = route("tag", flagged)
    plain, _ = route("tag", [False] * 100)
    assert [r.review is not None for r in tagged] == [r.review is not None for r in plain]
    assert tag_budget.seen == 100
    for r, f in zip(tagged, flagged, strict=True):
        assert r.enriched["uncertainty"]["ood"]["action"] == ("tag" if f else None)
        if f and r.review is not None:
            assert r.review["reasons"][0]["rule"] == "out_of_distribution"
            assert r.review["reasons"][-1]["rule"] == "budget"


# -- evaluation -----------------------------------------------------------------------------------


def test_separation_equals_scikit_learn_and_counts_false_alarms_by_hand() -> None:
    from worker.training.ood_report import separation

    in_dist = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.6, 0.6, 0.05])
    ood = np.array([0.9, 0.6, 0.7, 0.3, 0.95, 0.85, 0.99, 0.75, 0.65, 1.2])
    result = separation(in_dist, ood)
    truth = np.r_[np.zeros(8), np.ones(10)]
    assert result["auroc"] == round(roc_auc_score(truth, np.r_[in_dist, ood]), 4)
    # 95 % of 10 OOD posts needs all 10: the cut is the lowest, 0.3; the in-distribution posts
    # scoring 0.3 or more: 0.4, 0.35, 0.8, 0.6, 0.6 -> 5 of 8
    assert result["fpr_at_95_recall"] == 0.625


def test_the_batch_walk_counts_py3langids_features_text_by_text() -> None:
    """Every byte's state from its last ``window`` bytes alone (the batch walk) gives the feature
    counts of py3langid's own walk over the whole text; one byte less of window does not."""
    import copy

    from py3langid.langid import visit_counts

    from worker.ood.language import _batch_identifier, _identifier
    from worker.ood.language_batch import BatchLanguageIdentifier, encode

    batched, reference = _batch_identifier(), _identifier()
    rng = np.random.default_rng(7)
    noise = ["".join(map(chr, rng.integers(32, 0x3000, int(n)))) for n in rng.integers(1, 300, 40)]
    texts = [t for t in MIXED + noise if t]
    encoded = [encode(t) for t in texts]
    lengths = np.array([len(e) for e in encoded])

    def counts_of(identifier: BatchLanguageIdentifier) -> list[dict[int, int]]:
        rows, features, counts = identifier._feature_counts(encoded, lengths)
        out: list[dict[int, int]] = [{} for _ in texts]
        for r, f, c in zip(rows.tolist(), features.tolist(), counts.tolist(), strict=True):
            out[r][f] = c
        return out

    expected = [
        dict(visit_counts(reference.tk_nextmove, reference._rowbase, reference.tk_output, e) or {})
        for e in encoded
    ]
    assert batched.window == 6
    assert counts_of(batched) == expected
    narrower = copy.copy(batched)
    narrower.window -= 1
    assert counts_of(narrower) != expected
