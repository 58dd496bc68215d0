"""BERT WordPiece tokenizer with BLIP's special tokens, and BLIP's caption and question cleaning.

The tokenizer always emits ``[CLS] ... [SEP]``; callers overwrite position 0 with ``[ENC]`` for the
image-grounded encoder or ``[DEC]`` for the decoder (see :mod:`blip_core.models.blip`). As in the official
code, ``[DEC]`` is added as the bos token and ``[ENC]`` as an additional special token, so for
``bert-base-uncased`` their ids are 30522 and 30523 and ``len(tokenizer) == 30524``.

A tokenizer comes either from a local Hugging Face tokenizer directory (e.g. a ``bert-base-uncased``
download) or is built from a caption corpus with ``tokenizers``' WordPiece trainer and saved in that same
directory format.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from blip_core.constants import CAPTION_MAX_WORDS, QUESTION_MAX_WORDS

if TYPE_CHECKING:  # the text cleaning functions are used without torch (ingest)
    import torch

DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
BASE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_PUNCT = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = CAPTION_MAX_WORDS) -> str:
    """Clean a caption as BLIP does: lowercase, drop ``.!"()*#:;~``, collapse spaces, keep ``max_words``."""
    text = _PUNCT.sub(" ", caption.lower())
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def pre_question(question: str, max_words: int = QUESTION_MAX_WORDS) -> str:
    """Clean a VQA question as the official ``pre_question``: lowercase, delete ``.!"()*#:;~`` (no space left
    in their place), strip trailing spaces, keep the first ``max_words`` space-separated words."""
    text = _PUNCT.sub("", question.lower()).rstrip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


class BlipTokenizer:
    """A thin wrapper over ``transformers.BertTokenizerFast`` exposing BLIP's special ids.

    Attributes:
        pad_id, cls_id, sep_id, dec_id, enc_id: special token ids ([SEP] doubles as end of sequence).
    """

    def __init__(self, hf_tokenizer):
        tok = hf_tokenizer
        if DEC_TOKEN not in tok.get_vocab():
            tok.add_special_tokens({"bos_token": DEC_TOKEN})
        else:
            tok.bos_token = DEC_TOKEN
        if ENC_TOKEN not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
        self.hf = tok
        self.pad_id = tok.pad_token_id
        self.cls_id = tok.cls_token_id
        self.sep_id = tok.sep_token_id
        self.dec_id = tok.convert_tokens_to_ids(DEC_TOKEN)
        self.enc_id = tok.convert_tokens_to_ids(ENC_TOKEN)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dir(cls, path: str | Path) -> BlipTokenizer:
        """Load from a local Hugging Face tokenizer directory (``vocab.txt`` and/or ``tokenizer.json``)."""
        from transformers import BertTokenizerFast

        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {p}")
        if not (p / "vocab.txt").exists() and not (p / "tokenizer.json").exists():
            raise FileNotFoundError(f"{p} holds no vocab.txt or tokenizer.json: not a BERT tokenizer directory")
        return cls(BertTokenizerFast.from_pretrained(str(p)))

    @classmethod
    def from_corpus(cls, texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1) -> BlipTokenizer:
        """Build a lowercase WordPiece tokenizer from ``texts`` (cleaned captions), deterministically.

        The vocabulary is the special tokens, every character seen (as a word start and as a ``##``
        continuation, so no seen word becomes [UNK]), then whole words by descending frequency (ties in
        alphabetical order) up to ``vocab_size``. Unlike a trained merge table it is the same on every run
        and every rank, so a resumed or distributed run sees the same token ids.
        """
        from collections import Counter

        from tokenizers import BertWordPieceTokenizer
        from tokenizers.normalizers import BertNormalizer
        from tokenizers.pre_tokenizers import BertPreTokenizer
        from transformers import BertTokenizerFast

        normalizer, pre = BertNormalizer(lowercase=True, strip_accents=True), BertPreTokenizer()
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
        chars = sorted({c for w in counts for c in w})
        vocab = list(BASE_SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
        seen = set(vocab)
        for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(vocab) >= vocab_size or n < min_frequency:
                break
            if word not in seen:
                vocab.append(word)
                seen.add(word)
        with tempfile.TemporaryDirectory() as d:
            vocab_file = Path(d) / "vocab.txt"
            vocab_file.write_text("".join(f"{t}\n" for t in vocab))
            wp = BertWordPieceTokenizer(str(vocab_file), lowercase=True, strip_accents=True, clean_text=True)
        return cls(BertTokenizerFast(tokenizer_object=wp._tokenizer, do_lower_case=True))

    def save(self, path: str | Path) -> None:
        """Save in the Hugging Face directory format (loadable by :meth:`from_dir` and ``transformers``)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out))
        if not (out / "vocab.txt").exists():  # also the plain BERT vocabulary, for BertTokenizer users
            vocab = self.hf.get_vocab()
            base = sorted((i, t) for t, i in vocab.items() if t not in (DEC_TOKEN, ENC_TOKEN))
            (out / "vocab.txt").write_text("".join(f"{t}\n" for _, t in base))

    # ---------------------------------------------------------------- use
    def __len__(self) -> int:
        return len(self.hf)

    def __call__(self, texts: Sequence[str], max_length: int = 30,
                 padding: str = "longest") -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise to ``[CLS] ... [SEP]`` and return ``(input_ids, attention_mask)``, each ``(B, L)``."""
        enc = self.hf(list(texts), padding=padding, truncation=True, max_length=max_length,
                      return_tensors="pt", return_token_type_ids=False)
        return enc["input_ids"], enc["attention_mask"]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode one sequence, dropping special tokens."""
        if hasattr(ids, "tolist"):  # a tensor
            ids = ids.tolist()
        return self.hf.decode(ids, skip_special_tokens=True).strip()
