"""`bigrec prepare` on small fixtures in each source's exact format."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest

from bigrec.cli import main
from bigrec.data.prompts import (
    AMAZON_CATEGORY_DOMAINS,
    D3_CATEGORIES,
    alpaca_prompt,
    domain_for_category,
    natural_title,
    normalize_title,
    prompt_for_row,
)
from data_fixtures import (
    write_amazon,
    write_d3,
    write_ml10m_archive,
    write_ml100k_official,
    write_recbole_sequences,
)

SPLITS = ("train", "valid", "test")


def prepare(tmp_path: Path, *args: str, out: str = "out") -> Path:
    target = tmp_path / out
    rc = main(["prepare", "--out", str(target), *args])
    assert rc == 0
    return target


def load_split(out: Path, split: str) -> tuple[pd.DataFrame, list[dict]]:
    return pd.read_csv(out / f"{split}.csv", dtype={"user_id": str}), json.loads((out / f"{split}.json").read_text())


def catalog(out: Path) -> list[str]:
    lines = (out / "id2name.txt").read_text().splitlines()
    ids = [int(line.split("\t")[1]) for line in lines]
    assert ids == list(range(len(lines)))
    return [line.split("\t")[0] for line in lines]


def check_invariants(out: Path) -> None:
    """Time order, no later example in an earlier split, counts add up, JSON matches CSV."""
    stats = json.loads((out / "stats.json").read_text())
    titles = catalog(out)
    last_time = None
    total = 0
    for split in SPLITS:
        frame, rows = load_split(out, split)
        assert len(frame) == len(rows) == stats["examples"][split]
        total += len(frame)
        times = frame["timestamp"].tolist()
        assert times == sorted(times)
        if times:
            if last_time is not None:
                assert times[0] >= last_time
            last_time = times[-1]
        for r, (rec, row) in enumerate(zip(frame.to_dict("records"), rows, strict=True)):
            assert row["row"] == r and row["user_id"] == rec["user_id"] and row["item_id"] == rec["item_id"]
            hist = ast.literal_eval(rec["history_item_id"])
            assert hist == row["history_item_id"]
            assert ast.literal_eval(rec["history_item_title"]) == [titles[i] for i in hist]
            assert rec["item_title"] == titles[rec["item_id"]]
            assert row["output"] == f'"{titles[rec["item_id"]]}"'
    assert total == sum(stats["examples"].values())


def test_ml100k_official_layout(tmp_path):
    src = write_ml100k_official(tmp_path)
    out = prepare(tmp_path, "--dataset", "ml-100k", "--source", str(src), "--split_ratios", "0.5,0.25,0.25")
    assert catalog(out) == ["Toy Story (1995)", "GoldenEye (1995)", "Usual Suspects, The (1995)",
                            "Misérables, Les (1995)", "Heat (1995)"]
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 5, 10)
    assert sum(stats["examples"].values()) == 7  # 10 interactions minus each user's first
    check_invariants(out)
    # User 2 rated items 3 and 1 at the same second: file order breaks the tie.
    rows = [r for s in SPLITS for r in load_split(out, s)[1] if r["user_id"] == "2"]
    assert [r["history_item_id"] for r in rows] == [[1], [1, 2], [1, 2, 0]]
    assert [r["item_id"] for r in rows] == [2, 0, 4]


def test_a_random_subset_of_users_in_every_split(tmp_path):
    """--users N keeps N users drawn with --seed, each with every example the whole data gave it, in
    the same splits; the catalogue stays whole; more users than the data holds is one line."""
    from common import write_small_movielens

    src = write_small_movielens(tmp_path)  # 40 users
    whole = prepare(tmp_path, "--dataset", "ml-100k", "--source", str(src))
    picked = [prepare(tmp_path, "--dataset", "ml-100k", "--source", str(src), "--users", "10", "--seed", str(seed),
                      out=f"users-{n}") for n, seed in enumerate((1, 1, 2))]

    def examples(out):
        return {split: [(r["user_id"], r["item_id"], tuple(r["history_item_id"])) for r in load_split(out, split)[1]]
                for split in SPLITS}

    everything = examples(whole)
    kept = [{u for rows in examples(out).values() for u, _, _ in rows} for out in picked]
    assert all(len(users) == 10 for users in kept) and kept[0] == kept[1] != kept[2]  # the seed decides
    for out, users in zip(picked, kept, strict=True):
        assert examples(out) == {s: [e for e in everything[s] if e[0] in users] for s in SPLITS}
        stats = json.loads((out / "stats.json").read_text())
        assert catalog(out) == catalog(whole) and stats["users"] == 10
        assert any("random subset of 10 of 40 users" in note for note in stats["notes"])
        check_invariants(out)
    rc = main(["prepare", "--out", str(tmp_path / "too-many"), "--dataset", "ml-100k", "--source", str(src),
               "--users", "41"])
    assert rc == 1 and not (tmp_path / "too-many").exists()


def test_prompt_text_matches_reference_template(tmp_path):
    out = prepare(tmp_path, "--dataset", "ml-100k", "--source", str(write_ml100k_official(tmp_path)))
    rows = [r for s in SPLITS for r in load_split(out, s)[1]]
    row = next(r for r in rows if r["user_id"] == "1" and r["item_id"] == 2)
    assert row["instruction"] == ("Given a list of movies the user has watched before, please recommend a new "
                                  "movie that the user likes to the user.")
    assert row["input"] == 'The user has watched the following movies before:"Toy Story (1995)", "GoldenEye (1995)"\n '
    assert row["output"] == '"Usual Suspects, The (1995)"'
    prompt = prompt_for_row(row)
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input that provides "
                             "further context. Write a response that appropriately completes the request. \n\n"
                             "### Instruction:\n")
    assert prompt.endswith("\n\n### Response:\n")
    assert prompt_for_row(row, with_output=True) == prompt + row["output"]
    assert alpaca_prompt("Do it.").endswith("### Instruction:\nDo it.\n\n### Response:\n")


def test_natural_prompt_titles_put_the_article_in_front_in_prompts_only(tmp_path):
    from bigrec.config import stage_settings
    from bigrec.data.catalog import read_catalog, row_target

    out = prepare(tmp_path, "--dataset", "ml-100k", "--source", str(write_ml100k_official(tmp_path)),
                  "--prompt_titles", "natural")
    csv, rows = load_split(out, "train")[0], [r for s in SPLITS for r in load_split(out, s)[1]]
    row = next(r for r in rows if r["user_id"] == "1" and r["item_id"] == 2)
    assert row["output"] == '"The Usual Suspects (1995)"'
    assert "Usual Suspects, The (1995)" in (out / "id2name.txt").read_text()  # the catalogue keeps its titles
    assert not any("Usual Suspects, The" in json.dumps(r) and "history_item_title" not in r for r in rows)
    catalog = read_catalog(out / "id2name.txt")
    assert row_target(row, catalog, "row") == 2  # the natural answer is the catalogue's item
    assert "item_title" in csv.columns
    from bigrec.stages.prepare import Config as PrepareConfig

    default = PrepareConfig(dataset="ml-100k", out="o")
    assert "prompt_titles" not in stage_settings(default)  # at its default: no stage key changes
    assert stage_settings(PrepareConfig(dataset="ml-100k", out="o", prompt_titles="natural"))["prompt_titles"] == \
        "natural"


def test_min_and_max_history(tmp_path):
    src = write_ml100k_official(tmp_path)
    out = prepare(tmp_path, "--dataset", "ml-100k", "--source", str(src), "--min_history", "2", "--max_history", "2",
                  "--split_ratios", "0.5,0.25,0.25")
    rows = [r for s in SPLITS for r in load_split(out, s)[1]]
    assert rows and all(len(r["history_item_id"]) == 2 for r in rows)
    assert len(rows) == 4  # users 1 and 2 have two targets with >= 2 earlier items; user 3 none


def test_ml10m_archive_latin1(tmp_path):
    out = prepare(tmp_path, "--dataset", "ml-10m", "--source", str(write_ml10m_archive(tmp_path)),
                  "--split_ratios", "0.34,0.33,0.33")
    assert catalog(out) == ["GoldenEye (1995)", "Misérables, Les (1995)", "Heat (1995)"]
    frame = pd.concat([load_split(out, s)[0] for s in SPLITS])
    assert sorted(frame["rating"].tolist()) == [3.0, 4.0, 4.5]
    check_invariants(out)


def test_amazon_d3_procedure(tmp_path):
    src = write_amazon(tmp_path)
    out = prepare(tmp_path, "--dataset", "amazon", "--source", str(src), "--start", "2018-01", "--end", "2018-11",
                  "--kcore", "3", "--split_ratios", "0.6,0.2,0.2")
    titles = catalog(out)
    # HTML entity unescaped, quotes stripped; HTML/long/empty titles dropped; A7 (1 review, 3-core) and
    # U9 (2010, outside the window) filtered.
    assert sorted(titles) == ["Halo & Friends", "Mario Kart", "Zelda"]
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (5, 3, 15)
    rows = [r for s in SPLITS for r in load_split(out, s)[1]]
    assert rows[0]["instruction"].startswith("Given a list of video games the user has played before")
    check_invariants(out)


def test_amazon_kcore_removes_everything(tmp_path, capsys):
    src = write_amazon(tmp_path)
    rc = main(["prepare", "--dataset", "amazon", "--source", str(src), "--kcore", "50", "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "no interactions left" in capsys.readouterr().err


def test_amazon_id_shuffle_is_seeded(tmp_path):
    src = write_amazon(tmp_path)
    a = catalog(prepare(tmp_path, "--dataset", "amazon", "--source", str(src), "--kcore", "3", out="a"))
    b = catalog(prepare(tmp_path, "--dataset", "amazon", "--source", str(src), "--kcore", "3", out="b"))
    assert a == b


def test_recbole_sequence_form(tmp_path):
    out = prepare(tmp_path, "--dataset", "recbole-atomic", "--source", str(write_recbole_sequences(tmp_path)),
                  "--domain", "game", "--split_ratios", "0.4,0.2,0.4")
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 4, 7)
    assert stats["duplicate_titles"]["titles"] == 1  # "Halo" has two ids
    assert catalog(out) == ["Halo", "Zelda", "Mario", "Halo"]
    check_invariants(out)


@pytest.mark.parametrize("variant", ["d3", "minionerec"])
def test_d3_layouts(tmp_path, variant):
    out = prepare(tmp_path, "--dataset", "d3", "--source", str(write_d3(tmp_path, variant)))
    assert catalog(out) == ["Drill", "Saw", "Glue", "Tape"]
    frames = {s: load_split(out, s)[0] for s in SPLITS}
    if variant == "d3":
        assert [len(frames[s]) for s in SPLITS] == [3, 3, 1]
        assert frames["test"]["item_asin"].tolist() == ["S2"]
        check_invariants(out)
    else:
        stats = json.loads((out / "stats.json").read_text())
        assert any("no train split" in n for n in stats["notes"])
        assert [len(frames[s]) for s in SPLITS] == [2, 1, 1]
    assert frames["test"]["item_title"].tolist() == ["Glue"]


def test_normalize_title():
    assert normalize_title('  "Halo &amp; Friends"  ') == "Halo & Friends"
    assert normalize_title("A  B") == "A B"
    assert normalize_title("'Quoted'") == "Quoted"


@pytest.mark.parametrize("title, natural", [
    ("Shining, The (1980)", "The Shining (1980)"), ("Haine, La (1995)", "La Haine (1995)"),
    ("Enfer, L' (1994)", "L'Enfer (1994)"), ("Crows and Sparrows, The", "The Crows and Sparrows"),
    ("Titanic (1997)", "Titanic (1997)"), ("Sunset, Boulevard (1950)", "Sunset, Boulevard (1950)"),
    ("Good, the Bad and the Ugly, The (1966)", "The Good, the Bad and the Ugly (1966)")])
def test_natural_title(title, natural):
    assert natural_title(title) == natural


# --- bad input -----------------------------------------------------------------------------------------


def test_missing_source_names_path(tmp_path, capsys):
    rc = main(["prepare", "--dataset", "ml-100k", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "nope" in capsys.readouterr().err


def test_unknown_dataset_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--dataset", "netflix", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "netflix" in capsys.readouterr().err


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    src = write_ml100k_official(tmp_path)
    with open(src / "u.data", "a") as f:
        f.write("7\t1\tfive\n")
    rc = main(["prepare", "--dataset", "ml-100k", "--source", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "u.data" in err and "line 11" in err


def test_missing_column_names_field(tmp_path, capsys):
    src = write_d3(tmp_path)
    frame = pd.read_csv(src / "test" / "Tools_5.csv").drop(columns=["user_id"])
    frame.to_csv(src / "test" / "Tools_5.csv", index=False)
    rc = main(["prepare", "--dataset", "d3", "--source", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "user_id" in err and "Tools_5.csv" in err


def test_malformed_json_line(tmp_path, capsys):
    src = write_amazon(tmp_path, gz=False)
    with open(src / "Video_Games_5.json", "a") as f:
        f.write("{not json\n")
    rc = main(["prepare", "--dataset", "amazon", "--source", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "Video_Games_5.json" in err and "line 33" in err


def test_no_user_with_enough_history(tmp_path, capsys):
    src = write_ml100k_official(tmp_path)
    rc = main(["prepare", "--dataset", "ml-100k", "--source", str(src), "--min_history", "9", "--max_history", "10",
               "--out", str(tmp_path / "o")])
    assert rc == 1 and "no example" in capsys.readouterr().err


def test_failed_run_leaves_output_untouched(tmp_path):
    src = write_ml100k_official(tmp_path)
    out = prepare(tmp_path, "--dataset", "ml-100k", "--source", str(src))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with open(src / "u.data", "a") as f:
        f.write("broken line\n")
    assert main(["prepare", "--dataset", "ml-100k", "--source", str(src), "--out", str(out)]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_config_file_and_unknown_key(tmp_path, capsys):
    src = write_ml100k_official(tmp_path)
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"dataset: ml-100k\nsource: {src}\nmax_history: 1\n")
    out = prepare(tmp_path, "--config", str(cfg), "--dataset", "ml-100k")
    assert all(len(r["history_item_id"]) == 1 for r in load_split(out, "train")[1])
    cfg.write_text("dataset: ml-100k\nmax_histroy: 1\n")
    assert main(["prepare", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 1
    assert "max_histroy" in capsys.readouterr().err


# --- real data (make test-slow) -------------------------------------------------------------------------

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.parametrize("dataset,users,items,interactions", [
    ("ml-100k", 943, 1682, 100_000), ("ml-1m", 6040, 3706, 1_000_209)])
def test_real_movielens(tmp_path, dataset, users, items, interactions):
    out = prepare(tmp_path, "--dataset", dataset)
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (users, items, interactions)
    assert len(json.loads((out / "test_5000.json").read_text())) == 5000


@pytest.mark.slow
def test_real_amazon_games(tmp_path):
    out = prepare(tmp_path, "--dataset", "recbole-atomic", "--source", str(SHARED / "amazon-games"))
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (50_546, 16_859, 440_264)


@pytest.mark.slow
def test_real_d3_industrial(tmp_path):
    out = prepare(tmp_path, "--dataset", "d3", "--source", str(SHARED / "amazon-industrial"))
    assert len(catalog(out)) == 3686
    assert json.loads((out / "stats.json").read_text())["examples"]["test"] == 4533



def test_official_archive_downloaded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """The online path, over a real HTTP server on loopback: the GroupLens zip is downloaded into
    the cache, read in place, and reused when the server is gone; an unreachable URL falls back."""
    import http.server
    import threading
    import zipfile

    from bigrec.data import movielens, sources

    folder = write_ml100k_official(tmp_path / "raw")
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "ml-100k.zip", "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"ml-100k/{f.name}")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(site))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("BIGREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(movielens.ARCHIVES, "ml-100k", f"{url}/ml-100k.zip")
    try:
        assert sources.download(f"{url}/missing.zip") is None  # a 404 is "not reachable", not a crash
        first = movielens.read_movielens("ml-100k")
    finally:
        server.shutdown()
        server.server_close()
    cached = tmp_path / "cache" / "downloads" / "ml-100k.zip"
    assert cached.read_bytes() == (site / "ml-100k.zip").read_bytes()
    assert not list(cached.parent.glob("*.tmp*"))
    again = movielens.read_movielens("ml-100k")  # the server is gone: the cached archive serves
    for got in (first, again):
        assert sorted(got.titles.values()) == sorted(["Toy Story (1995)", "GoldenEye (1995)",
                                                       "Usual Suspects, The (1995)", "Misérables, Les (1995)",
                                                       "Heat (1995)"])
        assert len(got.table) == 10 and got.source.endswith("ml-100k.zip")


@pytest.mark.parametrize("category", sorted({*D3_CATEGORIES, *AMAZON_CATEGORY_DOMAINS, "Industrial_and_Scientific",
                                             "Product", "Beauty_Products", "All_Beauty", ""}))
def test_category_wording_never_doubles_a_word(category):
    """Every category D3's table or ours knows reads as plain English in the prompt."""
    domain = domain_for_category(category)
    for text in (domain.instruction, domain.history_prefix):
        words = text.lower().replace(",", "").replace(".", "").replace(":", " ").split()
        assert all(a != b for a, b in zip(words, words[1:], strict=False)), text
        assert "products products" not in text and "product product" not in text
    assert domain_for_category("Office_Products").history_prefix == \
        "The user has bought the following office products before:"
    assert domain_for_category("Industrial_and_Scientific").singular == "industrial and scientific product"
