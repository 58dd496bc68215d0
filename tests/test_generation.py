"""Caption generation equals transformers' generate token for token; sampling, prompts and ITM scoring."""

import pytest
import torch
from blip_hf_testing import build_hf, make_tokenizer
from transformers import BlipForConditionalGeneration

from blip_core.convert import load_hf
from blip_core.generation import (
    _beam_search,
    generate_captions,
    generate_ids,
    itm_itc,
    itm_scores,
    prompt_token_ids,
    strip_prompt,
)

PROMPT = "a picture of "


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A HF caption model whose [SEP] is likely enough that captions end at different lengths, and our copy."""
    tok = make_tokenizer()
    hf = build_hf(BlipForConditionalGeneration, tok, seed=5)
    with torch.no_grad():
        hf.text_decoder.cls.predictions.bias[tok.sep_id] += 0.4
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    ours = load_hf(d).model
    return tok, hf, ours


def _trim(rows, prompt_len, eos):
    out = []
    for r in rows.tolist():
        r = r[prompt_len:]
        out.append(r[: r.index(eos) + 1] if eos in r else r)
    return out


SETTINGS = [
    dict(num_beams=1),
    dict(num_beams=1, repetition_penalty=1.3, min_length=8),
    dict(num_beams=3),
    dict(num_beams=3, repetition_penalty=1.2, length_penalty=0.6),
    dict(num_beams=4, min_length=9, length_penalty=2.0, num_return=2),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_greedy_and_beam_match_transformers(pair, kw):
    tok, hf, ours = pair
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    prompt = prompt_token_ids(tok, PROMPT)
    kw = dict(kw)
    beams, n_ret = kw.pop("num_beams"), kw.pop("num_return", 1)
    settings = dict(max_length=20, min_length=5, repetition_penalty=1.0, length_penalty=1.0) | kw
    got = generate_ids(ours, images, prompt, eos_id=tok.sep_id, pad_id=tok.pad_id,
                       decoding="beam" if beams > 1 else "greedy", num_beams=beams, num_return=n_ret, **settings)
    hf_prompt, _ = tok([PROMPT] * 6, max_length=20)  # [CLS] a picture of [SEP]: HF swaps in [DEC], drops [SEP]
    with torch.no_grad():
        ref = hf.generate(pixel_values=images, input_ids=hf_prompt, num_beams=beams, do_sample=False,
                          num_return_sequences=n_ret, **settings)
    assert ref[:, : len(prompt)].tolist() == [prompt] * ref.shape[0]
    ours_tokens = _trim(got, len(prompt), tok.sep_id)
    assert ours_tokens == _trim(ref, len(prompt), tok.sep_id)
    assert got.shape[0] == 6 * n_ret


def test_captions_end_at_various_lengths(pair):
    """The parity settings exercise both early [SEP] and running to max_length."""
    tok, _, ours = pair
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    for decoding in ("greedy", "beam"):
        got = generate_ids(ours, images, prompt_token_ids(tok, PROMPT), eos_id=tok.sep_id, decoding=decoding,
                           max_length=20, min_length=5)
        lengths = {len(r) for r in _trim(got, 4, tok.sep_id)}
        assert len(lengths) > 1, (decoding, got.tolist())


# --------------------------------------------------------------------------------------------------
# Length normalisation of finished beams: today's transformers against transformers 4.15
# --------------------------------------------------------------------------------------------------

EOS, A, B = 1, 2, 3
VOCAB = 12  # 0 pad, 1 eos, 2 A, 3 B, 4 [DEC], 5..11 fillers
PROMPT_IDS = [4, 5]  # two prompt tokens
# Next-token probabilities after each generated prefix; any other prefix: uniform over tokens 1..11.
TABLE = {
    (): {EOS: torch.e ** -1.0, A: 0.5, B: 1 - 0.5 - torch.e ** -1.0},
    (A,): {EOS: torch.e ** -1.8 / 0.5, A: 0.4, B: 1 - 0.4 - torch.e ** -1.8 / 0.5},
    (B,): {EOS: 0.05, A: 0.5, B: 0.45},
}


def _table_step(tokens, length, cache):
    """A decoder whose log-probabilities are TABLE's; its 'cache' is the token history (rows first)."""
    hist = tokens if cache is None else torch.cat([cache[0][0], tokens], dim=1)
    assert hist.shape[1] == length
    logits = torch.full((hist.shape[0], VOCAB), -1.0e4)
    for r, row in enumerate(hist.tolist()):
        probs = TABLE.get(tuple(row[len(PROMPT_IDS):]), dict.fromkeys(range(1, VOCAB), 1 / (VOCAB - 1)))
        for t, pr in probs.items():
            logits[r, t] = float(torch.tensor(pr).log())
    return logits, [(hist, hist)]


def _beams(length_norm, max_length, num_return=1):
    out = _beam_search(_table_step, torch.tensor([PROMPT_IDS]), 1, num_beams=2, num_return=num_return, eos_id=EOS,
                       pad_id=0, max_length=max_length, min_length=0, repetition_penalty=1.0, length_penalty=1.0,
                       length_norm=length_norm)
    return [[t for t in row[len(PROMPT_IDS):] if t != 0] for row in out.tolist()]


def test_length_norm_rules_pick_different_beams():
    """Worked by hand (2 beams, prompt of 2 tokens, length_penalty 1).

    Step 1: "[SEP]" ends with log-prob -1.0; A (-0.693) and B continue. Step 2: "A [SEP]" ends with -1.8;
    "A A" (-1.609) and "A B" (-2.005) continue. Step 3 adds nothing better (uniform next tokens, -2.398 each).

    - current (generated tokens incl. [SEP]): "[SEP]" -1.0 / 1 = -1.0, "A [SEP]" -1.8 / 2 = -0.9 -> "A [SEP]".
    - hf415 (whole sequence before [SEP], prompt incl.): -1.0 / 2 = -0.5 against -1.8 / 3 = -0.6 -> "[SEP]".
    """
    assert _beams("current", max_length=5) == [[A, EOS]]
    assert _beams("hf415", max_length=5) == [[EOS]]
    assert _beams("current", max_length=5, num_return=2) == [[A, EOS], [EOS]]
    assert _beams("hf415", max_length=5, num_return=2) == [[EOS], [A, EOS]]


def test_length_norm_hf415_adds_open_beams_at_max_length():
    """max_length 4 ends after step 2.

    - hf415: the row is not done ("A A" -1.609 / 3 = -0.536 beats the worst finished -0.6), so the open beams
      join at length 4: "A A" -1.609 / 4 = -0.402 and "A B" -0.501, against "[SEP]" -0.5 and "A [SEP]" -0.6
      -> "A A", then "[SEP]".
    - current: the top 2 candidates of step 2 end, scored by generated length 2: "A A" -0.805 and "A [SEP]" -0.9,
      against "[SEP]" -1.0 -> "A A", then "A [SEP]".
    """
    assert _beams("hf415", max_length=4, num_return=2) == [[A, A], [EOS]]
    assert _beams("current", max_length=4, num_return=2) == [[A, A], [A, EOS]]


def test_length_norm_through_generate_captions(pair):
    tok, _, ours = pair
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    caps = {n: generate_captions(ours, tok, images, length_norm=n, max_length=20, min_length=5)
            for n in ("current", "hf415")}
    assert all(len(c) == 6 for c in caps.values())
    with pytest.raises(ValueError, match="length_norm"):
        generate_captions(ours, tok, images, length_norm="newest")


def test_image_kv_computed_once_per_image(pair, monkeypatch):
    """Beam search reads each image's K/V in place: cross_kv sees B images, never B * num_beams."""
    tok, _, ours = pair
    seen = []
    original = type(ours).cross_kv

    def spy(self, image_embeds):
        seen.append(image_embeds.shape[0])
        return original(self, image_embeds)

    monkeypatch.setattr(type(ours), "cross_kv", spy)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave",
                        lambda *a, **k: pytest.fail("image embeddings must not be repeated per beam"))
    generate_ids(ours, torch.randn(2, 3, 32, 32), prompt_token_ids(tok, PROMPT), eos_id=tok.sep_id,
                 decoding="beam", num_beams=3)
    assert seen == [2]


def test_prompt_handling(pair):
    tok, _, ours = pair
    ids = prompt_token_ids(tok, PROMPT)
    words = tok.hf.convert_ids_to_tokens(ids)
    assert words == ["[DEC]", "a", "picture", "of"]
    assert prompt_token_ids(tok, "") == [tok.dec_id]
    assert strip_prompt("a picture of a dog", PROMPT) == "a dog"
    assert strip_prompt("a picture of", PROMPT) == ""
    captions = generate_captions(ours, tok, torch.randn(2, 3, 32, 32), decoding="greedy")
    assert len(captions) == 2 and all(isinstance(c, str) and not c.startswith("a picture of") for c in captions)


def test_nucleus_is_seeded(pair):
    tok, _, ours = pair
    images = torch.randn(3, 3, 32, 32)

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate_ids(ours, images, prompt_token_ids(tok, PROMPT), eos_id=tok.sep_id, decoding="nucleus",
                            top_p=0.9, generator=g, **kw)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    many = run(0, num_return=4)
    assert many.shape[0] == 12
    assert len({tuple(r) for r in many[:4].tolist()}) > 1  # samples of one image differ


def test_nucleus_with_tiny_top_p_is_greedy(pair):
    tok, _, ours = pair
    images = torch.randn(3, 3, 32, 32)
    prompt = prompt_token_ids(tok, PROMPT)
    greedy = generate_ids(ours, images, prompt, eos_id=tok.sep_id, decoding="greedy", repetition_penalty=1.1)
    sampled = generate_ids(ours, images, prompt, eos_id=tok.sep_id, decoding="nucleus", top_p=1e-6,
                           generator=torch.Generator().manual_seed(3))  # repetition penalty 1.1 by default
    assert torch.equal(greedy, sampled)


def test_itm_scores_batched_equal_one_by_one(pair):
    tok, _, ours = pair
    image = torch.randn(3, 32, 32)
    texts = ["a dog on the grass", "two cats sleeping on a couch next to a window", "a plate"]
    prob, cos = itm_scores(ours, tok, image, texts)
    assert prob.shape == cos.shape == (3,)
    assert ((prob >= 0) & (prob <= 1)).all() and (cos.abs() <= 1 + 1e-6).all()
    embeds = ours.encode_image(image[None])
    for i, t in enumerate(texts):
        ids, mask = tok([t], max_length=35)
        logits, c = itm_itc(ours, embeds, ids, mask, tok.enc_id)
        torch.testing.assert_close(logits.softmax(-1)[0, 1], prob[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(c[0], cos[i], rtol=0, atol=1e-5)
    cls_prob, _ = itm_scores(ours, tok, image, texts, itm_first_token="cls")
    assert not torch.allclose(cls_prob, prob)
    with pytest.raises(ValueError):
        itm_scores(ours, tok, image, texts, itm_first_token="sep")
