"""Tokenizers for Llama-family checkpoints: built from GGUF metadata, or from a HF directory.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary, the merges and the special
token ids as metadata under llama.cpp's key names (``tokenizer.ggml.tokens``, ``.merges``,
``.token_type``, ``.bos_token_id``, …) and the chat template as ``tokenizer.chat_template``.
`from_gguf_metadata` rebuilds the tokenizer with the ``tokenizers`` library the way transformers
does (``transformers/integrations/gguf/gguf_tokenizer_mapping.py``), so both give the same ids:

* ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE, as SmolLM2, Llama 3, Qwen): a BPE model on the
  vocabulary and merges, GPT-2's byte-level pre-tokenizer (its split regex, unless the file's
  ``tokenizer.ggml.pre`` names one of the families transformers knows another regex for) and the
  byte-level decoder. Tokens whose type is CONTROL (3) are added as special tokens, so ``<|im_end|>``
  in a text stays one token; USER_DEFINED (4) ones as plain added tokens.
* Other tokenizer models (sentencepiece "llama", "t5", …) are not implemented: `NotImplementedError`.

`LlamaTokenizer` wraps the result with the ids the model needs (bos, eos, pad) and the chat
template. Templates are Jinja; ``jinja2`` renders them when it is installed (as transformers does:
sandboxed, ``trim_blocks``, ``lstrip_blocks``). Without it, ChatML templates (``<|im_start|>role\\n
content<|im_end|>\\n``, SmolLM2's and Qwen's) are recognised and rendered by `render_chatml`, the
template's default system message included; any other template then raises.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Sequence

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

try:  # jinja2 is optional (not a dependency of the `train` extra): without it, `render_chatml`
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:
    ImmutableSandboxedEnvironment = None

__all__ = ["LlamaTokenizer", "from_gguf_metadata", "byte_level_bpe", "render_chatml",
           "gguf_metadata", "bytes_to_unicode"]

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

# Split regexes transformers uses instead of GPT-2's for these `tokenizer.ggml.pre` names
# (a subset: the Llama-3 family). Any other name keeps GPT-2's regex, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {name: _LLAMA3_SPLIT for name in (
    "llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")}


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character table (the alphabet byte-level vocabularies are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def gguf_metadata(reader) -> dict[str, Any]:
    """Every metadata field of a `gguf.GGUFReader` as a Python value (str, int, float, list)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None = None,
                   pre: str | None = None) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from a GGUF vocabulary (see the module docstring).

    A token spelled outside the byte alphabet (a literal space, say) is respelled byte by byte,
    as transformers does; ids are the vocabulary positions.
    """
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    types = list(token_types) if token_types is not None else []
    # A CONTROL token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would
    # grow the vocabulary past the model's (transformers skips it too).
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    return tok


# --------------------------------------------------------------------------------------------
# chat templates

_CHATML_TURN = "'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'"
_CHATML_DEFAULT_SYSTEM = re.compile(
    r"\{%-? if loop\.first and messages\[0\]\['role'\] != 'system' -?%\}\{\{ '<\|im_start\|>system\n"
    r"(?P<text>.*?)<\|im_end\|>\n' \}\}\{%-? endif -?%\}", re.S)


def render_chatml(template: str, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Render a ChatML chat template without Jinja: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``
    per message, after the template's default system message when the first message is not a
    system one, then ``<|im_start|>assistant\\n`` if `add_generation_prompt`.

    Raises `NotImplementedError` for a template that is not of this form (install ``jinja2``).
    """
    if _CHATML_TURN not in template:
        raise NotImplementedError(
            "this chat template is not ChatML; rendering it needs jinja2 (pip install jinja2)")
    default = _CHATML_DEFAULT_SYSTEM.search(template)
    out = []
    if default is not None and messages and messages[0]["role"] != "system":
        out.append(f"<|im_start|>system\n{default['text']}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_jinja(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                 **extra) -> str:
    """Render a chat template with jinja2, configured as transformers configures it."""
    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages),
                                            add_generation_prompt=add_generation_prompt, **extra)


def _have_jinja2() -> bool:
    return ImmutableSandboxedEnvironment is not None


# --------------------------------------------------------------------------------------------
# the tokenizer a model needs


@dataclasses.dataclass
class LlamaTokenizer:
    """A `tokenizers.Tokenizer` with the special ids and chat template of its checkpoint."""

    tokenizer: Tokenizer
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False  # prepend bos in `encode(add_special_tokens=True)` (GGUF's add_bos_token)
    add_eos: bool = False
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it (``<|im_start|>``) map to their ids."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_special_tokens and self.add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (``[{"role": "user", "content": "..."}]``)."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template")
        if _have_jinja2():
            return render_jinja(self.chat_template, messages, add_generation_prompt,
                                bos_token=self._token(self.bos_id), eos_token=self._token(self.eos_id))
        return render_chatml(self.chat_template, messages, add_generation_prompt)

    def chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat prompt (as transformers' ``apply_chat_template(tokenize=True)``:
        the rendered text, encoded without adding bos/eos)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def _token(self, i):
        return None if i is None else self.tokenizer.id_to_token(i)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "LlamaTokenizer":
        """The tokenizer described by a GGUF file's metadata (see `from_gguf_metadata`)."""
        return from_gguf_metadata(gguf_metadata(gguf.GGUFReader(str(path))))

    @classmethod
    def from_dir(cls, path: str | Path) -> "LlamaTokenizer":
        """A HF model directory's ``tokenizer.json``, with ids and chat template from
        ``tokenizer_config.json`` / ``config.json`` where present."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tcfg = _read_json(path / "tokenizer_config.json")
        mcfg = _read_json(path / "config.json")

        def tid(name):
            t = tcfg.get(name)
            t = t.get("content") if isinstance(t, dict) else t
            i = tok.token_to_id(t) if isinstance(t, str) else None
            return i if i is not None else mcfg.get(f"{name}_id")

        template = tcfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        # tokenizer.json's post-processor adds bos itself where the model wants it
        return cls(tok, bos_id=tid("bos_token"), eos_id=tid("eos_token"), pad_id=tid("pad_token"),
                   unk_id=tid("unk_token"), add_bos=False, chat_template=template)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def from_gguf_metadata(meta: dict[str, Any]) -> LlamaTokenizer:
    """`LlamaTokenizer` from GGUF metadata (`gguf_metadata(reader)`)."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(
            f"GGUF tokenizer model {model!r}: only byte-level BPE ('gpt2') is implemented")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise ValueError(f"GGUF metadata lacks {key}")
    tok = byte_level_bpe(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"],
                         meta.get("tokenizer.ggml.token_type"), meta.get("tokenizer.ggml.pre"))
    get = lambda k: meta.get(f"tokenizer.ggml.{k}")
    return LlamaTokenizer(
        tok, bos_id=get("bos_token_id"), eos_id=get("eos_token_id"), pad_id=get("padding_token_id"),
        unk_id=get("unknown_token_id"), add_bos=bool(get("add_bos_token") or False),
        add_eos=bool(get("add_eos_token") or False), chat_template=meta.get("tokenizer.chat_template"))
