"""The item catalogue (``id2name.txt``): titles by id, ids by title, and a content hash.

Grounding ranks every catalogue item, so the catalogue must be exactly the one the data was
prepared with: ids ``0..N-1``, each once. The hash ties an embedding index to the titles it
embedded. Several ids may share one title; a target's rank is the best among them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bigrec.data.prompts import natural_title, normalize_title
from bigrec.io import InputError


class UnknownTargetError(InputError):
    """A row's target title is not in the catalogue (evaluation counts and skips such rows)."""


class CatalogError(InputError):
    """The catalogue file, or a row's target, is wrong; the message names file and line or row."""


@dataclass(frozen=True)
class Catalog:
    path: Path
    titles: list[str]  # titles[item_id]
    ids_by_title: dict[str, list[int]] = field(repr=False)
    digest: str  # sha256 of the normalised "id<TAB>title" lines in id order

    def __len__(self) -> int:
        return len(self.titles)

    def ids_for(self, title: str) -> list[int]:
        """Catalogue ids whose title equals ``title`` after normalisation (empty if none)."""
        return self.ids_by_title.get(normalize_title(title), [])

    def is_title(self, text: str) -> bool:
        return normalize_title(text) in self.ids_by_title

    def history_titles(self, history: Sequence[int]) -> list[int]:
        """Every id sharing a title with an item of ``history`` (ids), sorted: what leaving a row's
        history out leaves out, in every decoder, the service and its baselines alike (the
        model writes titles, so an item whose title it would copy is a copy, whatever its id)."""
        n = len(self.titles)
        return sorted({i for h in history if 0 <= int(h) < n for i in self.ids_for(self.titles[int(h)])})


def catalog_hash(titles: Sequence[str]) -> str:
    h = hashlib.sha256()
    for item_id, title in enumerate(titles):
        h.update(f"{item_id}\t{title}\n".encode())
    return h.hexdigest()


def read_catalog(path: str | Path) -> Catalog:
    """Read ``title<TAB>id`` lines; blank lines are skipped, anything else malformed is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"catalogue not found: {path}")
    by_id: dict[int, tuple[str, int]] = {}  # id -> (title, line number)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        lineno = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise CatalogError(f"{path}, line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if "\t" not in line:
            raise CatalogError(f"{path}, line {lineno}: expected 'title<TAB>id', found no tab")
        raw_title, raw_id = line.rsplit("\t", 1)
        try:
            item_id = int(raw_id.strip())
        except ValueError:
            raise CatalogError(f"{path}, line {lineno}: item id {raw_id!r} is not an integer") from None
        title = normalize_title(raw_title)
        if not title:
            raise CatalogError(f"{path}, line {lineno}: empty title for item {item_id}")
        if item_id in by_id:
            raise CatalogError(f"{path}, line {lineno}: item id {item_id} already given on line "
                               f"{by_id[item_id][1]}")
        by_id[item_id] = (title, lineno)
    if not by_id:
        raise CatalogError(f"{path}: the catalogue is empty")
    n = len(by_id)
    bad = sorted(i for i in by_id if not 0 <= i < n)
    if bad:
        missing = min(set(range(n)) - set(by_id))
        raise CatalogError(f"{path}, line {by_id[bad[0]][1]}: item id {bad[0]} is out of order; ids must be "
                           f"0..{n - 1} and id {missing} is missing")
    titles = [by_id[i][0] for i in range(n)]
    ids_by_title: dict[str, list[int]] = {}
    for item_id, title in enumerate(titles):
        ids_by_title.setdefault(title, []).append(item_id)
    return Catalog(path=path, titles=titles, ids_by_title=ids_by_title, digest=catalog_hash(titles))


def row_target(row: dict, catalog: Catalog, where: str) -> int:
    """The target item id of an instruction row.

    Prepared rows carry ``item_id``; reference rows only ``output``, whose title is looked up
    (the first id with that title: ranks use every id sharing it anyway). ``where`` names the
    file and row for errors.
    """
    output = row.get("output")
    if "item_id" in row and row["item_id"] is not None:
        item_id = row["item_id"]
        if isinstance(item_id, bool) or not isinstance(item_id, int) or not 0 <= item_id < len(catalog):
            raise CatalogError(f"{where}: field 'item_id' = {item_id!r} is not an id of {catalog.path} "
                               f"(0..{len(catalog) - 1})")
        if isinstance(output, str) and normalize_title(output) not in (catalog.titles[item_id],
                                                                      natural_title(catalog.titles[item_id])):
            raise CatalogError(f"{where}: 'item_id' {item_id} is {catalog.titles[item_id]!r} in {catalog.path} "
                               f"but 'output' is {output!r}; is this the catalogue the data was prepared with?")
        return item_id
    if not isinstance(output, str):
        raise CatalogError(f"{where}: no 'item_id' and no 'output' title to find the target by")
    ids = catalog.ids_for(output)
    if not ids:
        raise UnknownTargetError(f"{where}: target title {output!r} is not in {catalog.path}")
    return ids[0]
