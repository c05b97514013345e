"""``bigrec package``: a ``bigrec train`` output served as it was trained.

Tiny real models trained by ``bigrec.stages.train.run`` on tiny prepared data (an ml-100k-format
source, and a D3-format category whose prompts say "office products"), in the window layout with
LoRA and the timeline layout fully fine-tuned, are packaged, and the served recommender must build
the training layout's prompt for every test row byte for byte and, ranking by likelihood with the
same search budget, return the top 10 that ``bigrec generate --decoding likelihood`` and the
evaluation's ranking produced wherever that top 10 is certified exact.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from bigrec.app.recommender import Recommender
from bigrec.app.run_manifest import MANIFEST, RunManifest, domain_value, prepared_domain
from bigrec.cli import main
from bigrec.config import build
from bigrec.data.catalog import read_catalog
from bigrec.data.prompts import (
    AMAZON_CATEGORY_DOMAINS,
    D3_CATEGORIES,
    DOMAINS,
    domain_for_category,
    domain_for_plural,
)
from bigrec.evaluation.results import read_results
from bigrec.grounding.ranking import rank_with_beams
from bigrec.llm.decoders import layout_of
from bigrec.stages import generate, package, train
from data_fixtures import D3_COLUMNS, write_amazon
from run_fixture import TITLES, write_raw
from tiny import make_tiny_model

MAX_ROWS = 50  # test rows compared per run (the fixtures hold fewer)
SEARCH_NODES = 3072  # likelihood search budget, in generate and in run.yaml alike

OFFICE = ["Stapler, Heavy Duty", "Paper Clips (100)", "Sticky Notes, Yellow", "Ballpoint Pens, Blue (12)",
          "Desk Organizer", "Printer Paper, A4", "Highlighters (6)", "Binder Clips, Large", "Scissors, 8 Inch",
          "Tape Dispenser", "Whiteboard Markers (4)", "File Folders, Letter", "Envelopes, White (50)",
          "Calculator, Solar", "Rubber Bands", "Index Cards (100)", "Label Maker", "Paper Shredder",
          "Notebook, College Ruled", "Correction Tape"]


def write_office_d3(root: Path) -> Path:
    """A D3-layout source of the Office_Products category: info/, train/, valid/, test/ CSVs with
    timestamps, each user's last row in test and the one before it in valid."""
    folder = root / "office"
    (folder / "info").mkdir(parents=True)
    (folder / "info" / "Office_Products_5.txt").write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(OFFICE)))
    rows: dict[str, list] = {"train": [], "valid": [], "test": []}
    for user in range(12):
        seq = [(user * 5 + step * (1 + user % 3)) % len(OFFICE) for step in range(6 + user % 3)]
        times = [1000 * step + user for step in range(len(seq))]
        for p in range(1, len(seq)):
            split = "test" if p == len(seq) - 1 else "valid" if p == len(seq) - 2 else "train"
            hist = seq[max(0, p - 10):p]
            rows[split].append([f"u{user}", [f"S{h}" for h in hist], f"S{seq[p]}", hist, seq[p],
                                [OFFICE[h] for h in hist], OFFICE[seq[p]], [5.0] * len(hist), 4.0,
                                times[max(0, p - 10):p], times[p]])
    for split, found in rows.items():
        (folder / split).mkdir()
        with open(folder / split / "Office_Products_5.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(D3_COLUMNS)
            writer.writerows(found)
    return folder


def prepare(root: Path, dataset: str, layout: str) -> Path:
    out = root / f"data-{dataset}-{layout}"
    if dataset == "ml-100k":
        args = ["--dataset", "ml-100k", "--source", str(write_raw(root / f"raw-{layout}", TITLES)),
                "--prompt_titles", "natural"]  # "Usual Suspects, The (1995)" is prompted as "The Usual ..."
    else:
        args = ["--dataset", "d3", "--source", str(write_office_d3(root / f"raw-{layout}"))]
    assert main(["prepare", *args, "--layout", layout, "--out", str(out)]) == 0
    return out


def trained_model(root: Path, data: Path, layout: str, lora: bool, titles: list[str]) -> tuple[Path, Path]:
    """(the base model, the train output folder): a few steps of bigrec train on the prepared rows."""
    base = Path(make_tiny_model(root / "base", "llama", texts=titles))
    out = root / "trained"
    train.run(train.Config(base_model=str(base), train_data_path=[str(data / "train.json")], output_dir=str(out),
                           layout=layout, lora=lora, batch_size=4, micro_batch_size=4, num_epochs=1, max_steps=3,
                           learning_rate=1e-2, warmup_steps=0, cutoff_len=512, precision="fp32", save_steps=1000,
                           early_stopping_patience=0))
    return base, out


CASES = {  # (dataset, layout, LoRA)
    "ml100k-window-lora": ("ml-100k", "window", True),
    "ml100k-timeline-full": ("ml-100k", "timeline", False),
    "office-window-lora": ("d3", "window", True),
    "office-timeline-full": ("d3", "timeline", False),
}


@pytest.fixture(scope="module", params=list(CASES))
def packaged(request, tmp_path_factory):
    dataset, layout, lora = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    data = prepare(root, dataset, layout)
    base, trained = trained_model(root, data, layout, lora, TITLES if dataset == "ml-100k" else OFFICE)
    served = root / "runs" / "served"
    assert main(["package", "--train_dir", str(trained), "--data", str(data), "--out", str(served),
                 "--decoding", "likelihood", "--search_nodes", str(SEARCH_NODES)]) == 0
    return dict(dataset=dataset, layout=layout, lora=lora, data=data, base=base, trained=trained, served=served,
                root=root)


def test_run_yaml_records_the_trained_model_and_the_prepared_wording(packaged):
    manifest = RunManifest.load(packaged["served"])
    served = packaged["served"]
    assert manifest.layout == packaged["layout"] and manifest.precision == "fp32"
    assert manifest.decoding == "likelihood" and manifest.search_nodes == SEARCH_NODES
    model = packaged["base"] if packaged["lora"] else packaged["trained"]
    assert (served / manifest.base_model).resolve() == model.resolve()
    assert manifest.adapter is None if not packaged["lora"] else (served / manifest.adapter).resolve() == \
        packaged["trained"].resolve()
    assert not Path(manifest.base_model).is_absolute() and not Path(manifest.data).is_absolute()
    assert manifest.path(served, "catalog") == (packaged["data"] / "id2name.txt").resolve()
    assert (served / manifest.index).is_file()
    index_record = yaml.safe_load((served / "index.config.yaml").read_text())
    assert index_record["output"] == str(served / "index.safetensors") and index_record["precision"] == "fp32"
    if packaged["dataset"] == "ml-100k":
        assert manifest.domain == "movie" and manifest.prompt_titles == "natural"
    else:  # the category's own wording, not the generic "products"
        assert manifest.domain == {"plural": "office products", "singular": "office product", "verb": "bought"}
        assert manifest.prompt_titles == "catalogue"


def test_served_prompts_and_likelihood_top10_are_the_evaluated_ones(packaged, tmp_path):
    data, served = packaged["data"], packaged["served"]
    result = tmp_path / "test.json"
    gen_cfg = build(generate.Config, dict(
        test_data_path=str(data / "test.json"), result_json_data=str(result), limit=MAX_ROWS, precision="fp32",
        base_model=str(packaged["base"] if packaged["lora"] else packaged["trained"]),
        lora_weights=str(packaged["trained"]) if packaged["lora"] else None, decoding="likelihood",
        search_nodes=SEARCH_NODES, layout=packaged["layout"], batch_size=4))
    generate.run(gen_cfg)
    catalog = read_catalog(data / "id2name.txt")
    results = read_results(result, catalog)
    rows = results.rows
    assert 0 < len(rows) <= MAX_ROWS
    # the evaluation's ranking of a likelihood row: its ranked titles' items first, in order
    ranking = rank_with_beams(results.first, torch.zeros(len(rows), len(catalog)))
    evaluated = torch.argsort(ranking, dim=1, stable=True)[:, :10].tolist()

    rec = Recommender.from_run(served, device="cpu")
    layout = layout_of(gen_cfg)
    wording = "office products" if packaged["dataset"] == "d3" else "movies"
    for row in rows:
        matches = rec.match([row["history_item_id"]])[0]
        assert [m.id for m in matches] == row["history_item_id"]
        served_prompt = rec.prompt([m.title for m in matches])
        assert served_prompt == layout.prompt(row), (served_prompt, layout.prompt(row))
        assert wording in served_prompt
    answers = rec.recommend([row["history_item_id"] for row in rows], k=10)
    certified = [r for r, row in enumerate(rows) if row["predict_certified"] >= min(10, len(row["predict"]))]
    assert certified, "no certified row to compare"
    for r in certified:
        assert [item.id for item in answers[r].items] == evaluated[r], r
    assert all(a.decoding == "likelihood" for a in answers)


def test_packaging_again_reuses_a_matching_index_and_rebuilds_another(packaged, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(packaged["served"], again)
    index = (again / "index.safetensors").read_bytes()
    args = ["package", "--train_dir", str(packaged["trained"]), "--data", str(packaged["data"]), "--out", str(again)]
    assert main(args) == 0
    manifest = RunManifest.load(again)
    assert manifest.decoding == "free" and (again / "index.safetensors").read_bytes() == index
    assert (again / manifest.data).resolve() == packaged["data"].resolve()  # relative to the new folder
    assert main([*args, "--pooling", "mean"]) == 0  # another grounding: the index is made again
    assert RunManifest.load(again).pooling == "mean" and (again / "index.safetensors").read_bytes() != index


# --- refusals: one line naming the file or field; nothing half-written --------------------------------

def fake_train_dir(root: Path, model_dir: Path, **record_changes) -> Path:
    """A full fine-tune's output folder made by hand: the model's files and a train record."""
    out = root / "fake-train"
    shutil.copytree(model_dir, out)
    record = {"stage": "train", "config": {"base_model": str(model_dir), "lora": False, "layout": "window",
                                           "precision": "fp32", "train_data_path": []},
              "status": "done", **record_changes}
    (out / "config.yaml").write_text(yaml.safe_dump(record))
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small-data")
    return prepare(root, "ml-100k", "window")


def test_unfinished_training_and_a_layout_mismatch_are_refused_naming_the_field(small_data, tiny_model_dir,
                                                                                  tmp_path, capsys):
    out = tmp_path / "served"
    unfinished = fake_train_dir(tmp_path / "a", Path(tiny_model_dir), status="training")
    assert main(["package", "--train_dir", str(unfinished), "--data", str(small_data), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigrec package: error: ") and "internal error" not in err  # the input's fault
    assert len(err.splitlines()) == 1 and f"{unfinished / 'config.yaml'}: status 'training'" in err
    timeline = fake_train_dir(tmp_path / "b", Path(tiny_model_dir))
    record = yaml.safe_load((timeline / "config.yaml").read_text())
    record["config"]["layout"] = "timeline"
    (timeline / "config.yaml").write_text(yaml.safe_dump(record))
    assert main(["package", "--train_dir", str(timeline), "--data", str(small_data), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigrec package: error: ") and "internal error" not in err
    assert len(err.splitlines()) == 1 and "config.layout 'timeline'" in err and "'window'" in err
    (timeline / "config.yaml").write_text("stage: train\nconfig: {lora: false\n")  # not valid YAML
    assert main(["package", "--train_dir", str(timeline), "--data", str(small_data), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bigrec package: error: {timeline / 'config.yaml'}: not valid YAML: line ")
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_a_lora_on_other_base_weights_or_a_lost_base_is_refused(small_data, tiny_model_dir, tiny_qwen_dir, tmp_path,
                                                                 capsys):
    from bigrec.llm.models import model_fingerprint

    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    record = {"stage": "train", "status": "done", "base_model": model_fingerprint(tiny_model_dir),
              "config": {"base_model": str(tmp_path / "gone"), "lora": True, "layout": "window", "precision": "fp32"}}
    record["base_model"]["resolved"] = str(tmp_path / "gone-too")  # neither recorded path is there
    (adapter / "config.yaml").write_text(yaml.safe_dump(record))
    args = ["package", "--train_dir", str(adapter), "--data", str(small_data), "--out", str(tmp_path / "served")]
    assert main(args) == 1
    assert "config.base_model" in capsys.readouterr().err and not (tmp_path / "served").exists()
    assert main([*args, "--base_model", tiny_qwen_dir]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "base_model.sha256" in err and "other weights" in err
    assert "internal error" not in err


def test_a_failure_while_writing_leaves_the_old_run_folder_as_it_was(small_data, tiny_model_dir, tmp_path):
    out = tmp_path / "served"
    out.mkdir()
    (out / MANIFEST).write_text("base_model: old\n")
    broken = fake_train_dir(tmp_path, Path(tiny_model_dir))
    (broken / "model.safetensors").unlink()  # the model cannot load: the index build fails inside the stage
    with pytest.raises(Exception):  # noqa: B017 (whatever transformers raises for a folder without weights)
        package.run(package.Config(train_dir=str(broken), data=str(small_data), out=str(out)))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST] and (out / MANIFEST).read_text() == "base_model: old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-train", "served"]  # no staging folder left


def test_an_output_folder_that_is_not_a_run_folder_or_holds_the_inputs_is_refused(small_data, tiny_model_dir,
                                                                                     tmp_path, capsys):
    trained = fake_train_dir(tmp_path, Path(tiny_model_dir))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for out in (other, tmp_path):
        assert main(["package", "--train_dir", str(trained), "--data", str(small_data), "--out", str(out)]) == 1
        assert "--out" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine" and (trained / "config.yaml").is_file()


# --- the wording: what prepare used, in run.yaml -------------------------------------------------------

@pytest.mark.parametrize("category", sorted({*D3_CATEGORIES, *AMAZON_CATEGORY_DOMAINS, "Office_Products",
                                             "Industrial_and_Scientific", "Products"}))
def test_the_recorded_plural_gives_back_the_wording_prepare_built(category):
    for domain in (*DOMAINS.values(), domain_for_category(category)):
        assert domain_for_plural(domain.plural) == domain


def test_prepared_domain_reads_the_prepared_folders_record_and_checks_its_rows(tmp_path):
    out = tmp_path / "office"
    assert main(["prepare", "--dataset", "amazon", "--source", str(write_amazon(tmp_path, "Office_Products")),
                 "--category", "Office_Products", "--kcore", "0", "--out", str(out)]) == 0
    domain = prepared_domain(out)
    assert domain == domain_for_category("Office_Products") and domain.plural == "office products"
    assert domain_value(domain) == {"plural": "office products", "singular": "office product", "verb": "bought"}
    record = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**record, "domain_wording": "video games"}))
    with pytest.raises(ValueError, match="test_5000.json: its rows' instruction"):
        prepared_domain(out)  # a record that does not say what the rows say


def test_run_yaml_takes_a_name_or_the_words_and_refuses_anything_else(tmp_path):
    words = {"plural": "office products", "singular": "office product", "verb": "bought"}
    RunManifest(base_model="m", domain=words).save(tmp_path)
    loaded = RunManifest.load(tmp_path)
    assert loaded.domain == words and loaded.wording() == domain_for_category("Office_Products")
    assert RunManifest(base_model="m", domain="game").wording() == DOMAINS["game"]
    for bad in ("office", {"plural": "x", "singular": "y"}, {**words, "verb": ""}):
        (tmp_path / MANIFEST).write_text(yaml.safe_dump({"base_model": "m", "domain": bad}))
        with pytest.raises(ValueError, match=f"{tmp_path / MANIFEST}: .*domain"):
            RunManifest.load(tmp_path)
