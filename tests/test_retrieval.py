"""Retrieval: recall@K on hand-worked score matrices (several captions per image) and the ITM re-rank scores."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from blip_testing import IDS, tiny_batch, tiny_model, torchrun2

from blip_core.eval.retrieval import recall_at_k, retrieval_ranks
from blip_core.retrieval import (
    OUTSIDE_TOP_K,
    itc_similarity,
    rank_rows,
    rerank_i2t,
    rerank_t2i,
    retrieval_scores,
)

# 3 images with 2 captions each: texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]

# image 0: its caption 1 is the best text overall                        -> rank 0
# image 1: captions 2 (0.5) and 3 (0.2); texts 0 (0.7) and 4 (0.6) beat both -> rank 2
# image 2: captions 4 (0.5) and 5 (0.1); texts 0..3 (0.9..0.6) beat both      -> rank 4
I2T = [
    [0.1, 0.9, 0.8, 0.2, 0.3, 0.0],
    [0.7, 0.1, 0.5, 0.2, 0.6, 0.0],
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],
]
# each text's own image: t0 first; t1 second; t2 first; t3 third; t4 first; t5 second
T2I = [
    [0.9, 0.1, 0.2],
    [0.3, 0.5, 0.1],
    [0.2, 0.8, 0.1],
    [0.6, 0.4, 0.7],
    [0.1, 0.2, 0.3],
    [0.5, 0.1, 0.4],
]


def test_ranks_hand_worked():
    tr, ir = retrieval_ranks(I2T, T2I, IMG2TXT, TXT2IMG)
    assert tr.tolist() == [0, 2, 4]
    assert ir.tolist() == [0, 1, 0, 2, 0, 1]


def test_recall_hand_worked():
    r = recall_at_k(torch.tensor(I2T), torch.tensor(T2I), IMG2TXT, TXT2IMG, ks=(1, 2, 5))
    assert r["tr_r1"] == pytest.approx(100 / 3)
    assert r["tr_r2"] == pytest.approx(100 / 3)
    assert r["tr_r5"] == pytest.approx(100.0)
    assert r["ir_r1"] == pytest.approx(50.0)
    assert r["ir_r2"] == pytest.approx(500 / 6)
    assert r["ir_r5"] == pytest.approx(100.0)
    assert r["mean_r1"] == pytest.approx((100 / 3 + 50.0) / 2)
    assert r["tr_mean"] == pytest.approx((100 / 3 + 100 / 3 + 100) / 3)
    assert r["ir_mean"] == pytest.approx((50 + 500 / 6 + 100) / 3)
    assert r["r_mean"] == pytest.approx((r["tr_mean"] + r["ir_mean"]) / 2)


def test_text_retrieval_uses_the_best_ranked_caption():
    # image 0's first caption is last of all, its second is first: still a hit at 1
    i2t = [[-5.0, 3.0, 1.0, 2.0], [0.0, 1.0, 2.0, 0.5]]
    t2i = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    r = recall_at_k(i2t, t2i, [[0, 1], [2, 3]], [0, 0, 1, 1], ks=(1,))
    assert r["tr_r1"] == 100.0
    assert r["ir_r1"] == 100.0
    # now text 1 (image 0's caption) beats both of image 1's captions: a miss for image 1
    i2t[1] = [0.0, 3.0, 2.0, 0.5]
    assert recall_at_k(i2t, t2i, [[0, 1], [2, 3]], [0, 0, 1, 1], ks=(1,))["tr_r1"] == 50.0


def _official_ranks(i2t: np.ndarray, t2i: np.ndarray, img2txt, txt2img):
    """The official ``itm_eval`` rank computation (argsort), for matrices without ties."""
    tr = np.zeros(i2t.shape[0])
    for index, score in enumerate(i2t):
        inds = np.argsort(score)[::-1]
        tr[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    ir = np.zeros(t2i.shape[0])
    for index, score in enumerate(t2i):
        inds = np.argsort(score)[::-1]
        ir[index] = np.where(inds == txt2img[index])[0][0]
    return tr, ir


def test_ranks_match_official_on_random_matrices():
    rng = np.random.default_rng(0)
    n_img, per = 20, 3
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [i for i in range(n_img) for _ in range(per)]
    for _ in range(5):
        i2t = rng.normal(size=(n_img, n_img * per))
        t2i = rng.normal(size=(n_img * per, n_img))
        tr, ir = retrieval_ranks(i2t, t2i, img2txt, txt2img)
        tr_ref, ir_ref = _official_ranks(i2t, t2i, img2txt, txt2img)
        assert tr.tolist() == tr_ref.astype(int).tolist()
        assert ir.tolist() == ir_ref.astype(int).tolist()


def test_ties_count_against_the_ground_truth():
    i2t = torch.zeros(3, 6)
    t2i = torch.zeros(6, 3)
    r = recall_at_k(i2t, t2i, IMG2TXT, TXT2IMG, ks=(1, 2))
    assert r["tr_r1"] == 0.0 and r["ir_r1"] == 0.0
    assert r["ir_r2"] == 0.0  # two other images tie with the right one: rank 2


def test_recall_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        recall_at_k(I2T, torch.tensor(T2I).T, IMG2TXT, TXT2IMG)
    with pytest.raises(ValueError):
        recall_at_k(I2T, T2I, IMG2TXT[:2], TXT2IMG)


# --------------------------------------------------------------------------------------------------
# Re-rank scoring on a real (tiny) model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (conftest restores the count)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_model(seed=3).eval()
    images, _, _ = tiny_batch(batch=5, seed=2)
    _, ids, mask = tiny_batch(batch=7, length=8, seed=4)
    return model, images, ids, mask


def _pair_logit(model, image_embeds, ids, mask, i, j):
    """ITM match logit of text j against image i, one pair at a time (no folding, no index)."""
    enc = ids[j:j + 1].clone()
    enc[:, 0] = IDS.enc
    cross = model.cross_kv(image_embeds[i:i + 1])
    return model.itm_logits(enc, mask[j:j + 1], cross)[0, 1].item()


def test_itc_similarity_is_the_cosine_of_features(setup):
    model, images, ids, mask = setup
    sim, embeds, img_f, txt_f = itc_similarity(model, images, ids, mask, batch_size=2)
    assert sim.shape == (5, 7) and embeds.shape[0] == 5
    with torch.no_grad():
        img_ref = model.image_features(model.encode_image(images))
        txt_ref = model.text_features(model.encode_text(ids, mask))
    torch.testing.assert_close(sim, img_ref @ txt_ref.T, atol=1e-5, rtol=1e-4)
    assert torch.all(sim.abs() <= 1 + 1e-5)


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_rerank_score_is_itm_logit_plus_cosine_on_top_k(setup, batch_size):
    model, images, ids, mask = setup
    k = 3
    itc = itc_similarity(model, images, ids, mask)
    with torch.no_grad():
        i2t = rerank_i2t(model, itc.image_embeds, itc.sim, ids, mask, enc_id=IDS.enc, k=k, batch_size=batch_size)
        t2i = rerank_t2i(model, itc.image_embeds, itc.sim, ids, mask, enc_id=IDS.enc, k=k, batch_size=batch_size)
        assert i2t.shape == (5, 7) and t2i.shape == (7, 5)
        for i in range(5):
            top = set(itc.sim[i].topk(k).indices.tolist())
            for j in range(7):
                if j in top:
                    want = _pair_logit(model, itc.image_embeds, ids, mask, i, j) + itc.sim[i, j].item()
                    assert i2t[i, j].item() == pytest.approx(want, abs=1e-4)
                else:
                    assert i2t[i, j].item() == OUTSIDE_TOP_K
        for j in range(7):
            top = set(itc.sim[:, j].topk(k).indices.tolist())
            for i in range(5):
                if i in top:
                    want = _pair_logit(model, itc.image_embeds, ids, mask, i, j) + itc.sim[i, j].item()
                    assert t2i[j, i].item() == pytest.approx(want, abs=1e-4)
                else:
                    assert t2i[j, i].item() == OUTSIDE_TOP_K
    assert ((i2t != OUTSIDE_TOP_K).sum(1) == k).all()
    assert ((t2i != OUTSIDE_TOP_K).sum(1) == k).all()


def test_k_larger_than_the_split_scores_everything(setup):
    model, images, ids, mask = setup
    scores = retrieval_scores(model, images, ids, mask, enc_id=IDS.enc, k=100, batch_size=8)
    assert (scores.i2t != OUTSIDE_TOP_K).all() and (scores.t2i != OUTSIDE_TOP_K).all()
    # the same pair gets the same fused score from both directions
    torch.testing.assert_close(scores.i2t, scores.t2i.T, atol=1e-4, rtol=1e-4)


def test_retrieval_metrics_equal_a_float64_oracle():
    """The whole evaluation (ITC top-k, ITM re-rank, recall@K) against an oracle computed independently in
    float64: every pair's cosine and ITM logit one pair at a time, each row's top k by a full sort, fused
    scores, and ranks by the official argsort. The split is built so that no float32 rounding can reorder
    anything (margins checked below), so the oracle's ranking is the true one."""
    import copy

    n_img, n_txt, k = 8, 20, 4
    model = tiny_model(seed=11).eval()
    images, _, _ = tiny_batch(batch=n_img, seed=12)
    _, ids, mask = tiny_batch(batch=n_txt, length=8, seed=13)
    img2txt = [list(range(i, n_txt, n_img)) for i in range(n_img)]
    txt2img = [j % n_img for j in range(n_txt)]

    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        emb = ref.encode_image(images.double())
        cos = (ref.image_features(emb) @ ref.text_features(ref.encode_text(ids, mask)).T).numpy()  # (I, T)
        itm = np.array([[_pair_logit(ref, emb, ids, mask, i, j) for j in range(n_txt)] for i in range(n_img)])
    want_i2t = np.full((n_img, n_txt), float(OUTSIDE_TOP_K))
    want_t2i = np.full((n_txt, n_img), float(OUTSIDE_TOP_K))
    for i in range(n_img):
        top = np.argsort(-cos[i])[:k]
        want_i2t[i, top] = itm[i, top] + cos[i, top]
    for j in range(n_txt):
        top = np.argsort(-cos[:, j])[:k]
        want_t2i[j, top] = itm[top, j] + cos[top, j]
    got = retrieval_scores(model, images, ids, mask, enc_id=IDS.enc, k=k, batch_size=3, itm_batch_size=8,
                           block_rows=16, with_sim=True)
    np.testing.assert_allclose(got.i2t.numpy(), want_i2t, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got.t2i.numpy(), want_t2i, rtol=0, atol=1e-4)
    # The margins that decide every ranking (k-th against (k+1)-th cosine of each row, any two fused scores of
    # a row) are 20 times the float32 rounding actually seen, so the float64 order is the one to get.
    cos_err = np.abs(got.sim.numpy() - cos).max()
    fused_err = max(np.abs(got.i2t.numpy() - want_i2t).max(), np.abs(got.t2i.numpy() - want_t2i).max())
    for rows in (cos, cos.T):
        srt = -np.sort(-rows, axis=1)
        assert np.min(srt[:, k - 1] - srt[:, k]) > 20 * cos_err
    for rows in (want_i2t, want_t2i):
        for row in rows:
            assert np.min(np.diff(np.sort(row[row != OUTSIDE_TOP_K]))) > 20 * fused_err
    tr_ref, ir_ref = _official_ranks(want_i2t, want_t2i, img2txt, txt2img)
    tr, ir = retrieval_ranks(got.i2t, got.t2i, img2txt, txt2img)
    # ranks inside the top k are exact; outside it every candidate is tied at OUTSIDE_TOP_K (rank >= k)
    assert np.minimum(tr.numpy(), k).tolist() == np.minimum(tr_ref, k).astype(int).tolist()
    assert np.minimum(ir.numpy(), k).tolist() == np.minimum(ir_ref, k).astype(int).tolist()
    assert 0 < np.mean(tr_ref < k) < 1 and 0 < np.mean(ir_ref < k) < 1  # hits and misses on both sides
    r = recall_at_k(got.i2t, got.t2i, img2txt, txt2img, ks=(1, 2, 4))
    for K in (1, 2, 4):
        assert r[f"tr_r{K}"] == pytest.approx(100 * np.mean(tr_ref < K))
        assert r[f"ir_r{K}"] == pytest.approx(100 * np.mean(ir_ref < K))


# --------------------------------------------------------------------------------------------------
# Blocked, rank-split and resumable retrieval_scores against the unblocked computation
# --------------------------------------------------------------------------------------------------

N_IMG, N_TXT, K = 37, 101, 5  # more rows than one block of 16, and ragged ends
# itm_batch_size K: one row per ITM forward, so blocks and rank shares are multiples of 16 rows


@pytest.fixture(scope="module")
def larger():
    model = tiny_model(seed=5).eval()
    images, _, _ = tiny_batch(batch=N_IMG, seed=6)
    _, ids, mask = tiny_batch(batch=N_TXT, length=8, seed=7)
    img2txt = [list(range(i, N_TXT, N_IMG)) for i in range(N_IMG)]  # 2-3 captions per image
    txt2img = [j % N_IMG for j in range(N_TXT)]
    return model, images, ids, mask, img2txt, txt2img


def _unblocked(model, images, ids, mask, itm_batch_size):
    """Today's path: the whole cosine matrix, then each direction re-ranked row by row."""
    itc = itc_similarity(model, images, ids, mask, batch_size=8)
    with torch.no_grad():
        i2t = rerank_i2t(model, itc.image_embeds, itc.sim, ids, mask, enc_id=IDS.enc, k=K, batch_size=itm_batch_size)
        t2i = rerank_t2i(model, itc.image_embeds, itc.sim, ids, mask, enc_id=IDS.enc, k=K, batch_size=itm_batch_size)
    return i2t, t2i


def _blocked(model, images, ids, mask, itm_batch_size, **kw):
    return retrieval_scores(model, images, ids, mask, enc_id=IDS.enc, k=K, batch_size=8,
                            itm_batch_size=itm_batch_size, **kw)


@pytest.mark.parametrize("itm_batch_size", [5, 16, 64])
@pytest.mark.parametrize("block_rows", [1, 20, 4096])
def test_blocked_scores_and_metrics_equal_the_unblocked(larger, itm_batch_size, block_rows):
    model, images, ids, mask, img2txt, txt2img = larger
    i2t, t2i = _unblocked(model, images, ids, mask, itm_batch_size)
    got = _blocked(model, images, ids, mask, itm_batch_size, block_rows=block_rows)
    assert torch.equal(got.i2t, i2t.cpu()) and torch.equal(got.t2i, t2i.cpu())
    assert recall_at_k(got.i2t, got.t2i, img2txt, txt2img) == recall_at_k(i2t, t2i, img2txt, txt2img)
    assert got.sim is None


def test_two_ranks_sum_to_the_unblocked(larger):
    model, images, ids, mask, img2txt, txt2img = larger
    i2t, t2i = _unblocked(model, images, ids, mask, K)
    parts = [_blocked(model, images, ids, mask, K, block_rows=16, rank=r, world_size=2) for r in (0, 1)]
    for p in parts:  # each rank filled a share of the rows and left the others at zero
        assert 0 < int((p.i2t != 0).any(dim=1).sum()) < N_IMG and 0 < int((p.t2i != 0).any(dim=1).sum()) < N_TXT
    s_i2t, s_t2i = parts[0].i2t + parts[1].i2t, parts[0].t2i + parts[1].t2i
    assert torch.equal(s_i2t, i2t) and torch.equal(s_t2i, t2i)
    assert recall_at_k(s_i2t, s_t2i, img2txt, txt2img) == recall_at_k(i2t, t2i, img2txt, txt2img)


def test_two_ranks_with_a_reduce_function_each_get_the_whole_result(larger):
    model, images, ids, mask, _, _ = larger
    i2t, t2i = _unblocked(model, images, ids, mask, K)
    barrier, box = threading.Barrier(2), {}

    def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:  # two threads stand for two ranks
        box[threading.get_ident()] = t
        barrier.wait()
        total = sum(box.values())
        barrier.wait()
        return total

    out: dict[int, object] = {}

    def rank(r: int) -> None:
        out[r] = _blocked(model, images, ids, mask, K, block_rows=16, rank=r, world_size=2,
                          reduce_fn=all_reduce_sum)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(out) == [0, 1]
    for r in (0, 1):
        assert torch.equal(out[r].i2t, i2t) and torch.equal(out[r].t2i, t2i)


def test_resumed_partial_result_equals_the_unblocked(larger, tmp_path):
    model, images, ids, mask, img2txt, txt2img = larger
    i2t, t2i = _unblocked(model, images, ids, mask, K)
    first = _blocked(model, images, ids, mask, K, block_rows=16, partial_dir=tmp_path, progress=True)
    blocks = sorted(tmp_path.glob("*/*.pt"))
    assert len(blocks) == 3 + 7  # ceil(37 / 16) image blocks + ceil(101 / 16) text blocks
    assert not list(tmp_path.glob("*/.*"))  # no temporary file left behind
    for p in blocks[::2]:  # an interrupted run: only some blocks were finished
        p.unlink()
    blocks[1].write_bytes(b"not a block")  # and one is damaged: recomputed, not trusted
    resumed = _blocked(model, images, ids, mask, K, block_rows=16, partial_dir=tmp_path)
    assert torch.equal(resumed.i2t, i2t) and torch.equal(resumed.t2i, t2i) and torch.equal(first.i2t, i2t)
    assert recall_at_k(resumed.i2t, resumed.t2i, img2txt, txt2img) == recall_at_k(i2t, t2i, img2txt, txt2img)
    assert len(sorted(tmp_path.glob("*/*.pt"))) == len(blocks)
    # the saved blocks are what a re-run reads: change one and the re-run reports the change
    saved = torch.load(blocks[0], weights_only=True)
    saved["val"] = saved["val"] + 1000.0
    torch.save(saved, blocks[0])
    reread = _blocked(model, images, ids, mask, K, block_rows=16, partial_dir=tmp_path)
    assert not torch.equal(reread.i2t, i2t) and reread.i2t.max() > 900
    # another model never reads this model's blocks
    other = tiny_model(seed=9).eval()
    o_i2t, o_t2i = _unblocked(other, images, ids, mask, K)
    got = _blocked(other, images, ids, mask, K, block_rows=16, partial_dir=tmp_path)
    assert torch.equal(got.i2t, o_i2t) and torch.equal(got.t2i, o_t2i)
    assert len(list(tmp_path.iterdir())) == 2


def test_rank_rows_split_evenly_in_whole_units():
    for n, world, unit in [(37, 2, 16), (101, 3, 16), (5, 4, 1), (0, 2, 16), (25000, 8, 16)]:
        shares = [rank_rows(n, r, world, unit) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        assert all(lo % unit == 0 for lo, _ in shares)
    assert [hi - lo for lo, hi in (rank_rows(25000, r, 8, 16) for r in range(8))] == [3136] * 7 + [3048]
    with pytest.raises(ValueError):
        rank_rows(10, 2, 2)


@pytest.mark.slow  # two processes
def test_two_gloo_processes_all_reduce_to_the_unblocked(larger, tmp_path):
    model, images, ids, mask, _, _ = larger
    i2t, t2i = _unblocked(model, images, ids, mask, K)
    script = Path(__file__).parent / "scripts" / "ddp_retrieval.py"
    torchrun2(script, tmp_path / "scores")
    for r in (0, 1):
        got = torch.load(tmp_path / f"scores.{r}.pt", weights_only=True)
        assert torch.equal(got["i2t"], i2t) and torch.equal(got["t2i"], t2i)
