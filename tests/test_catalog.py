import pytest

from bigrec.data.catalog import CatalogError, UnknownTargetError, read_catalog, row_target


def write(tmp_path, text, name="id2name.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_titles_duplicates_and_hash(tmp_path):
    path = write(tmp_path, 'Toy Story (1995)\t0\n"Heat (1995)"\t1\n\nToy Story (1995)\t2\n')
    cat = read_catalog(path)
    assert cat.titles == ["Toy Story (1995)", "Heat (1995)", "Toy Story (1995)"]
    assert cat.ids_for('"Toy Story (1995)"') == [0, 2]
    assert cat.ids_for("Nope") == []
    assert cat.is_title(" Heat (1995) ")
    # the hash follows the normalised content, not quoting or blank lines
    same = read_catalog(write(tmp_path, "Toy Story (1995)\t0\nHeat (1995)\t1\nToy Story (1995)\t2", "b.txt"))
    assert same.digest == cat.digest
    other = read_catalog(write(tmp_path, "Toy Story (1995)\t0\nHeat (1996)\t1\nToy Story (1995)\t2", "c.txt"))
    assert other.digest != cat.digest


def test_history_titles_are_every_id_of_a_history_title(tmp_path):
    """What leaving the history out leaves out: each history item's title, under every id it has."""
    cat = read_catalog(write(tmp_path, "Toy Story (1995)\t0\nHeat (1995)\t1\nToy Story (1995)\t2\nBabe (1995)\t3\n"))
    assert cat.history_titles([2]) == [0, 2]
    assert cat.history_titles([1, 0, 1]) == [0, 1, 2]
    assert cat.history_titles([]) == [] and cat.history_titles([3]) == [3]


def test_ids_may_come_in_any_line_order(tmp_path):
    cat = read_catalog(write(tmp_path, "B\t1\nA\t0\n"))
    assert cat.titles == ["A", "B"]


@pytest.mark.parametrize("text, message", [
    ("A\t0\nB 1\n", "line 2: expected 'title<TAB>id'"),
    ("A\t0\nB\tx\n", "line 2: item id 'x' is not an integer"),
    ("A\t0\nB\t0\n", "line 2: item id 0 already given on line 1"),
    ("A\t0\nB\t2\n", "line 2: item id 2 is out of order; ids must be 0..1 and id 1 is missing"),
    ('A\t0\n""\t1\n', "line 2: empty title"),
    ("\n\n", "the catalogue is empty"),
])
def test_malformed_catalogue_names_file_and_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(CatalogError, match=message) as info:
        read_catalog(path)
    assert str(path) in str(info.value)


def test_missing_catalogue(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalogue not found"):
        read_catalog(tmp_path / "none.txt")


def test_row_target_by_id_or_title(tmp_path):
    cat = read_catalog(write(tmp_path, "A\t0\nB\t1\nA\t2\n"))
    assert row_target({"output": '"B"', "item_id": 1}, cat, "f.json row 0") == 1
    assert row_target({"output": '"A"', "item_id": 2}, cat, "f.json row 0") == 2
    assert row_target({"output": '"A"'}, cat, "f.json row 0") == 0  # reference rows: by title
    with pytest.raises(UnknownTargetError, match=r"f.json row 3: target title '\"C\"' is not in"):
        row_target({"output": '"C"'}, cat, "f.json row 3")
    with pytest.raises(CatalogError, match="f.json row 4: field 'item_id' = 7 is not an id"):
        row_target({"output": '"A"', "item_id": 7}, cat, "f.json row 4")
    with pytest.raises(CatalogError, match="'item_id' 1 is 'B'.*but 'output' is"):
        row_target({"output": '"A"', "item_id": 1}, cat, "f.json row 5")
    with pytest.raises(CatalogError, match="no 'item_id' and no 'output'"):
        row_target({"instruction": "x"}, cat, "f.json row 6")


def test_catalogue_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "id2name.txt"
    path.write_bytes(b"A\t0\nCaf\xe9\t1\n")  # Latin-1
    with pytest.raises(CatalogError, match=r"id2name.txt, line 2: not UTF-8 text") as info:
        read_catalog(path)
    assert str(path) in str(info.value)
