"""Likelihood ranking on tiny random Llama and Qwen2 models: tree-attention scores against scoring
each title on its own, the best-first search and its budget, the no-history prior, exclusions, and a taught title."""

from __future__ import annotations

import pytest
import torch

from bigrec.data.prompts import DOMAINS, instruction_row, prompt_for_row
from bigrec.llm.layouts import get_layout
from bigrec.llm.likelihood import TitleScorer
from bigrec.llm.models import load_model
from bigrec.llm.trie import Trie, response_ids

TITLES = ["Toy Story (1995)", "Heat (1995)", "Heat", 'Heat" 2', "Casino (1995)", "Heat", "Babe (1995)",
          "Heat 2", "Jumanji (1995)", "Sabrina (1995)", "Mortal Kombat (1995)", "Usual Suspects, The (1995)"]


def prompts() -> list[str]:
    movie = DOMAINS["movie"]
    return [prompt_for_row(instruction_row(movie, h, "x")) for h in
            (["Toy Story (1995)", "Babe (1995)"], ["Casino (1995)"], ["Heat", "Casino (1995)", "Toy Story (1995)"])]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def loaded(request, tiny_model_dir, tiny_qwen_dir):
    path = tiny_model_dir if request.param == "llama" else tiny_qwen_dir
    model, tok = load_model(path, precision="fp32", device="cpu")
    return model, tok


def brute_force(model, tok, prompt: str, trie: Trie, layout: str = "window") -> torch.Tensor:
    """Each title scored by its own forward pass: prompt then response tokens, summed log-probs."""
    head = tok(prompt)["input_ids"]
    scores = []
    for title in trie.titles:
        tail = get_layout(layout).response_ids(tok, title)
        ids = torch.tensor([head + tail])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        scores.append(sum(float(logp[len(head) - 1 + i, t]) for i, t in enumerate(tail)))
    return torch.tensor(scores)


def test_tree_scores_equal_each_title_scored_alone(loaded):
    model, tok = loaded
    trie = Trie.build(tok, TITLES)
    for chunk in (2048, 3):  # one chunk, and chunks that repeat their ancestors
        scorer = TitleScorer(model, tok, trie, chunk_tokens=chunk, batch_size=2)
        got = scorer.exact(prompts())
        for r, prompt in enumerate(prompts()):
            torch.testing.assert_close(got[r], brute_force(model, tok, prompt, trie), atol=2e-4, rtol=1e-4)


def test_timeline_titles_end_at_the_separator(loaded):
    model, tok = loaded
    trie = get_layout("timeline").trie(tok, TITLES)
    prompt = "The movies the user has watched, in order:\nHeat\nBabe (1995)\n"
    got = TitleScorer(model, tok, trie).exact([prompt])[0]
    torch.testing.assert_close(got, brute_force(model, tok, prompt, trie, "timeline"), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("step_nodes", [1, 3, 64])
def test_the_search_finds_the_exact_top_and_a_budget_cut_says_what_it_certifies(loaded, step_nodes):
    model, tok = loaded
    trie = Trie.build(tok, TITLES)
    scorer = TitleScorer(model, tok, trie, batch_size=2)
    exact = scorer.exact(prompts())
    n = len(trie.titles)
    full = scorer.rank(prompts(), top=n, step_nodes=step_nodes)
    top3 = scorer.rank(prompts(), top=3, step_nodes=step_nodes)
    cut = scorer.rank(prompts(), top=n, step_nodes=1, max_nodes=4)
    for r in range(len(prompts())):
        order = torch.argsort(exact[r], descending=True, stable=True).tolist()
        assert full[r].leaves == order and full[r].certified == n
        torch.testing.assert_close(torch.tensor(full[r].scores), exact[r][order])
        assert top3[r].leaves == order[:3] and top3[r].certified == 3
        torch.testing.assert_close(torch.tensor(top3[r].scores), exact[r][order[:3]])
        # four tokens fed cannot reach every title: fewer places are certain, and those are exact
        assert len(cut[r].leaves) == n and cut[r].certified < n
        assert cut[r].leaves[:cut[r].certified] == order[:cut[r].certified]
        # titles not reached are placed by an upper bound on their score
        assert all(s >= float(exact[r][leaf]) - 1e-5 for leaf, s in zip(cut[r].leaves, cut[r].scores, strict=True))


def test_prior_weight_zero_changes_nothing_and_a_prior_reorders(loaded):
    model, tok = loaded
    trie = Trie.build(tok, TITLES)
    scorer = TitleScorer(model, tok, trie)
    n = len(trie.titles)
    empty = prompt_for_row(instruction_row(DOMAINS["movie"], [], "x"))
    prior = scorer.prior(empty)
    torch.testing.assert_close(prior, brute_force(model, tok, empty, trie), atol=2e-4, rtol=1e-4)
    plain = scorer.rank(prompts(), top=n)
    zero = scorer.rank(prompts(), top=n, prior=[0.0 * prior] * 3)
    assert [r.leaves for r in plain] == [r.leaves for r in zero]
    exact = scorer.exact(prompts())
    corrected = scorer.rank(prompts(), top=n, prior=[1.0 * prior] * 3)
    top3 = scorer.rank(prompts(), top=3, prior=[1.0 * prior] * 3, step_nodes=2)
    for r in range(3):
        assert corrected[r].leaves == torch.argsort(exact[r] - prior, descending=True, stable=True).tolist()
        assert top3[r].leaves == corrected[r].leaves[:3] and top3[r].certified == 3


def test_excluded_titles_never_rank(loaded):
    model, tok = loaded
    trie = Trie.build(tok, TITLES)
    scorer = TitleScorer(model, tok, trie)
    banned = [trie.titles.index("Heat"), trie.titles.index("Babe (1995)")]
    got = scorer.rank(prompts(), top=len(trie.titles), excluded=[banned] * 3)
    top2 = scorer.rank(prompts(), top=2, excluded=[banned] * 3, step_nodes=1)
    for r, short in zip(got, top2, strict=True):
        assert not set(banned) & set(r.leaves) and len(r.leaves) == len(trie.titles) - 2
        assert short.leaves == r.leaves[:2] and short.certified == 2


def test_a_title_taught_to_the_model_ranks_first(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, precision="fp32", device="cpu")
    trie = Trie.build(tok, TITLES)
    prompt = prompts()[1]
    taught = "Mortal Kombat (1995)"
    head, tail = tok(prompt)["input_ids"], response_ids(tok, taught)
    ids = torch.tensor([head + tail])
    labels = ids.clone()
    labels[0, :len(head)] = -100
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    ranking = TitleScorer(model, tok, trie).rank([prompt], top=3)[0]
    assert trie.titles[ranking.leaves[0]] == taught and ranking.certified >= 1


def test_bf16_weights_are_cast_once_with_the_same_scores(loaded):
    """Under bf16 autocast the body's linear weights are held in bf16 for a call: the same scores as
    autocast casting them at every step, and the model's own fp32 weights are back afterwards."""
    model, tok = loaded
    trie = Trie.build(tok, TITLES)
    scorer = TitleScorer(model, tok, trie, autocast=torch.bfloat16, chunk_tokens=5, batch_size=2)
    before = {name: p for name, p in model.named_parameters()}
    ids = scorer._encode(prompts()[:2])
    fed = scorer.fed_for(torch.arange(len(trie.titles)))
    every_step = scorer.cumulative(scorer.edge_logprobs(ids, fed))[:, scorer.leaf_node]  # no cast held
    assert torch.equal(scorer.exact(prompts()[:2]), every_step)
    with scorer._cast_weights():
        dtypes = {m.weight.dtype for m in scorer.body.modules() if isinstance(m, torch.nn.Linear)}
        assert dtypes == {torch.bfloat16} and model.get_output_embeddings().weight.dtype == torch.float32
    assert all(p is before[name] for name, p in model.named_parameters())  # the very same parameters
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ranked = scorer.rank(prompts()[:2], 5)
    for r, row in zip(ranked, every_step, strict=True):  # the search attends in another order: bf16 ties may swap
        assert torch.allclose(torch.tensor(r.scores), row[r.leaves], atol=1e-2)
        assert float(row[r.leaves].min()) >= float(row.sort(descending=True).values[4]) - 1e-2


def test_packed_gqa_sdpa_equals_sdpa_with_repeated_keys():
    """Each key/value head's query heads stacked along the query axis under a tiled mask: the same
    attention as transformers' SDPA path, which repeats the keys and values."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from bigrec.llm.likelihood import _packed_gqa_sdpa

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    query, key, value = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    mask = torch.rand(2, 1, 5, 11) > 0.5
    mask[..., 0] = True  # every query attends somewhere
    ours, _ = _packed_gqa_sdpa(module, query, key, value, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == theirs.shape == (2, 5, 6, 8)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_tree_attention_equals_sdpa_under_the_dense_mask():
    """A search step's attention over the prompt and its own ancestors, gathered and merged by
    log-sum-exp, against SDPA over the whole cache under the mask that allows the same keys."""
    from bigrec.llm.likelihood import _tree_attention

    torch.manual_seed(0)
    b, kv, groups, w, p, fed, a = 2, 2, 3, 5, 7, 20, 4
    query, key, value = torch.randn(b, kv * groups, w, 8), torch.randn(b, kv, p + fed, 8), torch.randn(b, kv, p + fed, 8)
    real = torch.ones(b, p, dtype=torch.bool)
    real[0, :3] = False  # left padding
    index = torch.stack([torch.stack([torch.randperm(fed)[:a] + p for _ in range(w)]) for _ in range(b)])
    valid = torch.rand(b, w, a) > 0.4
    valid[..., 0] = True
    allowed = torch.zeros(b, w, p + fed, dtype=torch.bool)
    allowed[:, :, :p] = real[:, None]
    rows, cols, _ = torch.nonzero(valid, as_tuple=True)
    allowed[rows, cols, index[valid]] = True
    prompt_mask = torch.zeros(b, 1, 1, p).masked_fill(~real[:, None, None], float("-inf"))
    tree = TitleScorer._tree_keys(prompt_mask, index - p, valid, p)
    assert tree.keys.shape[1] < fed and (tree.allowed.sum(-1) == valid.sum(-1)[:, None]).all()  # the union, gathered
    ours = _tree_attention(query, key, value, tree, scaling=0.3)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=allowed[:, None], scale=0.3)
    assert ours.shape == (b, w, kv * groups, 8)
    assert torch.allclose(ours, theirs.transpose(1, 2), atol=1e-5)


def test_the_search_scores_the_same_with_tree_attention_or_a_dense_mask(loaded):
    """Search steps attend over their ancestors' gathered keys (on a CPU, once a search has fed
    ``tree_from`` nodes) or over the whole cache under a dense mask: the same rankings and scores in fp32."""
    model, tok = loaded
    scorer = TitleScorer(model, tok, Trie.build(tok, TITLES), batch_size=2)
    assert scorer.tree_attention
    scorer.tree_from = 0
    tree = scorer.rank(prompts(), 6, step_nodes=3)
    scorer.tree_attention = False
    dense = scorer.rank(prompts(), 6, step_nodes=3)
    assert [r.leaves for r in tree] == [r.leaves for r in dense]
    assert torch.allclose(torch.tensor([r.scores for r in tree]), torch.tensor([r.scores for r in dense]), atol=1e-5)


def test_grouped_query_models_attend_packed_with_the_same_scores(loaded):
    """The tiny models are grouped-query: the scorer's calls attend through the packed SDPA, score as
    transformers' own SDPA does, and leave the model on SDPA."""
    from bigrec.llm.likelihood import PACKED_SDPA

    model, tok = loaded
    scorer = TitleScorer(model, tok, Trie.build(tok, TITLES), chunk_tokens=5, batch_size=2)
    assert scorer._sdpa_config is not None and model.config._attn_implementation == "sdpa"
    with scorer._packed_attention():
        assert model.config._attn_implementation == PACKED_SDPA
    packed, ranked = scorer.exact(prompts()), scorer.rank(prompts(), 5)
    assert model.config._attn_implementation == "sdpa"
    scorer.packed_gqa = False  # transformers' own SDPA, keys and values repeated
    with scorer._packed_attention():
        assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(packed, scorer.exact(prompts()), atol=1e-5)
    assert [r.leaves for r in ranked] == [r.leaves for r in scorer.rank(prompts(), 5)]
