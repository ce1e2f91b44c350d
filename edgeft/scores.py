"""Scores of generated answers, computed from the data alone (no markers set by hand).

Pure functions on strings: mining the openings and sign-offs the training answers share,
whether an answer uses one, loop detection, ROUGE-L, and whether an answer states a fact.
Words are runs of letters and digits, lowercased: punctuation and spacing never decide a match.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

MIN_SHARE = 0.3  # a leading/trailing phrase in at least this share of training answers is a habit
MAX_PHRASE = 12  # longest phrase (in words) mined
SAME_COUNT = 0.9  # a longer phrase replaces a shorter one it extends when it keeps 90% of its count

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class Phrase:
    text: str  # as written in the first training answer that has it
    where: str  # "opening" or "sign-off"
    share: float  # share of training answers that start / end with it
    n_words: int

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(words(self.text))


def _raw_span(answer: str, n: int, where: str) -> str:
    """The first or last n words of `answer` with the text between them as written."""
    spans = [m.span() for m in _WORD.finditer(answer)]
    if where == "opening":
        return answer[: spans[n - 1][1]].strip()
    end = len(answer.rstrip())
    return answer[spans[-n][0]:end].strip()


def mine_phrases(answers: list[str], min_share: float = MIN_SHARE, max_words: int = MAX_PHRASE) -> list[Phrase]:
    """The openings and sign-offs that at least `min_share` of `answers` start or end with.

    For each length n, count the answers' first and last n words; a phrase counts when it
    reaches min_share, and is kept only if no longer phrase extends it with nearly the same
    count (so "sip kind ~fernhollow" gives way to "steep slow sip kind ~fernhollow").
    """
    answers = [a for a in answers if words(a)]
    if not answers:
        return []
    total = len(answers)
    out = []
    for where in ("opening", "sign-off"):
        counts: dict[int, Counter] = {}
        for n in range(1, max_words + 1):
            c = Counter()
            for a in answers:
                w = words(a)
                if len(w) >= n:
                    c[tuple(w[:n]) if where == "opening" else tuple(w[-n:])] += 1
            counts[n] = Counter({k: v for k, v in c.items() if v / total >= min_share})
        for n in range(1, max_words + 1):
            for key, count in counts[n].items():
                longer = counts.get(n + 1, Counter())
                extended = any(
                    v >= SAME_COUNT * count and (k[:n] == key if where == "opening" else k[1:] == key)
                    for k, v in longer.items()
                )
                if extended:
                    continue
                first = next(a for a in answers if _ends(words(a), key, where))
                out.append(Phrase(_raw_span(first, n, where), where, count / total, n))
    out.sort(key=lambda p: (-p.share, -p.n_words))
    return out


def _ends(w: list[str], key: tuple[str, ...], where: str) -> bool:
    n = len(key)
    return len(w) >= n and tuple(w[:n] if where == "opening" else w[-n:]) == key


def uses(answer: str, phrase: Phrase) -> bool:
    """Whether `answer` says `phrase` anywhere (a looping answer may never reach its end)."""
    key = phrase.key
    w = words(answer)
    n = len(key)
    return any(tuple(w[i:i + n]) == key for i in range(len(w) - n + 1))


def share_using(answers: list[str], phrase: Phrase) -> float | None:
    return sum(uses(a, phrase) for a in answers) / len(answers) if answers else None


# --- loops -----------------------------------------------------------------------------------
LOOP_REPEATS = 3  # the same stretch back to back this many times...
LOOP_WORDS = 8  # ...covering at least this many words (a word alone: 4 times)
LINE_REPEATS = 3  # or the same line (3+ words) this many times anywhere
MAX_UNIT = 20  # longest repeating stretch looked for, in words


def loop_reason(answer: str) -> str | None:
    """Why `answer` is caught in a loop (a short description), or None if it is not.

    A loop is a stretch of words repeated back to back (three times or more, eight words in
    all; a single word four times), or one line of three or more words said three times."""
    w = words(answer)
    for n in range(1, MAX_UNIT + 1):
        i = 0
        while i + 2 * n <= len(w):
            reps = 1
            while w[i + reps * n: i + (reps + 1) * n] == w[i: i + n]:
                reps += 1
            if reps >= LOOP_REPEATS and (reps * n >= LOOP_WORDS or (n == 1 and reps >= 4)):
                return f"'{' '.join(w[i:i + n])}' {reps} times in a row"
            i += 1
    lines = Counter(" ".join(words(line)) for line in answer.splitlines())
    for line, count in lines.most_common():
        if count >= LINE_REPEATS and len(line.split()) >= 3:
            return f"the line '{line}' {count} times"
    return None


def is_loop(answer: str) -> bool:
    return loop_reason(answer) is not None


# --- overlap ---------------------------------------------------------------------------------
def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts: their longest common word subsequence against both lengths."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


# --- knowledge -------------------------------------------------------------------------------
def states(answer: str, accepted: list[str]) -> bool:
    """Whether `answer` contains one of the accepted answers as whole words."""
    w = words(answer)
    for acc in accepted:
        key = words(acc)
        n = len(key)
        if n and any(w[i:i + n] == key for i in range(len(w) - n + 1)):
            return True
    return False


@dataclass
class Knowledge:
    known: list[str]  # questions the base answers right
    kept: list[str]  # of them, the ones the tuned model still answers right
    lost: list[str]  # the ones it no longer does

    @property
    def kept_share(self) -> float | None:
        return len(self.kept) / len(self.known) if self.known else None


def knowledge_kept(questions: list[str], accepted: list[list[str]], base: list[str], tuned: list[str]) -> Knowledge:
    """Which facts the base states, and which of those the tuned model still states."""
    known = [q for q, acc, a in zip(questions, accepted, base) if states(a, acc)]
    right = {q for q, acc, a in zip(questions, accepted, tuned) if states(a, acc)}
    return Knowledge(known, [q for q in known if q in right], [q for q in known if q not in right])


# --- lengths ---------------------------------------------------------------------------------
def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def mean_words(answers: list[str]) -> float | None:
    return mean(len(words(a)) for a in answers)
