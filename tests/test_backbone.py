import numpy as np
import pytest
import torch

from demo_core.backbone import SamplingConfig, sample_from_logits
from demo_core.drafts.scan_form import draft_scan, score_answer
from demo_core.refiners.scan import ScanConfig, scan_refine
from demo_core.sequence import max_pairs

from conftest import TINY_VOCAB as VOCAB


def context(seed=0, images=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB.codebook_size, (images * VOCAB.cells,), generator=g)


def run_draft(model, sampling, seed=0, order=None, score="combined"):
    state = []
    steps = list(draft_scan(model, VOCAB, context(), sampling, torch.Generator().manual_seed(seed), order=order, state_out=state,
                            score=score))
    return steps, state[0]


def test_stream_yields_one_event_per_token_in_order(tiny_model):
    order = torch.randperm(VOCAB.cells, generator=torch.Generator().manual_seed(3))
    steps, state = run_draft(tiny_model, SamplingConfig(), order=order)
    assert [s.index for s in steps] == list(range(VOCAB.cells))
    assert [s.cell for s in steps] == order.tolist()
    assert all(0 <= int(s.codes[0]) < VOCAB.codebook_size for s in steps)   # never a special token
    assert state.codes.shape == (1, VOCAB.cells)


def test_same_seed_same_tokens(tiny_model):
    a = run_draft(tiny_model, SamplingConfig(), seed=5)[1].codes
    b = run_draft(tiny_model, SamplingConfig(), seed=5)[1].codes
    c = run_draft(tiny_model, SamplingConfig(), seed=6)[1].codes
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cached_and_uncached_agree(tiny_model):
    order = torch.randperm(VOCAB.cells, generator=torch.Generator().manual_seed(1))
    _, state = run_draft(tiny_model, SamplingConfig(temperature=0), order=order)
    gen, scores, _ = score_answer(tiny_model, VOCAB, context(), state.codes, order=order)
    assert torch.allclose(scores, state.scores, atol=1e-5)
    # greedy: every drafted code is the argmax of the uncached generation logits of its cell
    assert torch.equal(gen.argmax(-1), state.codes)


def test_candidates_batch(tiny_model):
    _, state = run_draft(tiny_model, SamplingConfig(candidates=3))
    assert state.codes.shape == (3, VOCAB.cells) and state.scores.shape == (3, VOCAB.cells)


def test_batch_of_contexts_drafts_each_row(tiny_model):
    """A (B, L) context drafts one answer per row, each equal (greedy) to drafting that row alone."""
    rows = torch.stack([context(0), context(1)])
    greedy = SamplingConfig(temperature=0)
    batched = []
    list(draft_scan(tiny_model, VOCAB, rows, greedy, state_out=batched))
    for row in range(2):
        single = []
        list(draft_scan(tiny_model, VOCAB, rows[row], greedy, state_out=single))
        assert torch.equal(batched[0].codes[row], single[0].codes[0])
        assert torch.allclose(batched[0].scores[row], single[0].scores[0], atol=1e-5)


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 10)
    picked = sample_from_logits(logits, SamplingConfig(temperature=1.0, top_k=1, top_p=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(picked, logits.argmax(-1))


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    draws = {int(sample_from_logits(logits, SamplingConfig(top_p=0.8), torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {0, 1}


def test_sampler_draws_the_truncated_distribution():
    """Inverse-CDF sampling: frequencies match the top-k / top-p renormalised probabilities."""
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])).repeat(20000, 1)
    cases = [(SamplingConfig(top_p=1.0), [0.5, 0.2, 0.15, 0.1, 0.05]),
             (SamplingConfig(top_p=0.8), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
             (SamplingConfig(top_p=0.6), [5 / 7, 2 / 7, 0, 0, 0]),
             (SamplingConfig(top_p=1.0, top_k=2), [5 / 7, 2 / 7, 0, 0, 0])]
    for sampling, expected in cases:
        drawn = sample_from_logits(logits, sampling, torch.Generator().manual_seed(0))
        share = torch.bincount(drawn, minlength=5).float() / len(drawn)
        assert torch.allclose(share, torch.tensor(expected), atol=0.015), (sampling, share)


def test_nucleus_over_a_large_vocabulary():
    """V > 64: the nucleus found in the top 64 (peaked) or by the full sort (flat) is the smallest prefix reaching p."""
    for decay in (0.9, 0.999):                       # peaked: ~22 codes reach 0.9; flat: ~180 do
        probs = decay ** torch.arange(200.0)
        probs = probs / probs.sum()
        before = probs.cumsum(0) - probs
        nucleus = set(torch.nonzero(before <= 0.9).flatten().tolist())
        rank = torch.randperm(200, generator=torch.Generator().manual_seed(0))
        logits = probs.log()[rank]                   # shuffled: cell j holds the rank[j]-th largest probability
        drawn = sample_from_logits(logits[None].repeat(20000, 1), SamplingConfig(top_p=0.9), torch.Generator().manual_seed(1))
        ranks = set(rank[torch.unique(drawn)].tolist())
        assert ranks <= nucleus and len(ranks) >= 0.9 * len(nucleus)


def test_scan_accepts_only_improvements_and_history_is_complete(tiny_model):
    _, state = run_draft(tiny_model, SamplingConfig())
    before = state.codes[0].clone()
    history = list(scan_refine(tiny_model, VOCAB, state, ScanConfig(iterations=6, cells_per_iteration=3, patience=100),
                               SamplingConfig(), torch.Generator().manual_seed(0)))
    assert len(history) == 6
    codes = before.clone()
    for record in history:
        assert len(record.cells) == 3 and len(set(record.cells)) == 3
        for cell, old, new, s_old, s_new, ok in zip(record.cells, record.old_codes, record.new_codes,
                                                     record.old_scores, record.new_scores, record.accepted):
            assert ok == (s_new > s_old)
            assert old == int(codes[cell])
            if ok:
                codes[cell] = new
        assert np.array_equal(codes.numpy(), record.codes.reshape(-1))        # (grid, grid), as the event has it
    assert torch.equal(codes, state.codes[0])


def test_scan_scores_match_an_uncached_forward(tiny_model):
    """The accepted state after SCAN equals what a plain sequence with the accepted pairs appended would score."""
    _, state = run_draft(tiny_model, SamplingConfig(temperature=0))
    ctx_len = state.context_length
    history = list(scan_refine(tiny_model, VOCAB, state, ScanConfig(iterations=1, cells_per_iteration=2, patience=100),
                               SamplingConfig(), torch.Generator().manual_seed(0)))
    record = history[0]
    # reference: [context, draft pairs, <at_n>, y'_n] uncached, for each regenerated cell separately
    from demo_core.sequence import interleave_answer
    for cell, new, s_new in zip(record.cells, record.new_codes, record.new_scores):
        order = torch.arange(VOCAB.cells)
        draft = interleave_answer(VOCAB, order, run_draft(tiny_model, SamplingConfig(temperature=0))[1].codes[0])
        ids = torch.cat([context(), draft, torch.tensor([VOCAB.at(cell), new])])[None]
        pos = torch.cat([torch.arange(ctx_len), (ctx_len + order).repeat_interleave(2), torch.tensor([ctx_len + cell] * 2)])[None]
        logits = tiny_model(input_ids=ids, position_ids=pos).logits[0].detach()
        from demo_core.backbone import quality_from_logits
        head = float(quality_from_logits(logits[-1], VOCAB))
        probability = float(torch.softmax(logits[-2, : VOCAB.codebook_size], -1)[new])   # p(y'_n) at its <at_n>
        assert abs(head * probability - s_new) < 1e-4


def test_head_score_is_the_quality_token_alone_and_combined_multiplies_in_the_code_probability(tiny_model):
    from demo_core.backbone import code_probability, token_score
    from demo_core.drafts.scan_form import score_answer

    codes = run_draft(tiny_model, SamplingConfig(temperature=0))[1].codes
    gen, combined, _ = score_answer(tiny_model, VOCAB, context(), codes)
    _, head, _ = score_answer(tiny_model, VOCAB, context(), codes, score="head")
    probability = code_probability(gen, codes)
    assert torch.allclose(combined, head * probability, atol=1e-6) and (combined < head).all()
    _, state = run_draft(tiny_model, SamplingConfig(temperature=0), score="head")
    assert torch.allclose(state.scores, head, atol=1e-5)
    history = list(scan_refine(tiny_model, VOCAB, state, ScanConfig(iterations=2, cells_per_iteration=2, patience=100,
                                                                    score="head"), SamplingConfig(), torch.Generator().manual_seed(0)))
    assert all(0 <= s <= 1 for record in history for s in record.new_scores)
    with pytest.raises(ValueError, match="quality score"):
        token_score(head, probability, "entropy")
    with pytest.raises(ValueError, match="quality score"):
        list(scan_refine(tiny_model, VOCAB, state, ScanConfig(score="entropy"), SamplingConfig()))


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5), SamplingConfig(temperature=0)])
def test_sampler_reports_the_model_probability_of_what_it_drew(sampling):
    from demo_core.backbone import code_probability

    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    codes, probability = sample_from_logits(logits, sampling, torch.Generator().manual_seed(1), with_probability=True)
    assert torch.equal(codes, sample_from_logits(logits, sampling, torch.Generator().manual_seed(1)))
    assert torch.allclose(probability, code_probability(logits, codes), atol=1e-6)


def test_max_pairs():
    assert max_pairs(512, 64) == 3
    assert max_pairs(4096, 256) == 7


def test_transformers_cache_is_edited_like_a_fast_cache(tiny_model):
    """Both runners' caches answer the same interface: keep positions, keep a batch row (no branching in SCAN)."""
    from transformers.cache_utils import DynamicCache

    from demo_core.fast_llama import TransformersRunner, fast_runner
    from demo_core.refiners.scan import select_cache_batch, select_cache_positions

    ids = torch.randint(0, VOCAB.codebook_size, (2, 300))
    positions = torch.arange(300)[None].repeat(2, 1)
    runner, dynamic = TransformersRunner(tiny_model), DynamicCache()
    wrapped, fast = None, None
    for start in range(0, 300, 100):                       # the fast cache grows past its first 256-slot buffer
        step = dict(input_ids=ids[:, start:start + 100], position_ids=positions[:, start:start + 100])
        out = runner(**step, past_key_values=wrapped)
        fast_out = fast_runner(tiny_model)(**step, past_key_values=fast)
        wrapped, fast = out.past_key_values, fast_out.past_key_values
        reference = tiny_model(input_ids=step["input_ids"], past_key_values=dynamic, use_cache=True).logits
        assert torch.equal(out.logits, reference) and torch.allclose(fast_out.logits, reference, atol=1e-5)
    keep = torch.tensor([0, 5, 7, 299])
    reference = dynamic.layers[0].keys.index_select(-2, keep)
    for cache in (wrapped, fast):
        select_cache_positions(cache, keep)
        assert cache.get_seq_length() == 4
        select_cache_batch(cache, 1)
    assert torch.equal(wrapped.layers[0].keys, reference[1:2])
    assert torch.allclose(fast.buffer[0, 0, :, :, :4], reference[1:2], atol=1e-5)


def test_both_caches_repeat_and_truncate_alike(tiny_model):
    """The raster loop's cache edits: a context cache repeated per candidate, and cut back to the context."""
    from demo_core.fast_llama import TransformersRunner, fast_runner

    ids = torch.randint(0, VOCAB.codebook_size, (1, 40))
    more = torch.randint(0, VOCAB.codebook_size, (3, 5))
    logits = []
    for runner in (TransformersRunner(tiny_model), fast_runner(tiny_model)):
        context = runner(ids, torch.arange(40)[None]).past_key_values
        rows = context.repeated(3)
        step = runner(more, (40 + torch.arange(5))[None].repeat(3, 1), rows)
        assert rows.get_seq_length() == 45 and context.get_seq_length() == 40      # the copy grew, the context did not
        runner(more[:1], (40 + torch.arange(5))[None], context)
        context.truncate(40)
        assert context.get_seq_length() == 40
        logits.append(step.logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_scan_over_many_iterations_matches_an_uncached_sequence():
    """Random draft order, 3 candidates, the cache growing past its first buffer and many accepted pairs:
    every new score equals an uncached forward over [context, draft, accepted pairs so far, <at_n>, y'_n]."""
    from demo_core.backbone import BackboneConfig, build_backbone, quality_from_logits
    from demo_core.refiners.scan import select_cache_batch
    from demo_core.sequence import interleave_answer

    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=512), VOCAB).eval()
    length = 230
    ctx = torch.randint(0, VOCAB.codebook_size, (length,), generator=torch.Generator().manual_seed(0))
    order = torch.randperm(VOCAB.cells, generator=torch.Generator().manual_seed(3))
    states = []
    list(draft_scan(model, VOCAB, ctx, SamplingConfig(candidates=3), torch.Generator().manual_seed(1), order=order, state_out=states))
    state = states[0]
    select_cache_batch(state.cache, 2)
    state.codes, state.scores = state.codes[2:3], state.scores[2:3]
    draft = state.codes[0].clone()
    history = list(scan_refine(model, VOCAB, state, ScanConfig(iterations=40, cells_per_iteration=3, patience=100, max_tries=10),
                               SamplingConfig(temperature=2.0), torch.Generator().manual_seed(0)))
    ids = ctx.tolist() + interleave_answer(VOCAB, order, draft[order]).tolist()
    pos = list(range(length)) + [length + int(c) for c in order for _ in range(2)]
    accepted = 0
    for record in history:
        for cell, new, score in zip(record.cells, record.new_codes, record.new_scores):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + [VOCAB.at(cell), new]]),
                               position_ids=torch.tensor([pos + [length + cell] * 2])).logits[0, -2:]
            probability = float(torch.softmax(logits[0, : VOCAB.codebook_size], -1)[new])    # p(y'_n) at its <at_n>
            assert abs(float(quality_from_logits(logits[1], VOCAB)) * probability - score) < 1e-4
        for cell, new, ok in zip(record.cells, record.new_codes, record.accepted):
            if ok:
                ids += [VOCAB.at(cell), new]
                pos += [length + cell] * 2
                accepted += 1
    assert accepted >= 10 and state.cache.get_seq_length() == len(ids)


def test_code_geometry_init_gives_similar_codes_similar_rows():
    """init_code_embeddings: near codes (in the VQ codebook) start with near rows, in the embedding and the head
    alike; the other rows (position instructions, quality tokens) keep their random init."""
    from demo_core.backbone import BackboneConfig, build_backbone, init_code_embeddings
    from demo_core.sequence import Vocab

    vocab = Vocab(64, 16)
    model = build_backbone(BackboneConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=128), vocab)
    specials = model.get_input_embeddings().weight[64:].clone()
    book = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    book[1] = book[0] + 0.01                                           # code 1 is code 0, nearly
    init_code_embeddings(model, book, seed=0)
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        rows = torch.nn.functional.normalize(weight[:64].detach(), dim=1)
        similarity = rows @ rows.T
        assert similarity[0, 1] > 0.99 and similarity[0, 2:].abs().mean() < 0.5
        # row similarity follows code-vector similarity
        whitened = torch.nn.functional.normalize((book - book.mean(0)) / book.std(0), dim=1)
        assert np.corrcoef(similarity.flatten().numpy(), (whitened @ whitened.T).flatten().numpy())[0, 1] > 0.6
    assert torch.equal(model.get_input_embeddings().weight[64:], specials)


def test_nucleus_over_4096_codes_in_each_search_stage():
    """The nucleus found in the top 64, the top 512 or by the full sort is the smallest prefix reaching p."""
    for decay in (0.9, 0.995, 0.9995):              # nucleus ~22 codes, ~460 (top 512), ~3,070 (full sort)
        probs = decay ** torch.arange(4096.0)
        probs = probs / probs.sum()
        before = probs.cumsum(0) - probs
        size = int((before <= 0.9).sum())
        rank = torch.randperm(4096, generator=torch.Generator().manual_seed(0))
        logits = probs.log()[rank]
        drawn = sample_from_logits(logits[None].repeat(3000, 1), SamplingConfig(top_p=0.9), torch.Generator().manual_seed(1))
        ranks = rank[drawn]
        assert int(ranks.max()) < size and int(ranks.max()) >= 0.8 * size, (decay, size, int(ranks.max()))
