"""Catalogue-constrained beam search on tiny random Llama and Qwen2 models, the trie, ranking, D3 prompt."""

from __future__ import annotations

import pytest
import torch

from bigrec.data.prompts import (
    DOMAINS,
    d3_category,
    instruction_row,
    prompt_for_row,
    quote,
    response_text,
)
from bigrec.grounding.ranking import rank_with_beams
from bigrec.llm.constrained import banned_leaves, beam_item_lists, constrained_generate
from bigrec.llm.models import load_model
from bigrec.llm.trie import Trie, response_ids

# ids 2 and 5 share a title; "Heat" is a text prefix of three others, and its whole response
# ('"Heat"') is a token prefix of the response of 'Heat" 2'.
TITLES = ["Toy Story (1995)", "Heat (1995)", "Heat", 'Heat" 2', "Casino (1995)", "Heat", "Babe (1995)",
          "Heat 2"]
DISTINCT = sorted(set(TITLES))


def rows() -> list[dict]:
    movie = DOMAINS["movie"]
    return [instruction_row(movie, ["Toy Story (1995)", "Babe (1995)"], "Heat (1995)"),
            instruction_row(movie, ["Casino (1995)"], "Heat"),
            instruction_row(movie, ["Heat", "Casino (1995)", "Toy Story (1995)"], 'Heat" 2')]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def loaded(request, tiny_model_dir, tiny_qwen_dir):
    path = tiny_model_dir if request.param == "llama" else tiny_qwen_dir
    model, tok = load_model(path, precision="fp32", device="cpu")
    return request.param, model, tok


def ids_of(title: str) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(TITLES) if t == title)


def test_trie_paths_end_with_eos_and_prefix_titles_keep_their_leaf(tiny_model_dir):
    _, tok = load_model(tiny_model_dir, precision="fp32", device="cpu")
    trie = Trie.build(tok, TITLES)
    assert sorted(trie.titles) == DISTINCT
    for title, items, path in zip(trie.titles, trie.leaf_items, trie.paths, strict=True):
        assert path == response_ids(tok, title) and path[-1] == tok.eos_token_id
        assert tuple(items) == ids_of(title)
        leaf, entered = trie.walk(path + [tok.pad_token_id])  # stops at EOS
        assert trie.titles[leaf] == title and len(entered) == len(path)
    short, long = trie.paths[trie.titles.index("Heat")], trie.paths[trie.titles.index('Heat" 2')]
    assert long[:len(short) - 1] == short[:-1]  # '"Heat"' is a token prefix of '"Heat" 2"'
    leaf, _ = trie.walk(short[:-1])
    assert leaf is None  # without its EOS it is not finished
    # Subtree ranges: the node after '"' holds every leaf.
    first = trie.children[0][short[0]]
    assert int(trie.subtree_end[0]) == trie.num_nodes
    assert {int(n) for n in trie.leaf_node} <= set(range(first, int(trie.subtree_end[first])))
    assert trie.max_depth == max(len(p) for p in trie.paths)


def test_training_tokenisation_splits_at_the_prompt_boundary(tiny_model_dir, tiny_qwen_dir):
    """Alpaca: prompt + response tokenise as one string exactly as apart, so both tries agree."""
    for path in (tiny_model_dir, tiny_qwen_dir):
        _, tok = load_model(path, precision="fp32", device="cpu")
        for title in TITLES:
            for row in rows():
                prompt = prompt_for_row({**row, "output": quote(title)})
                assert tok(prompt + quote(title))["input_ids"] == tok(prompt)["input_ids"] + response_ids(tok, title)[:-1]
        assert Trie.build(tok, TITLES, context="### Response:\n").paths == Trie.build(tok, TITLES).paths


def test_d3_prompt_end_is_no_token_boundary_for_gpt2_style_pretokenizers(tiny_model_dir):
    """D3's prompt ends in ": \n"; alone, " \n" is one token, before a quote it is two. D3 trains on
    the two parts tokenised apart (as the default trie does), so the in-context trie is refused."""
    _, tok = load_model(tiny_model_dir, precision="fp32", device="cpu")
    prompt = prompt_for_row(rows()[0], template="d3", category="movies")
    joined = tok(prompt + response_text(quote("Heat"), "d3"))["input_ids"]
    assert joined != tok(prompt)["input_ids"] + response_ids(tok, "Heat", "d3")[:-1]
    with pytest.raises(ValueError, match="token boundary"):
        Trie.build(tok, TITLES, template="d3", context="### Response: \n")


def test_every_beam_is_a_catalogue_title_with_all_its_ids(loaded):
    _, model, tok = loaded
    trie = Trie.build(tok, TITLES)
    stats: dict = {}
    out = constrained_generate(model, tok, [prompt_for_row(r) for r in rows()], trie, num_beams=4,
                               batch_size=2, stats=stats)
    assert len(out) == 3
    for beams in out:
        assert len(beams) == 4
        assert len({b.title for b in beams}) == 4
        scores = [b.score for b in beams]
        assert scores == sorted(scores, reverse=True)
        for b in beams:
            assert b.title in TITLES and b.item_ids == ids_of(b.title)
            assert b.text == quote(b.title)
            assert b.score == pytest.approx(b.logprob / b.length)  # length_penalty 1, no CF
    assert 0 < stats["processor_seconds"] < stats["generate_seconds"]


def test_beam_logprob_is_the_models_logprob_of_the_title(loaded):
    """The recorded score of a beam equals a teacher-forced pass over prompt + response."""
    _, model, tok = loaded
    trie = Trie.build(tok, TITLES)
    prompt = prompt_for_row(rows()[0])
    beams = constrained_generate(model, tok, [prompt], trie, num_beams=3, batch_size=1)[0]
    prompt_ids = tok(prompt)["input_ids"]
    for b in beams:
        resp = response_ids(tok, b.title)
        ids = torch.tensor([prompt_ids + resp])
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1:-1].float(), -1)
        expected = logp.gather(1, torch.tensor(resp)[:, None]).sum().item()
        assert b.logprob == pytest.approx(expected, abs=1e-3)
        assert b.length == len(resp)


def test_processors_of_the_models_generation_config_do_not_touch_the_scores(loaded):
    """A model whose generation config asks for a repetition penalty and a temperature: the beams
    and their recorded log-probabilities are those of the plain model."""
    _, model, tok = loaded
    trie = Trie.build(tok, TITLES)
    prompts = [prompt_for_row(r) for r in rows()[:2]]
    plain = constrained_generate(model, tok, prompts, trie, num_beams=3, batch_size=2)
    own = model.generation_config
    saved = (own.repetition_penalty, own.temperature, own.no_repeat_ngram_size)
    own.repetition_penalty, own.temperature, own.no_repeat_ngram_size = 5.0, 0.3, 2
    try:
        penalised = constrained_generate(model, tok, prompts, trie, num_beams=3, batch_size=2)
    finally:
        own.repetition_penalty, own.temperature, own.no_repeat_ngram_size = saved
    for a, b in zip(plain, penalised, strict=True):
        assert [x.title for x in a] == [x.title for x in b]
        assert [x.logprob for x in a] == pytest.approx([x.logprob for x in b], abs=1e-5)


def test_shared_prompt_cache_gives_the_same_beams_as_a_prefill_per_beam(loaded):
    _, model, tok = loaded
    trie = Trie.build(tok, TITLES)
    prompts = [prompt_for_row(r) for r in rows()]  # different lengths: left padding inside the batch
    shared = constrained_generate(model, tok, prompts, trie, num_beams=4, batch_size=3)
    plain = constrained_generate(model, tok, prompts, trie, num_beams=4, batch_size=3, share_prompt_cache=False)
    for a, b in zip(shared, plain, strict=True):
        assert [x.title for x in a] == [x.title for x in b]
        assert [x.logprob for x in a] == pytest.approx([x.logprob for x in b], abs=1e-4)


def test_more_beams_than_titles_returns_each_title_once(loaded):
    _, model, tok = loaded
    trie = Trie.build(tok, TITLES)
    out = constrained_generate(model, tok, [prompt_for_row(r) for r in rows()[:2]], trie, num_beams=50,
                               batch_size=2)
    for beams in out:
        assert sorted(b.title for b in beams) == DISTINCT  # capped at the 6 distinct titles


@pytest.mark.parametrize("target", [2, 3, 7, 6])
def test_cf_guidance_with_a_large_weight_puts_the_cf_best_item_first(loaded, target):
    _, model, tok = loaded
    trie = Trie.build(tok, TITLES)
    prompts = [prompt_for_row(r) for r in rows()]
    cf = torch.randn(len(prompts), len(TITLES), generator=torch.Generator().manual_seed(target))
    cf[:, target] = 20.0
    for correction in (False, True):
        out = constrained_generate(model, tok, prompts, trie, num_beams=3, batch_size=3, cf_scores=cf,
                                   cf_weight=50.0, length_correction=correction)
        for beams in out:
            assert beams[0].title == TITLES[target] and target in beams[0].item_ids
            assert beams[0].text == quote(TITLES[target])  # the prefix title "Heat" ends at its quote


def test_cf_scores_must_align_with_prompts_and_items(loaded):
    _, model, tok = loaded
    trie = Trie.build(tok, TITLES)
    with pytest.raises(ValueError, match="one row per prompt"):
        constrained_generate(model, tok, ["a"], trie, cf_scores=torch.zeros(2, len(TITLES)), cf_weight=1.0)


def test_length_correction_drops_near_certain_tokens_from_the_length(loaded):
    _, model, tok = loaded
    trie = Trie.build(tok, TITLES)
    prompts = [prompt_for_row(r) for r in rows()]
    plain = constrained_generate(model, tok, prompts, trie, num_beams=6, batch_size=3)
    # A threshold every token passes (p >= 1e-9) leaves nothing counted: the length becomes 1.
    lenient = constrained_generate(model, tok, prompts, trie, num_beams=6, batch_size=3, length_correction=True,
                                   ghost_threshold=1e-9)
    for p_beams, c_beams in zip(plain, lenient, strict=True):
        assert {b.title for b in p_beams} == {b.title for b in c_beams}
        for b in c_beams:
            assert b.counted_length == 0 and b.score == pytest.approx(b.logprob)
        assert [b.score for b in c_beams] == sorted((b.logprob for b in p_beams), reverse=True)
    # The default threshold (0.99) counts every token of an untrained random model.
    strict = constrained_generate(model, tok, prompts, trie, num_beams=6, batch_size=3, length_correction=True)
    for p_beams, s_beams in zip(plain, strict, strict=True):
        assert [(b.title, b.counted_length) for b in s_beams] == [(b.title, b.length) for b in p_beams]


def test_d3_template_generation_on_qwen2(tiny_qwen_dir):
    model, tok = load_model(tiny_qwen_dir, precision="fp32", device="cpu")
    trie = Trie.build(tok, TITLES, template="d3")
    for title, path in zip(trie.titles, trie.paths, strict=True):
        assert tok.decode(path[:-1]) == quote(title) + "\n" and path[-1] == tok.eos_token_id
    prompts = [prompt_for_row(r, template="d3", category="movies") for r in rows()]
    for beams in constrained_generate(model, tok, prompts, trie, num_beams=3, batch_size=3):
        assert [b.text for b in beams] == [quote(b.title) for b in beams]


def test_d3_prompt_word_for_word():
    row = instruction_row(DOMAINS["game"], ["Halo 3", "Portal 2"], "Braid")
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n"
        "### Instruction:\n"
        "Given a list of video games the user recetenly enjoy, please write a new video games that the user may bought\n"
        "### User Input: \n"
        'The user has palyed the following video gamess before: "Halo 3", "Portal 2"\n\n'
        "### Response: \n")
    assert d3_category("Video_Games") == "video games" and d3_category("CDs_and_Vinyl") == "musics"
    assert prompt_for_row(row, template="d3", category="video games") == expected
    assert prompt_for_row(row, with_output=True, template="d3", category="video games") == expected + '"Braid"\n'
    assert prompt_for_row({**row, "category": "video games"}, template="d3") == expected
    assert prompt_for_row(row) == prompt_for_row(row, template="alpaca")
    with pytest.raises(ValueError, match="category"):
        prompt_for_row(row, template="d3")
    with pytest.raises(ValueError, match="unknown prompt template"):
        prompt_for_row(row, template="chatml")


def test_rank_with_beams_puts_beams_first_then_the_rest_by_distance():
    dist = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7],
                         [2.0, 1.0, 3.0, 5.0, 4.0]])
    ranked = rank_with_beams([[4, 2, 2], []], dist)
    assert torch.argsort(ranked[0]).tolist() == [4, 2, 1, 3, 0]
    assert torch.equal(ranked[1], dist[1])  # no beams: the distance order
    assert ranked[0, [1, 3, 0]].tolist() == dist[0, [1, 3, 0]].tolist()  # the tail keeps its distances
    assert ranked[0, 4] < ranked[0, 2] < dist[0].min()
    with pytest.raises(ValueError, match="outside"):
        rank_with_beams([[5], []], dist)


def test_beam_item_lists_flatten_duplicate_ids_in_beam_order(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, precision="fp32", device="cpu")
    trie = Trie.build(tok, TITLES)
    cf = torch.zeros(1, len(TITLES))
    cf[0, 5] = 20.0  # "Heat", ids 2 and 5
    out = constrained_generate(model, tok, [prompt_for_row(rows()[0])], trie, num_beams=2, cf_scores=cf,
                               cf_weight=50.0)
    items = beam_item_lists(out)
    assert items[0][:2] == [2, 5] and len(items[0]) == sum(len(b.item_ids) for b in out[0])
    ranked = rank_with_beams(items, torch.rand(1, len(TITLES)))
    assert torch.argsort(ranked[0]).tolist()[:len(items[0])] == items[0]


def test_excluded_items_are_never_a_beam_and_only_for_their_row(loaded):
    """--exclude_history for constrained decoding: a per-row mask on the trie's final edges."""
    _, model, tok = loaded
    trie = Trie.build(tok, TITLES)
    prompts = [prompt_for_row(r) for r in rows()]
    before = constrained_generate(model, tok, prompts, trie, num_beams=3, batch_size=3)
    banned = [list(before[0][0].item_ids), [], list(before[2][0].item_ids) + list(before[2][1].item_ids)]
    after = constrained_generate(model, tok, prompts, trie, num_beams=3, batch_size=3, exclude_items=banned)
    for row, ids in zip(after, banned, strict=True):
        assert row and all(not set(b.item_ids) & set(ids) for b in row)
    assert [b.title for b in after[1]] == [b.title for b in before[1]]  # a row without exclusions is untouched
    assert after[0][0].title == before[0][1].title  # the next beam moves up


def test_a_prefix_only_excluded_titles_complete_is_never_entered(tiny_model_dir):
    """The mask covers each inner node whose every title below is excluded, no other node: checked
    against the titles' own paths."""
    _, tok = load_model(tiny_model_dir, precision="fp32", device="cpu")
    trie = Trie.build(tok, TITLES)
    excluded = [[1, 3, 7], [0, 4, 6, 1, 2, 3, 5], []]  # "Heat..." titles but "Heat"; all but "Heat 2"; none
    banned = banned_leaves(trie, excluded, "cpu")
    through: dict[int, set[int]] = {}  # node -> leaves whose path passes it
    for leaf, path in enumerate(trie.paths):
        node = 0
        for token in path:
            node = trie.children[node][token]
            through.setdefault(node, set()).add(leaf)
    for r, ids in enumerate(excluded):
        out = {int(trie.item_leaf[i]) for i in ids}
        want = {n for n, leaves in through.items() if leaves <= out}
        assert set(torch.nonzero(banned[r]).flatten().tolist()) == want


def test_excluding_all_titles_but_one_returns_that_title_to_every_row(loaded):
    """A beam led into a prefix only excluded titles complete had every token masked; with all
    its beams there a row came back empty (seen on Amazon, where histories hold long titles)."""
    _, model, tok = loaded
    trie = Trie.build(tok, TITLES)
    prompts = [prompt_for_row(r) for r in rows()]
    keep = TITLES.index("Heat 2")
    others = [i for i in range(len(TITLES)) if i != keep]
    out = constrained_generate(model, tok, prompts, trie, num_beams=3, batch_size=3,
                               exclude_items=[others] * len(prompts))
    assert [[b.title for b in row] for row in out] == [["Heat 2"]] * len(prompts)
