"""py3langid's naive Bayes language identifier, run on a whole batch at once.

py3langid classifies one text at a time: a byte-by-byte walk of its n-gram automaton in a Python
loop, then a small matrix product. At ~90 µs a post that walk was most of a worker's time when
inference is fast (the transport bench: 5,281 posts/s with the language signal, 9,171 without).
Here every byte of the batch is walked at once: the automaton's state after a byte depends on
the last six bytes only (``_feature_counts``), so six numpy gathers over the whole batch give
every state, however long its texts; the feature counts of the whole batch are counted in one
pass and meet the model's table in one sparse product (torch's: scipy is no dependency of the
worker). Same model, same arithmetic as ``LanguageIdentifier._decide``
(log1p counts, class priors, a softmax at temperature √bytes, script aliases folded into their
first column); only the order of float32 additions differs (tests: the probabilities agree with
py3langid's to 1e-5, text by text). GoEmotions dev posts: 11 µs a post in batches of 512 and
23 in batches of 64, against ~90 one at a time (docs/performance.md).
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SMALL_BATCH = 8  # fewer texts: py3langid text by text (1 text: 147 against 344 µs, the old walk)
DENSE_LIMIT = 200_000  # posts x distinct n-grams below which a dense product is cheaper


def encode(text: str) -> bytes:
    """The bytes py3langid reads (``LanguageIdentifier._encode``): lower-cased when all upper,
    NFC, UTF-8 (lone surrogates kept)."""
    if text.isupper():
        text = text.lower()
    return unicodedata.normalize("NFC", text).encode("utf8", errors="surrogatepass")


def automaton_depth(next_move: np.ndarray, row_base: np.ndarray) -> int:
    """The most bytes any state of the automaton stands for: its greatest distance from the start
    state, breadth first over every byte (in Aho-Corasick's automaton the shortest input that
    reaches a state is the n-gram prefix the state stands for). 6 for py3langid's model, found
    in 0.06 s; states that share a row of moves are expanded once."""
    n_states = len(row_base)
    moves = next_move.reshape(-1, 256)
    rows = row_base >> 8
    depth = np.full(n_states, -1, dtype=np.int64)
    depth[0], frontier, distance = 0, np.zeros(1, dtype=np.intp), 0
    while len(frontier):
        distance += 1
        reached = np.zeros(n_states, dtype=bool)
        reached[moves[np.unique(rows[frontier])].ravel()] = True
        frontier = np.flatnonzero(reached & (depth < 0))
        depth[frontier] = distance
    return int(depth.max())


class BatchLanguageIdentifier:
    """Class probabilities for many texts; ``classes`` names the columns (one per language:
    duplicated script aliases are folded into the first and dropped)."""

    def __init__(self, identifier: Any) -> None:
        self._identifier = identifier
        self._lock = threading.Lock()
        self.next_move = np.frombuffer(identifier.tk_nextmove, dtype=np.uint32).astype(np.int32)
        self.row_base = (np.asarray(identifier.tk_row, dtype=np.int32) << 8).astype(np.int32)
        self.output = np.asarray(identifier.tk_output, dtype=np.int32)
        if self.output[0] >= 0:  # the start state stands for "past the end": it must emit nothing
            raise ValueError("the identifier's start state emits a feature")
        self.n_features = int(identifier.nb_ptc.shape[0])
        self.table = identifier.nb_ptc  # (features, columns), float16 in py3langid's model
        self.priors = np.asarray(identifier.nb_pc, dtype=np.float32)
        first: dict[str, int] = {}
        self._folds: list[tuple[int, int]] = []
        for column, name in enumerate(identifier.nb_classes):
            if name in first:
                self._folds.append((first[name], column))
            else:
                first[name] = column
        self._keep = np.array(sorted(first.values()), dtype=np.intp)
        self.classes: list[str] = [identifier.nb_classes[c] for c in self._keep]
        self.window = automaton_depth(self.next_move, self.row_base)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """(texts, classes) float32; a row is uniform when its text has no known n-gram."""
        if len(texts) < SMALL_BATCH:  # numpy set-up costs more than py3langid's loop
            with self._lock:  # py3langid's identifier is not documented as thread-safe
                ranked = [dict(self._identifier.rank(t)) for t in texts]
            return np.array([[r[c] for c in self.classes] for r in ranked], dtype=np.float32)
        encoded = [encode(t) for t in texts]
        n, n_columns = len(encoded), len(self.priors)
        scores = np.zeros((n, n_columns), dtype=np.float32)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=n)
        if n and lengths.max() > 0:
            rows, features, counts = self._feature_counts(encoded, lengths)
            if len(rows):
                used, compact = np.unique(features, return_inverse=True)
                weights = np.log1p(counts.astype(np.float32))
                table = self.table[used].astype(np.float32)
                if n * len(used) <= DENSE_LIMIT:  # a few posts: numpy, no sparse set-up
                    dense = np.zeros((n, len(used)), dtype=np.float32)
                    dense[rows, compact] = weights
                    scores = dense @ table
                else:
                    sparse = torch.sparse_coo_tensor(
                        torch.from_numpy(np.stack([rows, compact])),
                        torch.from_numpy(weights),
                        size=(n, len(used)),
                        check_invariants=False,  # built from np.unique: indices in range
                    )
                    scores = torch.sparse.mm(sparse, torch.from_numpy(table)).numpy()
                has_features = np.zeros(n, dtype=bool)
                has_features[rows] = True
                scores[has_features] += self.priors
        scores *= (1.0 / np.sqrt(np.maximum(lengths, 1))).astype(np.float32)[:, None]
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=1, keepdims=True)
        for first, duplicate in self._folds:
            scores[:, first] += scores[:, duplicate]
        return scores[:, self._keep]

    def _feature_counts(
        self, encoded: list[bytes], lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, feature, count) for every feature the automaton emits on each text.

        The automaton is Aho-Corasick's: after any input its state stands for the longest suffix
        of that input that begins some n-gram, at most ``window`` bytes. So the state after a
        byte is the one reached from the start state over the last ``window`` bytes alone, and
        every byte of the batch gets its state at once: ``window`` gathers over the whole batch,
        however long its longest text."""
        n = len(encoded)
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int32)
        rows = np.repeat(np.arange(n), lengths)
        offsets = np.arange(len(data)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        next_move, row_base = self.next_move, self.row_base
        state = np.zeros(len(data), dtype=np.int32)
        for back in range(self.window - 1, 0, -1):  # the byte ``back`` places before, if any
            at = np.flatnonzero(offsets >= back)
            state[at] = next_move[row_base[state[at]] + data[at - back]]
        state = next_move[row_base[state] + data]
        emitted = self.output[state]
        hits = np.flatnonzero(emitted >= 0)
        keys = rows[hits].astype(np.int64) * self.n_features + emitted[hits]
        unique, counts = np.unique(keys, return_counts=True)
        return unique // self.n_features, unique % self.n_features, counts
