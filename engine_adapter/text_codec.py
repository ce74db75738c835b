"""Text in and out of the server: a Hugging Face tokenizer from a local folder, or bytes.

Models here have seeded random weights and no tokenizer, so by default a prompt's UTF-8 bytes
are its token ids and an output token ``t`` is the byte ``t % 256``: lengths are exact and
nothing needs a download. With real weights, name the checkpoint's folder (``tokenizer=``):
its ``tokenizer.json`` is read with the ``tokenizers`` package, offline.
``write_word_tokenizer`` writes one whose words are the token ids themselves, for clients
such as vLLM's benchmark that need a tokenizer to draw prompts of a given length.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Protocol

from engine_adapter.errors import ConfigError


class ByteCodec:
    """A prompt's UTF-8 bytes are its token ids; token ``t`` decodes to the byte ``t % 256``."""

    name = "bytes"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ConfigError(f"the byte codec needs a vocabulary of 256 or more, the model has "
                              f"{vocab_size}: give a tokenizer (tokenizer=PATH)")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self) -> StreamDecoder:
        return _ByteDecoder()


class HFCodec:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``), read from a local folder."""

    def __init__(self, path: str | Path, vocab_size: int) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:  # (a dependency of transformers; not of lpenv itself)
            raise ConfigError("a tokenizer folder needs the tokenizers package: "
                              "pip install tokenizers") from None
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no tokenizer.json at {path}")
        self.name = str(path)
        self._tok = Tokenizer.from_file(str(file))
        if self._tok.get_vocab_size() > vocab_size:
            raise ConfigError(f"tokenizer {path} has {self._tok.get_vocab_size()} tokens, the "
                              f"model only {vocab_size}")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decoder(self) -> StreamDecoder:
        return _TokenizerDecoder(self._tok)


class StreamDecoder(Protocol):
    """Output tokens to text as they come: ``push(token)`` returns the new text (held back
    while it ends inside a character), ``flush()`` what is held back at the end."""

    def push(self, token: int) -> str: ...

    def flush(self) -> str: ...


class _ByteDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(bytes([token % 256]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class _TokenizerDecoder:
    """``tokenizers``' own incremental decoding (``DecodeStream``): each token's new text,
    without decoding the whole output again."""

    def __init__(self, tok) -> None:
        from tokenizers.decoders import DecodeStream

        self._tok, self._stream = tok, DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        return self._stream.step(self._tok, token) or ""

    def flush(self) -> str:
        return ""


def text_codec(tokenizer: str | None, vocab_size: int) -> ByteCodec | HFCodec:
    """``tokenizer``: None or ``bytes`` for the byte codec, else a folder or file path."""
    if tokenizer in (None, "bytes"):
        return ByteCodec(vocab_size)
    return HFCodec(tokenizer, vocab_size)


def write_word_tokenizer(folder: str | Path, vocab_size: int) -> Path:
    """A tokenizer whose words are ``t0`` ... ``t{vocab_size - 1}``, split on spaces: any
    token ids decode to text that encodes back to the same ids. For benchmark clients that
    draw prompts through a tokenizer (``vllm bench serve --tokenizer FOLDER``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0",
         "model_max_length": 1 << 20}))
    return folder
