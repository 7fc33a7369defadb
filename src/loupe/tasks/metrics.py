"""The benchmarks' metrics, as their official scripts (and lmms-eval, which follows them) define them.

- `vqa_accuracy`: VQA accuracy with EvalAI's answer normalisation, averaged over the
  leave-one-out subsets of the ten human answers: for each answer left out,
  min(1, matches among the other nine / 3) (TextVQA, VQAv2).
- `anls`: DocVQA's average normalised Levenshtein similarity: 1 - the smallest normalised
  edit distance to any ground truth (lower-cased, whitespace collapsed), 0 below 0.5.
- `relaxed_accuracy`: ChartQA's: numbers (a trailing % divides by 100) within 5% of a
  non-zero target, anything else an exact case-insensitive match.
- `option_letter`: the option a free-form answer names ("B", "(B)", "B.", "B) cat", "The
  answer is B", or the text of exactly one option), for the multiple-choice sets.
- `yes_no`: POPE's reading of an answer as yes or no.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# ---- EvalAI's answer normalisation (the VQA evaluation script) ----------------------------------
# Contracted forms; EvalAI maps each spelling without its apostrophes (and, for the double
# contractions, with either one missing) to the form itself.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've"
).split()


def _spellings(form: str) -> set[str]:
    """The apostrophe-less spellings EvalAI maps back to `form`."""
    parts = form.split("'")
    out = {"".join(parts)}
    if len(parts) == 3:  # double contractions: either apostrophe missing
        out |= {parts[0] + parts[1] + "'" + parts[2], parts[0] + "'" + parts[1] + parts[2]}
    return out - {form}


CONTRACTIONS = {spelling: form for form in _CONTRACTED for spelling in _spellings(form)}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# As written in the official script: "(?!<=\d)" is a lookahead (not a lookbehind), so a period
# before a non-digit goes whatever precedes it; kept so that scores match theirs.
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_IN_NUMBER = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        glued = (p + " " in text or " " + p in text) or COMMA_IN_NUMBER.search(text) is not None
        out = out.replace(p, "" if glued else " ")
    return PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalise_answer(text: str) -> str:
    """EvalAI's normalisation of one answer (lower case, punctuation, number words, articles, contractions)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] of one prediction against the human answers (usually ten)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one ground-truth answer")
    pred = normalise_answer(prediction)
    gts = [normalise_answer(a) for a in answers]
    scores = [min(1.0, sum(g == pred for k, g in enumerate(gts) if k != left) / 3) for left in range(len(gts))]
    return sum(scores) / len(scores)


# ---- ANLS ------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA's ANLS of one prediction in [0, 1]."""
    if not answers:
        raise ValueError("ANLS needs at least one ground-truth answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        longest = max(len(gt), len(pred))
        distances.append(0.0 if longest == 0 else levenshtein(gt, pred) / longest)
    score = 1 - min(distances)
    return 0.0 if score < threshold else score


# ---- ChartQA ----------------------------------------------------------------------------------
def _number(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """1.0 if `prediction` is within `tolerance` of a numeric non-zero `target` (else equal ignoring case)."""
    pred, gt = prediction.strip(), target.strip()
    p, t = _number(pred), _number(gt)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= tolerance)
    return float(pred.lower() == gt.lower())


# ---- multiple choice, yes / no ----------------------------------------------------------------
LETTERS = "ABCDEFGHIJ"
_LEAD = re.compile(r"^\W*\(?([A-J])(?:[\).:,]|\s|$)")
_SAYS = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\b", re.IGNORECASE)


def option_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The letter of the option `prediction` names, or None when it names none (or several)."""
    text = prediction.strip()
    valid = LETTERS[: len(options)]
    for pattern in (_LEAD, _SAYS):
        m = pattern.search(text)
        if m and m.group(1).upper() in valid:
            return m.group(1).upper()
    named = [LETTERS[k] for k, option in enumerate(options) if option and option.strip().lower() in text.lower()]
    return named[0] if len(named) == 1 else None


_MAG_SAYS = re.compile(r"The answer is ([A-D])")
_MAG_OPTIONS = re.compile(r"A\. (.+?), B\. (.+?), C\. (.+?), D\. (.+)")


def magnifier_letter(prediction: str, instruction: str) -> str:
    """MagnifierBench's parse, as its authors' evaluation (Otter's `parse_pred_ans`) does it, in
    order: "The answer is X"; the first of A-D appearing anywhere in the prediction (case
    sensitive, so "A red sign" reads as A: their rule, kept for comparable numbers); an
    option's text inside the prediction (options read from "A. x, B. y, C. z, D. w" in the
    instruction, a trailing . , ? dropped); A-D in the upper-cased prediction; else "other"."""
    m = _MAG_SAYS.search(prediction)
    if m:
        return m.group(1)
    for letter in "ABCD":
        if letter in prediction:
            return letter
    m = _MAG_OPTIONS.search(instruction)
    if m:
        for letter, option in zip("ABCD", m.groups(), strict=True):
            option = option.strip()
            option = option[:-1] if option.endswith((".", ",", "?")) else option
            if option.upper() in prediction.upper():
                return letter
    for letter in "ABCD":
        if letter in prediction.upper():
            return letter
    return "other"


def yes_no(prediction: str) -> str:
    """POPE's reading (LLaVA's eval_pope): of the first sentence, "no" if a word is no or
    not, else "yes"."""
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"
