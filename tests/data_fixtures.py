"""Small raw datasets in the exact formats of the real sources, written by the tests."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path


def write_ml100k_official(root: Path) -> Path:
    """GroupLens ml-100k layout: ``u.data`` (tab) and ``u.item`` (``|``, latin-1)."""
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    ratings = [  # user item rating time
        (1, 1, 5, 100), (1, 2, 3, 200), (1, 3, 4, 300), (1, 4, 1, 400),
        (2, 2, 4, 150), (2, 3, 2, 250), (2, 1, 5, 250), (2, 5, 3, 500),
        (3, 5, 4, 50), (3, 4, 4, 600),
    ]
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    items = ["Toy Story (1995)", "GoldenEye (1995)", "Usual Suspects, The (1995)", "Misérables, Les (1995)",
             "Heat (1995)"]
    (folder / "u.item").write_bytes("".join(f"{n}|{t}|01-Jan-1995||http://x|0|1\n"
                                            for n, t in enumerate(items, start=1)).encode("latin-1"))
    return folder


def write_ml10m_archive(root: Path) -> Path:
    """Official ml-10m zip: ``ml-10M100K/ratings.dat`` and ``movies.dat``, ``::``, ISO-8859-1."""
    path = root / "ml-10m.zip"
    ratings = "1::10::5::1000\n1::20::4.5::1001\n1::30::3::1001\n2::20::2::900\n2::30::4::950\n"
    movies = "10::GoldenEye (1995)::Action\n20::Misérables, Les (1995)::Drama\n30::Heat (1995)::Crime\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ml-10M100K/ratings.dat", ratings.encode("latin-1"))
        z.writestr("ml-10M100K/movies.dat", movies.encode("latin-1"))
    return path


def write_amazon(root: Path, category: str = "Video_Games", gz: bool = True) -> Path:
    """Amazon 2018 JSON lines: ``<Category>_5.json.gz`` and ``meta_<Category>.json.gz``."""
    folder = root / "amazon"
    folder.mkdir(parents=True)
    meta = [
        {"asin": "A1", "title": "Halo &amp; Friends"},
        {"asin": "A2", "title": "\"Zelda\""},
        {"asin": "A3", "title": "Mario Kart"},
        {"asin": "A4", "title": "<span id='x'>Broken</span>"},
        {"asin": "A5", "title": " ".join(["word"] * 21)},
        {"asin": "A6", "title": ""},
        {"asin": "A7", "title": "Tetris"},
    ]
    reviews = []
    month = 1538352000  # 2018-10-01 UTC
    users = ["U1", "U2", "U3", "U4", "U5"]
    for n, user in enumerate(users):
        for k, asin in enumerate(["A1", "A2", "A3", "A4", "A5", "A6"]):
            reviews.append({"reviewerID": user, "asin": asin, "overall": 5.0 - k % 3,
                            "unixReviewTime": month + 86400 * (k + n)})
    reviews.append({"reviewerID": "U1", "asin": "A7", "overall": 4.0, "unixReviewTime": month + 10})  # A7: 1 review
    reviews.append({"reviewerID": "U9", "asin": "A1", "overall": 4.0, "unixReviewTime": 1262304000})  # 2010

    def dump(name: str, rows: list[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        (folder / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(text) if gz else text)

    dump(f"{category}_5.json", reviews)
    dump(f"meta_{category}.json", meta)
    return folder


def write_recbole_sequences(root: Path) -> Path:
    """RecBole sequence form, like ``Games-6k``: ``item_id_list`` per user, no timestamps."""
    folder = root / "games"
    folder.mkdir(parents=True)
    (folder / "G.item").write_text("item_id:token\ttitle:token_seq\n0\tHalo\n1\tZelda\n2\tMario\n3\tHalo\n")
    (folder / "G.test.inter").write_text(
        "user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 1 2\t3\n1\t2 1\t0\n")
    (folder / "G.valid.inter").write_text(
        "user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 1\t2\n1\t2\t1\n")
    return folder


D3_COLUMNS = ["user_id", "item_asins", "item_asin", "history_item_id", "item_id", "history_item_title",
              "item_title", "history_rating", "rating", "history_timestamp", "timestamp"]


def write_d3(root: Path, variant: str = "d3") -> Path:
    """D3 layout. ``variant='minionerec'``: sid/title/id info, no timestamps, no train split."""
    import csv

    folder = root / variant
    titles = ["Drill", "Saw", "Glue", "Tape"]
    (folder / "info").mkdir(parents=True)
    if variant == "d3":
        info = "".join(f"{t}\t{i}\n" for i, t in enumerate(titles))
    else:
        info = "".join(f"<a_{i}>\t{t}\t{i}\n" for i, t in enumerate(titles))
    (folder / "info" / "Tools_5.txt").write_text(info)
    rows = {
        "train": [("u1", [0], 1, [100], 110), ("u2", [1], 2, [105], 120), ("u1", [0, 1], 3, [100, 110], 130)],
        "valid": [("u2", [1, 2], 0, [105, 120], 140), ("u3", [3], 0, [50], 150), ("u3", [3, 0], 1, [50, 150], 155)],
        "test": [("u1", [0, 1, 3], 2, [100, 110, 130], 160)],
    }
    for split, items in rows.items():
        if variant != "d3" and split == "train":
            continue
        (folder / split).mkdir()
        with open(folder / split / "Tools_5.csv", "w", newline="") as f:
            w = csv.writer(f)
            if variant == "d3":
                w.writerow(D3_COLUMNS)
                for user, hist, item, htime, time in items:
                    w.writerow([user, [f"S{h}" for h in hist], f"S{item}", hist, item, [titles[h] for h in hist],
                                titles[item], [5.0] * len(hist), 4.0, htime, time])
            else:
                w.writerow(["user_id", "history_item_title", "item_title", "history_item_id", "item_id",
                            "history_item_sid", "item_sid"])
                for user, hist, item, _, _ in items:
                    w.writerow([user, [titles[h] for h in hist], titles[item], hist, item,
                                [f"<a_{h}>" for h in hist], f"<a_{item}>"])
    return folder
