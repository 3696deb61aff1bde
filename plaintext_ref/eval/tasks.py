"""Offline long-context tasks with deterministic samples (kv_methods.md §16.2).

Every sample is drawn from ``random.Random(f"{task}:{seed}:{length}:{index}")``, so the same
arguments always give the same token ids. ``length`` is the whole sequence budget in tokens of the
model's tokenizer, as in RULER: a generation task's prompt is exactly ``length − max_new_tokens``
tokens (the most haystack units that fit, then the gap of under one unit filled at the very start
with the first tokens of the filler, so that samples of one length batch without padding), and a
prose task's window is exactly ``length`` tokens. Needle tasks record ``answer_span``, the token
range of the answer inside the prompt (for tracing where a KV policy loses it).

Generation tasks (greedy decoding, raw text ending in an answer cue; scored on the decoded text):

* ``passkey`` — landmark-attention format, key at a random depth; ``exact_match`` of the key.
* ``niah`` — one RULER needle "One of the special magic numbers for {key} is: {value}." at depths
  spread evenly over [0, 1] across the samples (depth × length grid); ``string_match_all``.
* ``niah_multikey`` — RULER ``niah_multikey_1``: 4 needles with distinct keys, one is asked.
* ``vt`` — RULER variable tracking: one chain of 4 hops ``VAR B = VAR A``; every name in the
  chain must be listed.
* ``cwe`` — RULER common-words extraction over a numbered word list.
* ``niah_prose`` — ``niah`` with a haystack of corpus prose instead of the noise filler (needs a
  corpus; samples are assembled in token space).

Retrieval haystacks are RULER's *noise* variant (the repeated "The grass is green…" filler):
SmolLM2 retrieves from it up to 8K tokens but from real prose only to ≈1K (env_probe.md §4).

Prose tasks (teacher-forced over the last ``continuation`` tokens of a corpus window):

* ``ppl`` — perplexity of the continuation with the policy's cache.
* ``fidelity`` — KL(full ‖ policy) and top-1 agreement of the next-token distributions.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from transformers import PreTrainedTokenizerBase

from plaintext_ref.eval import metrics

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
              "kind", "lucky", "mellow", "noisy", "odd", "proud", "quiet", "rapid", "shiny", "tidy",
              "upbeat", "vivid", "wise", "young", "zesty", "bold", "crisp", "fuzzy", "grand", "humble")
NOUNS = ("apple", "bridge", "candle", "dragon", "engine", "forest", "garden", "harbor", "island",
         "jacket", "kettle", "lantern", "mirror", "needle", "orchard", "pencil", "river", "saddle",
         "tunnel", "valley", "wagon", "window", "meadow", "falcon", "violin", "compass", "feather",
         "glacier", "pepper", "rocket")
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass(frozen=True)
class Sample:
    input_ids: list[int]  # (S,) prompt tokens, or the whole window for prose tasks
    answers: tuple[str, ...]  # strings the prediction is scored against (empty for prose tasks)
    meta: dict[str, object] = field(default_factory=dict)  # public details: depth, key, offset...


def sample_rng(task: str, seed: int, length: int, index: int) -> random.Random:
    """The generator of one sample; str seeds hash with SHA-512, independent of PYTHONHASHSEED."""
    return random.Random(f"{task}:{seed}:{length}:{index}")


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text).input_ids


def fit_prompt(tokenizer: PreTrainedTokenizerBase, render: Callable[[int], str], budget: int) -> tuple[list[int], int]:
    """Token ids of ``render(c)`` for the largest unit count c whose prompt fits in ``budget`` tokens.

    ``render`` must grow with c (≥ 1 token per unit); an exponential then a binary search tokenizes
    O(log budget) prompts.
    """
    ids = encode(tokenizer, render(0))
    if len(ids) > budget:
        raise ValueError(f"length too short: the task's fixed text alone is {len(ids)} tokens, "
                         f"over the prompt budget of {budget}")
    lo, hi = 0, 1  # invariant: render(lo) fits
    while hi <= budget and len(encode(tokenizer, render(hi))) <= budget:
        lo, hi = hi, 2 * hi
    hi = min(hi, budget + 1)  # render(hi) does not fit (or hi exceeds any fitting count)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(encode(tokenizer, render(mid))) <= budget else (lo, mid)
    return encode(tokenizer, render(lo)), lo


def noise_haystack(count: int, needles: list[tuple[float, str]]) -> str:
    """``count`` copies of NOISE with each (depth ∈ [0, 1], sentence) inserted at round(depth·count)."""
    units = [NOISE] * count
    # Last position first; needles landing on one position keep their list order.
    for depth, _, sentence in sorted(((d, i, s) for i, (d, s) in enumerate(needles)), reverse=True):
        units.insert(round(depth * count), sentence)
    return " ".join(units)


def answer_span(tokenizer: PreTrainedTokenizerBase, text: str, answer: str) -> tuple[int, int] | None:
    """Token range [start, end) of the first occurrence of ``answer`` in ``encode(text)``, or None
    (no occurrence, or a tokenizer without offsets)."""
    at = text.find(answer)
    if at < 0:
        return None
    try:
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    except (TypeError, KeyError, NotImplementedError):
        return None
    hit = [i for i, (a, b) in enumerate(offsets) if a < at + len(answer) and b > at]
    return (hit[0], hit[-1] + 1) if hit else None


def magic_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


class GenerationTask(ABC):
    """A task answered by greedy generation; subclasses draw one sample's text and answers."""

    name: ClassVar[str]
    metric: ClassVar[str] = "string_match_all"
    max_new_tokens: int

    @abstractmethod
    def draw(self, rng: random.Random, index: int, n: int) -> tuple[Callable[[int], str], tuple[str, ...], dict]:
        """(render: unit count → prompt text, answers, meta) for sample ``index`` of ``n``."""

    needs_corpus: ClassVar[bool] = False

    def sample(self, tokenizer: PreTrainedTokenizerBase, length: int, seed: int, index: int, n: int,
               corpus_ids: list[int] | None = None) -> Sample:
        """Sample ``index`` of ``n``: a prompt of exactly ``length − max_new_tokens`` tokens."""
        render, answers, meta = self.draw(sample_rng(self.name, seed, length, index), index, n)
        budget = length - self.max_new_tokens
        try:
            ids, count = fit_prompt(tokenizer, render, budget)
        except ValueError as err:
            raise ValueError(f"task {self.name!r} at length {length}: {err}") from None
        gap = budget - len(ids)
        filler = encode(tokenizer, " ".join([NOISE] * (gap // 4 + 2)) + " ")[:gap]
        span = answer_span(tokenizer, render(count), answers[0]) if answers else None
        meta = {**meta, "units": count, "prompt_tokens": budget, "filler_tokens": gap}
        if span is not None:
            meta["answer_span"] = [span[0] + gap, span[1] + gap]
        return Sample(filler + ids, answers, meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return metrics.string_match_all(prediction, sample.answers)


@dataclass
class Passkey(GenerationTask):
    """Landmark-attention passkey: "The pass key is N. Remember it. N is the pass key." in filler."""

    name: ClassVar[str] = "passkey"
    metric: ClassVar[str] = "exact_match"
    max_new_tokens: int = 8

    def draw(self, rng, index, n):
        key, depth = str(rng.randint(10000, 99999)), rng.random()
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        head = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will quiz you about the important information there.\n\n")
        tail = "\n\nWhat is the pass key? The pass key is"
        return (lambda c: head + noise_haystack(c, [(depth, needle)]) + tail), (key,), {"depth": depth}

    def score(self, prediction, sample):
        return metrics.exact_match(prediction, sample.answers[0])


RULER_NIAH_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to "
                   "memorize it. I will quiz you about the numbers afterwards.\n")


def niah_question(key: str) -> str:
    return (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is")


@dataclass
class Niah(GenerationTask):
    """RULER ``niah_single_1`` (noise haystack, 7-digit value); depth = index / (n − 1)."""

    name: ClassVar[str] = "niah"
    max_new_tokens: int = 12

    def draw(self, rng, index, n):
        key, value = magic_key(rng), str(rng.randint(1_000_000, 9_999_999))
        depth = index / (n - 1) if n > 1 else 0.5
        needle = f"One of the special magic numbers for {key} is: {value}."
        render = lambda c: RULER_NIAH_HEAD + noise_haystack(c, [(depth, needle)]) + niah_question(key)
        return render, (value,), {"depth": depth, "key": key}


@dataclass
class NiahProse(Niah):
    """``niah`` in a window of corpus prose: head + prose[:p] + needle + prose[p:] + question, in tokens."""

    name: ClassVar[str] = "niah_prose"
    needs_corpus: ClassVar[bool] = True

    def sample(self, tokenizer, length, seed, index, n, corpus_ids=None):
        if corpus_ids is None:
            raise ValueError(f"task {self.name!r} needs corpus_ids")
        rng = sample_rng(self.name, seed, length, index)
        key, value = magic_key(rng), str(rng.randint(1_000_000, 9_999_999))
        depth = index / (n - 1) if n > 1 else 0.5
        needle_text = f" One of the special magic numbers for {key} is: {value}. "
        head, needle, question = (encode(tokenizer, t) for t in (RULER_NIAH_HEAD, needle_text, niah_question(key)))
        n_hay = length - self.max_new_tokens - len(head) - len(needle) - len(question)
        if n_hay < 1 or len(corpus_ids) < n_hay:
            raise ValueError(f"task {self.name!r} at length {length}: no room for a haystack "
                             f"({n_hay} tokens; corpus {len(corpus_ids)})")
        offset = rng.randrange(len(corpus_ids) - n_hay + 1)
        hay, cut = corpus_ids[offset:offset + n_hay], round(depth * n_hay)
        ids = head + hay[:cut] + needle + hay[cut:] + question
        span = answer_span(tokenizer, needle_text, value)
        start = len(head) + cut
        meta = {"depth": depth, "key": key, "offset": offset, "prompt_tokens": len(ids)}
        if span is not None:
            meta["answer_span"] = [start + span[0], start + span[1]]
        return Sample(ids, (value,), meta)


@dataclass
class NiahMultikey(GenerationTask):
    """RULER ``niah_multikey_1`` with the noise haystack: ``needles`` distinct keys, one is asked."""

    name: ClassVar[str] = "niah_multikey"
    max_new_tokens: int = 12
    needles: int = 4

    def __post_init__(self):
        assert 1 <= self.needles <= 20, f"needles={self.needles} must be in [1, 20]"

    def draw(self, rng, index, n):
        keys = []
        while len(keys) < self.needles:
            if (key := magic_key(rng)) not in keys:
                keys.append(key)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        depths = [rng.random() for _ in keys]
        asked = rng.randrange(self.needles)
        needles = [(d, f"One of the special magic numbers for {k} is: {v}.")
                   for d, k, v in zip(depths, keys, values)]
        render = lambda c: RULER_NIAH_HEAD + noise_haystack(c, needles) + niah_question(keys[asked])
        return render, (values[asked],), {"depth": depths[asked], "key": keys[asked]}


@dataclass
class VariableTracking(GenerationTask):
    """RULER ``vt``: ``VAR X1 = N`` then ``hops`` assignments ``VAR Xi = VAR Xi-1`` in the filler."""

    name: ClassVar[str] = "vt"
    max_new_tokens: int = 30
    hops: int = 4

    def __post_init__(self):
        assert 1 <= self.hops <= 10, f"hops={self.hops} must be in [1, 10]"

    def draw(self, rng, index, n):
        names = []
        while len(names) < self.hops + 1:
            if (name := "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))) not in names:
                names.append(name)
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        depths = sorted(rng.random() for _ in chain)
        head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain(s) of variables assignment in the text above, "
                f"{len(names)} variables are assigned the value {value}, they are:")
        return (lambda c: head + noise_haystack(c, list(zip(depths, chain))) + tail), tuple(names), {}


def pseudo_words(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct three-syllable pseudo-words (consonant + vowel syllables), e.g. "bakute"."""
    words: dict[str, None] = {}  # insertion-ordered set
    while len(words) < k:
        words["".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(3))] = None
    return list(words)


@dataclass
class CommonWords(GenerationTask):
    """RULER ``cwe``: ``common`` words appear ``freq_common`` times each in a shuffled numbered
    list, every other word ``freq_rare`` times; the unit count is the number of rare words.

    Deviations: pseudo-words instead of the ``wonderwords`` lists (no extra dependency), and
    freq_common 10 instead of RULER's 30, so that the common words alone fit in 1K tokens.
    """

    name: ClassVar[str] = "cwe"
    max_new_tokens: int = 60
    common: int = 10
    freq_common: int = 10
    freq_rare: int = 3
    vocab: int = 4096

    def __post_init__(self):
        assert self.freq_common > self.freq_rare >= 1, (
            f"need freq_common > freq_rare >= 1, got {self.freq_common}, {self.freq_rare}")

    def draw(self, rng, index, n):
        vocab = pseudo_words(rng, self.vocab)
        common, rare = vocab[:self.common], vocab[self.common:]
        shuffle_seed = rng.random()

        def render(c: int) -> str:
            words = common * self.freq_common + rare[:c] * self.freq_rare
            random.Random(f"{shuffle_seed}:{c}").shuffle(words)
            listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
            return ("Below is a numbered list of words. In these words, some appear more often than "
                    "others. Memorize the ones that appear most often.\n" + listing +
                    f"\nQuestion: What are the {self.common} most common words in the above list? "
                    f"Answer: The top {self.common} words that appear most often in the list are:")
        return render, tuple(common), {}


@dataclass
class ProseTask:
    """A window of ``length`` corpus tokens; the last ``continuation`` are teacher-forced."""

    name: str
    metric: str
    continuation: int = 64

    def __post_init__(self):
        assert self.continuation >= 1, f"continuation={self.continuation} must be >= 1"

    def sample(self, corpus_ids: list[int], length: int, seed: int, index: int) -> Sample:
        if length <= self.continuation:
            raise ValueError(f"length {length} must exceed the continuation ({self.continuation})")
        if len(corpus_ids) < length:
            raise ValueError(f"the corpus has {len(corpus_ids)} tokens, fewer than length {length}")
        offset = sample_rng(self.name, seed, length, index).randrange(len(corpus_ids) - length + 1)
        return Sample(corpus_ids[offset:offset + length], (),
                      {"offset": offset, "prefix_len": length - self.continuation})


GENERATION_TASKS: dict[str, Callable[[], GenerationTask]] = {
    cls.name: cls for cls in (Passkey, Niah, NiahMultikey, VariableTracking, CommonWords, NiahProse)}
PROSE_TASKS: dict[str, Callable[[], ProseTask]] = {
    "ppl": lambda: ProseTask("ppl", "perplexity"),
    "fidelity": lambda: ProseTask("fidelity", "kl"),
}
TASKS = (*GENERATION_TASKS, *PROSE_TASKS)


def resolve_tasks(spec: str) -> list[str]:
    """Comma-separated task names, or ``all``; raises ValueError naming an unknown task."""
    names = list(TASKS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or [spec]}; choose from {', '.join(TASKS)} or 'all'")
    return names
