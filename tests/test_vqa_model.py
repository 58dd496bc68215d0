"""BlipVQA: parity with transformers' BlipForQuestionAnswering, the official .pth layout, the answer loss by hand,
answer-list ranking, checkpoints and initialisation from a pre-trained BLIP."""

import dataclasses
import math

import pytest
import torch
from blip_hf_testing import hf_to_official, make_tokenizer, randomize, tiny_preset_hf_config
from safetensors.torch import load_file
from transformers import BlipConfig, BlipForQuestionAnswering

from blip_core import build_model, load_model_dir, model_preset, save_model_dir
from blip_core.checkpoint_io import checkpoint_architecture
from blip_core.convert import load_hf, load_official, official_state_dict, save_hf, save_official
from blip_core.errors import UserError
from blip_core.generation import generate_ids
from blip_core.losses import lm_loss
from blip_core.models.vqa import BlipVQA, is_vqa
from blip_core.tokenizer import pre_question
from blip_core.vqa import answer_tokens, generate_answers, question_tokens, rank_answers

ATOL = 1e-5
QUESTIONS = ["What is the dog doing on the grass?", "two cats", "is there a plate of food with a fork"]
ANSWERS = ["running", "a dog", "two", "yes", "the red circle", "food"]


def vqa_hf_config(tok, *, width: int = 48, image_size: int = 32) -> BlipConfig:
    """A small VQA config: transformers' answer decoder reads question states through keys/values of the vision
    width, so the vision and text widths are equal (as in ``base``)."""
    text = dict(vocab_size=len(tok), hidden_size=width, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, layer_norm_eps=1e-12,
                bos_token_id=tok.dec_id, sep_token_id=tok.sep_id, pad_token_id=tok.pad_id, label_smoothing=0.1)
    vision = dict(hidden_size=width, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, layer_norm_eps=1e-6)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16, label_smoothing=0.1)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def hf_pair(tok, tmp_path_factory):
    """A random transformers VQA model and the BlipVQA converted from its save_pretrained directory."""
    torch.manual_seed(0)
    hf = BlipForQuestionAnswering(vqa_hf_config(tok)).eval()
    randomize(hf, seed=0)
    d = tmp_path_factory.mktemp("hf_vqa")
    hf.save_pretrained(d)
    tok.save(d)
    ck = load_hf(d)
    return hf, ck, d


def _images(n, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _smoothed_sum_f64(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, eps: float = 0.1) -> float:
    """One answer's loss by hand in float64: sum over its non-pad targets t of
    -(1 - eps) log p(y_t) - eps / V * sum_v log p(v), with p the softmax of the logits one position before."""
    logp = torch.log_softmax(logits.double(), dim=-1)  # (L, V)
    total = 0.0
    for t in range(1, ids.shape[0]):
        if not mask[t]:
            continue
        row = logp[t - 1]
        total += -(1 - eps) * float(row[ids[t]]) - eps * float(row.mean())
    return total


# --------------------------------------------------------------------------------------------------
# transformers parity
# --------------------------------------------------------------------------------------------------


def test_hf_vqa_logits_and_loss_parity(tok, hf_pair):
    """Question states, answer-decoder logits, per-answer and token-mean losses equal transformers' (<= 1e-5).

    transformers 5.24 drops the cross-attention mask (``BlipTextAttention`` hands it to the attention as
    ``attention_mask``, which cross-attention replaces by its own, absent, ``encoder_attention_mask``), so its
    answers attend to the padding of their question: equal to ours without a question mask. With the mask, ours
    equal transformers' on each question alone, unpadded: the official model's masked training loss.
    """
    hf, ck, _ = hf_pair
    m = ck.model
    assert is_vqa(m) and ck.notes == ["source: Hugging Face BlipForQuestionAnswering"]
    image = _images(3)
    q, qm = question_tokens(tok, QUESTIONS)
    assert (q[:, 0] == tok.enc_id).all() and (qm == 0).any()  # [ENC] first; padded batch
    a, am = answer_tokens(tok, ANSWERS)
    assert (a[:, 0] == tok.dec_id).all()
    n = torch.tensor([2, 1, 3])
    owner = torch.repeat_interleave(torch.arange(3), n)
    weights = torch.tensor([0.6, 0.4, 1.0, 0.5, 0.3, 0.2])
    labels = a.masked_fill(am == 0, -100)
    with torch.no_grad():
        emb = hf.vision_model(pixel_values=image).last_hidden_state
        ref_states = hf.text_encoder(input_ids=q, attention_mask=qm, encoder_hidden_states=emb).last_hidden_state
        ref = hf.text_decoder(input_ids=a, attention_mask=am, encoder_hidden_states=ref_states[owner],
                              labels=labels, reduction="none")
        states = m.encode_question(image, q, qm)
        logits, _ = m.decode(a, am, m.question_cross(states, None).select(owner))
        # transformers' own forward: one answer per question, token-mean loss
        first = torch.tensor([0, 2, 3])
        ref_mean = hf(input_ids=q, pixel_values=image, attention_mask=qm, decoder_input_ids=a[first],
                      labels=labels[first], decoder_attention_mask=am[first]).loss
        mean_logits, _ = m.decode(a[first], am[first], m.question_cross(states, None))
        # the masked (official) loss: transformers on each question alone, without padding
        loss = m.answer_loss(image, q, qm, a, am, weights, n)
        alone = torch.stack([
            hf.text_decoder(input_ids=a[i:i + 1], attention_mask=am[i:i + 1],
                            encoder_hidden_states=ref_states[j:j + 1, :int(qm[j].sum())], labels=labels[i:i + 1],
                            reduction="none").loss[0]
            for i, j in enumerate(owner.tolist())])
    torch.testing.assert_close(states, ref_states, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(lm_loss(logits, labels, reduction="sum_per_sequence"), ref.loss, rtol=0, atol=ATOL)
    torch.testing.assert_close(lm_loss(mean_logits, labels[first]), ref_mean, rtol=0, atol=ATOL)
    torch.testing.assert_close(loss, (weights * alone).sum() / 3, rtol=0, atol=ATOL)
    assert (alone - ref.loss).abs().max() > 1e-3  # the padded question's answer really differs
    assert ref.logits.abs().max() > 1.0  # not a trivially small output

    # transformers' processor leaves [CLS] first in the question: a different input, different states
    cls_ids = q.clone()
    cls_ids[:, 0] = tok.cls_id
    with torch.no_grad():
        cls_states = m.encode_question(image, cls_ids, qm)
    assert (cls_states - states).abs().max() > 1e-3


@pytest.mark.parametrize("decoding,beams", [("greedy", 1), ("beam", 3)])
def test_hf_vqa_generation_parity(tok, hf_pair, decoding, beams):
    """Answers equal transformers' generate (max length 10, min length 1) token for token."""
    hf, ck, _ = hf_pair
    m = ck.model
    image = _images(3, seed=2)
    q, qm = question_tokens(tok, QUESTIONS)
    with torch.no_grad():
        ref = hf.generate(input_ids=q, pixel_values=image, attention_mask=qm, num_beams=beams, max_length=10,
                          min_length=1)
        # transformers attends to the question padding (all-ones mask), as the official generate
        states = m.encode_question(image, q, qm)
        ours = generate_ids(m, None, [tok.dec_id], eos_id=tok.sep_id, pad_id=tok.pad_id, decoding=decoding,
                            num_beams=beams, max_length=10, min_length=1, cross=m.question_cross(states, None))
    assert _trim(ours, tok.sep_id) == _trim(ref, tok.sep_id)
    answers = generate_answers(m, tok, image, QUESTIONS, decoding=decoding, num_beams=beams,
                               mask_question_padding=False)
    assert answers == [tok.decode(r) for r in ref] and len(set(answers)) > 1


def _trim(rows: torch.Tensor, eos: int) -> list[list[int]]:
    out = []
    for r in rows.tolist():
        out.append(r[: r.index(eos) + 1] if eos in r else r)
    return out


def test_masked_question_padding_makes_answers_batch_independent(tok, hf_pair):
    """By default the question padding is masked: a question's answer is the same alone and in a padded batch;
    attending to the padding (the official generate) changes it."""
    _, ck, _ = hf_pair
    image = _images(3, seed=2)
    batch = generate_answers(ck.model, tok, image, QUESTIONS)
    alone = [generate_answers(ck.model, tok, image[i:i + 1], [q])[0] for i, q in enumerate(QUESTIONS)]
    assert batch == alone
    assert generate_answers(ck.model, tok, image, QUESTIONS, mask_question_padding=False) != batch
    # one image asked several questions: its tokens are encoded once and shared
    one = generate_answers(ck.model, tok, image[:1], QUESTIONS)
    assert one == [generate_answers(ck.model, tok, image[:1], [q])[0] for q in QUESTIONS]


def test_hf_vqa_round_trip_loads_without_missing_keys(tok, hf_pair, tmp_path):
    hf, ck, d = hf_pair
    ck.save(tmp_path / "blip")
    assert checkpoint_architecture(tmp_path / "blip") == "blip_vqa"
    back = load_model_dir(tmp_path / "blip")
    assert isinstance(back.model, BlipVQA)
    save_hf(back.model, tmp_path / "hf2", "vqa", back.tokenizer)
    a, b = load_file(tmp_path / "hf2" / "model.safetensors"), load_file(d / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    reloaded, info = BlipForQuestionAnswering.from_pretrained(tmp_path / "hf2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.text_config.label_smoothing == 0.1

    with pytest.raises(UserError, match="only as the vqa task"):
        save_hf(back.model, tmp_path / "hf3", "caption", back.tokenizer)
    with pytest.raises(UserError, match="only a VQA model"):
        save_hf(build_model(model_preset("tiny"), vocab_size=len(tok)), tmp_path / "hf4", "vqa")
    wide = dataclasses.replace(back.model.cfg, vision=dataclasses.replace(back.model.cfg.vision, width=64))
    with pytest.raises(UserError, match="equal widths"):
        save_hf(BlipVQA(wide), tmp_path / "hf5", "vqa")


# --------------------------------------------------------------------------------------------------
# Official layout
# --------------------------------------------------------------------------------------------------


def _official_vqa_file(tmp_path, tok):
    """An official-layout VQA state dict built independently: transformers' keys renamed per
    blip-reference 6.2, with the position_ids buffers the official modules save."""
    hf = BlipForQuestionAnswering(tiny_preset_hf_config(len(tok), tok)).eval()  # ViT and text both 32 wide
    randomize(hf, seed=5)
    sd = {hf_to_official(k): v.clone() for k, v in hf.state_dict().items()}
    for prefix in ("text_encoder.", "text_decoder.bert."):
        sd[f"{prefix}embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    path = tmp_path / "model_vqa.pth"
    torch.save({"model": sd, "epoch": 9}, path)
    return path, sd, hf


def test_official_vqa_file_loads_and_round_trips(tok, tmp_path):
    path, sd, hf = _official_vqa_file(tmp_path, tok)
    ck = load_official(path, "tiny")
    big = load_official(path, "tiny", image_size=48)
    m = ck.model
    assert isinstance(m, BlipVQA) and any("VQA layout" in n for n in ck.notes)
    # outputs equal transformers' model holding the same tensors
    image = _images(2)
    q, qm = question_tokens(tok, QUESTIONS[:2])
    with torch.no_grad():
        ref = hf.generate(input_ids=q, pixel_values=image, attention_mask=qm, num_beams=3, max_length=10)
        ours = generate_answers(m, tok, image, QUESTIONS[:2], mask_question_padding=False)
    assert ours == [tok.decode(r) for r in ref]
    # save_official -> load_official: identical tensors and outputs
    out = official_state_dict(m, "vqa")
    assert sorted(out) == sorted(sd) and all(torch.equal(out[k], sd[k]) for k in sd)
    save_official(m, tmp_path / "again.pth", "vqa")
    again = load_official(tmp_path / "again.pth", "tiny").model
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))
    assert generate_answers(again, tok, image, QUESTIONS[:2], mask_question_padding=False) == ours
    # another resolution: the position embeddings are interpolated (4x4 -> 6x6 patches)
    assert big.model.visual_encoder.pos_embed.shape[1] == 37
    assert any("interpolated from 4x4 to 6x6" in n for n in big.notes)
    assert generate_answers(big.model, tok, _images(1, size=48), QUESTIONS[:1])[0] is not None


def test_official_vqa_file_with_a_missing_decoder_key_is_refused(tok, tmp_path):
    """A VQA file is read strictly: no module may be absent (a caption or retrieval file may lack some)."""
    model = BlipVQA(dataclasses.replace(model_preset("tiny"), text=dataclasses.replace(
        model_preset("tiny").text, vocab_size=len(tok))))
    save_official(model, tmp_path / "ok.pth", "vqa")
    state = torch.load(tmp_path / "ok.pth", weights_only=True)["model"]
    del state["text_decoder.cls.predictions.transform.dense.bias"]
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="missing keys: text_decoder.cls.predictions.transform.dense.bias"):
        load_official(tmp_path / "bad.pth", "tiny")
    assert isinstance(load_official(tmp_path / "ok.pth", "tiny").model, BlipVQA)


# --------------------------------------------------------------------------------------------------
# The answer loss and ranking, by hand
# --------------------------------------------------------------------------------------------------


def _tiny_vqa(tok, seed=0):
    torch.manual_seed(seed)
    cfg = model_preset("tiny")
    model = BlipVQA(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(tok)))).eval()
    with torch.no_grad():
        for p in model.text_decoder.parameters():
            p.mul_(5.0)  # sharper output distributions than the 0.02 initialisation
    return model


def test_weighted_answer_loss_by_hand(tok):
    """sum(weights * per-answer smoothed token sums) / B, each answer decoded against its own question alone."""
    m = _tiny_vqa(tok)
    image = _images(2)
    q, qm = question_tokens(tok, ["what is on the grass", "how many cats"])
    a, am = answer_tokens(tok, ["a dog running", "dog", "two"])
    n, weights = torch.tensor([2, 1]), torch.tensor([0.7, 0.3, 1.0])
    with torch.no_grad():
        loss = m.answer_loss(image, q, qm, a, am, weights, n)
        states = m.encode_question(image, q, qm)
    expected = 0.0
    for i, owner in enumerate([0, 0, 1]):
        length = int(am[i].sum())  # this answer alone, unpadded, against its question alone, unpadded
        q_len = int(qm[owner].sum())
        with torch.no_grad():
            cross = m.question_cross(states[owner:owner + 1, :q_len], None)
            logits, _ = m.decode(a[i:i + 1, :length], am[i:i + 1, :length], cross)
        expected += float(weights[i]) * _smoothed_sum_f64(logits[0], a[i, :length], am[i, :length])
    expected /= 2
    assert math.isclose(float(loss), expected, rel_tol=1e-5)
    with pytest.raises(ValueError, match="one count per question"):
        m.answer_loss(image, q, qm, a, am, weights, torch.tensor([1, 1]))


def _independent_scores(m, tok, image, question, answers):
    """First-token probability and -(smoothed sequence loss) of each answer, one answer at a time."""
    q, qm = question_tokens(tok, [question])
    firsts, scores = [], []
    with torch.no_grad():
        cross = m.question_cross(m.encode_question(image, q, qm), qm)
        start, _ = m.decode(torch.tensor([[tok.dec_id]]), torch.ones(1, 1, dtype=torch.long), cross)
        probs = torch.softmax(start[0, 0].double(), dim=-1)
        for ans in answers:
            a, am = answer_tokens(tok, [ans])
            logits, _ = m.decode(a, am, cross)
            firsts.append(float(probs[a[0, 1]]))
            scores.append(-_smoothed_sum_f64(logits[0], a[0], am[0]))
    return firsts, scores


def test_rank_answers_inside_and_outside_the_first_token_top_k(tok):
    """The best-scoring answer is returned when its first token is in the top k, and the best of the top k
    (not it) when it is not.

    The case: one one-word answer whose first token is the least likely of the list, and long answers (each
    token adds to the sequence loss) starting with the likeliest first tokens, so the short answer scores best
    but ranks last by first token.
    """
    m = _tiny_vqa(tok, seed=3)
    image = _images(1, seed=4)
    question = "what is the man riding"
    words = ["dog", "grass", "bike", "street", "plate", "food", "cats", "window", "couch", "knife", "red", "blue"]
    firsts, _ = _independent_scores(m, tok, image, question, words)
    order = sorted(range(len(words)), key=lambda i: -firsts[i])
    long_answers = [f"{words[i]} tok1 tok2 tok3 tok4 tok5 tok6 tok7" for i in order[:4]]
    answers = [*long_answers, words[order[-1]]]
    firsts, scores = _independent_scores(m, tok, image, question, answers)
    best = max(range(len(answers)), key=lambda i: scores[i])
    by_first = sorted(range(len(answers)), key=lambda i: -firsts[i])
    assert best == 4 and by_first.index(best) == 4  # the case as described: best score, last by first token

    got, score = rank_answers(m, tok, image, [question], answers, k=5)[0]
    assert got == answers[best] and math.isclose(score, scores[best], rel_tol=1e-4)
    # k = 4: the best answer is filtered out; the best among the 4 likeliest first tokens wins
    expected = max(by_first[:4], key=lambda i: scores[i])
    got, score = rank_answers(m, tok, image, [question], answers, k=4)[0]
    assert got == answers[expected] != answers[best] and math.isclose(score, scores[expected], rel_tol=1e-4)
    # k = 1: the answer with the likeliest first token, whatever its score
    assert rank_answers(m, tok, image, [question], answers, k=1)[0][0] == answers[by_first[0]]
    # k larger than the list is the whole list
    assert rank_answers(m, tok, image, [question], answers, k=1000)[0][0] == answers[best]


def test_rank_answers_batched_equals_one_at_a_time(tok, monkeypatch):
    """A padded batch of questions ranks as each question alone, in one block of candidates or one block per
    question."""
    import blip_core.vqa

    m = _tiny_vqa(tok, seed=1)
    image = _images(3)
    batch = rank_answers(m, tok, image, QUESTIONS, ANSWERS, k=4)
    alone = [rank_answers(m, tok, image[i:i + 1], [q], ANSWERS, k=4)[0] for i, q in enumerate(QUESTIONS)]
    monkeypatch.setattr(blip_core.vqa, "RANK_ROWS", 4)  # 4 candidate rows at a time: one question per block
    blocks = rank_answers(m, tok, image, QUESTIONS, ANSWERS, k=4)
    assert [a for a, _ in batch] == [a for a, _ in alone] == [a for a, _ in blocks]
    for (_, s1), (_, s2), (_, s3) in zip(batch, alone, blocks):
        assert math.isclose(s1, s2, rel_tol=1e-5) and math.isclose(s1, s3, rel_tol=1e-5)


# --------------------------------------------------------------------------------------------------
# Construction, checkpoints, tokens
# --------------------------------------------------------------------------------------------------


def test_from_blip_copies_without_tying_and_reports_fresh_tensors(tok):
    torch.manual_seed(0)
    blip = build_model(model_preset("tiny"), vocab_size=len(tok))
    vqa = BlipVQA.from_blip(blip)
    assert vqa.init_notes == []
    src = blip.state_dict()
    for k, t in vqa.state_dict().items():
        assert torch.equal(t, src[k]), k
    ptrs = {p.data_ptr() for p in blip.parameters()}
    assert not any(p.data_ptr() in ptrs for p in vqa.parameters())  # copies
    enc, dec = vqa.text_encoder, vqa.text_decoder.bert
    assert enc.embeddings.word_embeddings.weight.data_ptr() != dec.embeddings.word_embeddings.weight.data_ptr()
    assert enc.layers[0].intermediate is not dec.layers[0].intermediate  # encoder and decoder untied
    assert vqa.text_decoder.cls.predictions.decoder.weight is dec.embeddings.word_embeddings.weight  # LM head tied

    # ViT wider than the text: the decoder's cross-attention key/value weights keep their fresh init
    cfg = model_preset("tiny")
    wide = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, width=64))
    vqa = BlipVQA.from_blip(build_model(wide, vocab_size=len(tok)))
    fresh = vqa.init_notes[0]
    assert fresh.startswith("4 tensors keep their fresh initialisation")
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight" in fresh
    assert vqa.text_decoder.bert.layers[0].crossattention.self.key.weight.shape == (32, 32)
    assert vqa.text_encoder.layers[0].crossattention.self.key.weight.shape == (32, 64)


def test_vqa_checkpoint_round_trip_and_resolution(tok, tmp_path):
    m = _tiny_vqa(tok)
    save_model_dir(tmp_path / "vqa", m, tok)
    back = load_model_dir(tmp_path / "vqa")
    assert isinstance(back.model, BlipVQA) and back.momentum_state is None
    for (k, a), (_, b) in zip(m.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), k
    image = _images(2)
    assert generate_answers(back.model, tok, image, QUESTIONS[:2]) == generate_answers(m, tok, image, QUESTIONS[:2])
    big = load_model_dir(tmp_path / "vqa", image_size=48)
    assert isinstance(big.model, BlipVQA) and big.model.visual_encoder.pos_embed.shape[1] == 37
    # a plain BLIP checkpoint still loads as BlipModel, and its config.json has no architecture entry
    save_model_dir(tmp_path / "blip", build_model(model_preset("tiny"), vocab_size=len(tok)))
    assert checkpoint_architecture(tmp_path / "blip") == "blip"
    assert "architecture" not in (tmp_path / "blip" / "config.json").read_text()
    assert not is_vqa(load_model_dir(tmp_path / "blip").model)
    cfg_file = tmp_path / "vqa" / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"blip_vqa"', '"blip_nlvr"'))
    with pytest.raises(UserError, match="unknown architecture 'blip_nlvr'"):
        load_model_dir(tmp_path / "vqa")


def test_question_and_answer_tokens(tok):
    assert pre_question('What is "THIS"?  (a dog).') == "what is this?  a dog"
    assert pre_question(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    q, qm = question_tokens(tok, ["A DOG?", "what is the dog doing"])
    assert q[0, 0] == tok.enc_id and q[0, 1] == tok.hf.convert_tokens_to_ids("a")
    assert q.shape[1] <= 35 and qm[0].sum() < qm[1].sum()
    long_q, _ = question_tokens(tok, [" ".join(["dog"] * 80)])
    assert long_q.shape[1] == 35
    a, am = answer_tokens(tok, ["two cats", "dog"])
    assert a[0, 0] == tok.dec_id and a[0, int(am[0].sum()) - 1] == tok.sep_id


def test_training_helpers(tok):
    m = _tiny_vqa(tok)
    assert m.no_weight_decay() <= {n for n, _ in m.named_parameters()}
    m.set_grad_checkpointing(1)
    m.train()
    image = _images(2)
    q, qm = question_tokens(tok, QUESTIONS[:2])
    a, am = answer_tokens(tok, ANSWERS[:3])
    loss = m.answer_loss(image, q, qm, a, am, torch.ones(3), torch.tensor([1, 2]))
    loss.backward()
    assert m.visual_encoder.pos_embed.grad is not None and m.text_encoder.layers[0].attention.self.query.weight.grad \
        is not None


# --------------------------------------------------------------------------------------------------
# blip convert
# --------------------------------------------------------------------------------------------------


def test_convert_cli_vqa_from_hf_and_official_and_back(tok, hf_pair, tmp_path, capsys):
    from components.cli import main as cli

    _, _, hf_dir = hf_pair
    assert cli(["convert", "--from", "hf", str(hf_dir), "--to", str(tmp_path / "blip")]) == 0
    assert "source: Hugging Face BlipForQuestionAnswering" in capsys.readouterr().out
    assert isinstance(load_model_dir(tmp_path / "blip").model, BlipVQA)
    # --format hf of a VQA model: the task is vqa without --task
    assert cli(["convert", "--from", "blip", str(tmp_path / "blip"), "--to", str(tmp_path / "hf"), "--format",
                "hf"]) == 0
    _, info = BlipForQuestionAnswering.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert cli(["convert", "--from", "blip", str(tmp_path / "blip"), "--to", str(tmp_path / "x"), "--format",
                "hf", "--task", "caption"]) == 2
    assert "exports only as --task vqa" in capsys.readouterr().err

    # --format official of a VQA model: the BLIP_VQA layout
    assert cli(["convert", "--from", "blip", str(tmp_path / "blip"), "--to", str(tmp_path / "v.pth"), "--format",
                "official"]) == 0
    state = torch.load(tmp_path / "v.pth", weights_only=True)["model"]
    assert sorted({k.split(".")[0] for k in state}) == ["text_decoder", "text_encoder", "visual_encoder"]
    capsys.readouterr()
    assert cli(["convert", "--from", "blip", str(tmp_path / "blip"), "--to", str(tmp_path / "v2.pth"),
                "--format", "official", "--task", "pretrain"]) == 2
    assert "exports only as --task vqa" in capsys.readouterr().err
