import pytest
from transformers import BertTokenizerFast

from blip_core.tokenizer import BlipTokenizer, pre_caption

CORPUS = [
    "a small red circle to the left of a blue square",
    "two green triangles on a white background",
    "a large yellow square above a black circle",
    "three blue circles",
] * 5


def test_pre_caption_matches_blip_cleaning():
    assert pre_caption('A "Red" Circle!!  (left)  ; of: the  #square~.') == "a red circle left of the square"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("  trailing spaces.\n") == "trailing spaces"
    assert pre_caption("...") == ""


def test_corpus_tokenizer_special_ids_and_round_trip(tmp_path):
    tok = BlipTokenizer.from_corpus(CORPUS, vocab_size=200)
    base = len(tok) - 2
    assert (tok.dec_id, tok.enc_id) == (base, base + 1)
    assert tok.pad_id == 0
    ids, mask = tok(["a red circle", "two green triangles on a white background"], max_length=30)
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert ids[0, 0] == tok.cls_id and ids[0, int(mask[0].sum()) - 1] == tok.sep_id
    assert mask[0].sum() < mask[1].sum() and ids[0, -1] == tok.pad_id  # padded to the longest
    assert tok.decode(ids[1]) == "two green triangles on a white background"

    tok.save(tmp_path / "tok")
    again = BlipTokenizer.from_dir(tmp_path / "tok")
    assert (again.dec_id, again.enc_id, len(again)) == (tok.dec_id, tok.enc_id, len(tok))
    assert again(["a red circle"])[0].tolist() == tok(["a red circle"])[0].tolist()
    # The directory is a standard Hugging Face tokenizer directory.
    hf = BertTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert hf.convert_tokens_to_ids("[ENC]") == tok.enc_id


def test_bert_base_layout_gives_official_ids(tmp_path):
    """A 30522-entry BERT vocabulary gets [DEC]=30522 and [ENC]=30523, as bert-base-uncased in BLIP."""
    words = [f"w{i}" for i in range(30522 - 5)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BlipTokenizer.from_dir(d)
    assert (tok.dec_id, tok.enc_id, len(tok)) == (30522, 30523, 30524)
    assert (tok.pad_id, tok.cls_id, tok.sep_id) == (0, 2, 3)


def test_missing_tokenizer_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        BlipTokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        BlipTokenizer.from_dir(tmp_path / "empty")
