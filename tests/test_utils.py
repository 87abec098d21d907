"""lm.utils: the one home of the small helpers every layer uses."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm import utils
from lm.utils import config_from_dict, count_params, gather_full, path_key, tree_differences


@dataclasses.dataclass(frozen=True)
class Section:
    steps: int = 1
    rate: float = 0.5
    name: str = "a"
    on: bool = False
    mesh: tuple = (1, 1)


def test_config_from_dict_checks_keys_and_types():
    config = config_from_dict(Section, {"steps": np.int64(3), "rate": 2, "mesh": (2, 4)}, "s")
    assert config == Section(steps=3, rate=2.0, mesh=(2, 4)) and isinstance(config.rate, float)
    with pytest.raises(ValueError, match=r"unknown key\(s\) s\.stepz; valid keys: mesh, name, on"):
        config_from_dict(Section, {"stepz": 3}, "s")
    for key, value, kind in [
        ("steps", 3.0, "an int"),
        ("steps", True, "an int"),
        ("rate", "0.1", "a number"),
        ("name", None, "a string"),
        ("on", 1, "a bool"),
    ]:
        with pytest.raises(ValueError, match=f"s.{key} must be {kind}"):
            config_from_dict(Section, {key: value}, "s")


def test_paths_counts_and_differences():
    a = {"dense": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}, "layers": [np.zeros(4)]}
    b = {
        "dense": {"kernel": jax.ShapeDtypeStruct((3, 3), np.float32)},
        "extra": np.zeros(1, np.int32),
        "layers": [np.zeros(4)],
    }
    keys = [path_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
    assert keys == ["dense/bias", "dense/kernel", "layers/0"]
    assert count_params(a) == 6 + 3 + 4 and count_params(b) == 9 + 1 + 4
    assert tree_differences(a, b) == [
        ("dense/bias", (3,), None),
        ("dense/kernel", (2, 3), (3, 3)),
        ("extra", None, (1,)),
    ]
    same_shapes = {"dense": {"kernel": np.zeros((3, 3), np.float64)}}
    assert tree_differences(same_shapes, {"dense": {"kernel": b["dense"]["kernel"]}}) == []
    assert tree_differences(
        same_shapes, {"dense": {"kernel": b["dense"]["kernel"]}}, dtypes=True
    ) == [("dense/kernel", ((3, 3), "float64"), ((3, 3), "float32"))]


def test_gather_full_is_the_tree_itself_on_one_process():
    tree = {"w": jax.numpy.ones((8, 2))}
    assert gather_full(tree) is tree


CACHE_PROBE = """
import sys
import jax
import jax.numpy as jnp
from jax import monitoring
from lm.utils import enable_compilation_cache

hits = []
monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event.endswith("cache_hits") else None
)
print(enable_compilation_cache(sys.argv[1]))
jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.0)(jnp.ones((64, 64))).block_until_ready()
print(len(hits))
"""


def test_compilation_cache_serves_a_second_process(tmp_path):
    """The first process compiles and writes the cache; a second one loads the program from it
    (a cache hit); 'off' leaves the cache alone."""

    def probe(directory):
        out = subprocess.run(
            [sys.executable, "-c", CACHE_PROBE, directory],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
        ).stdout.split()
        return out[0], int(out[1])

    cache = tmp_path / "cache"
    assert probe(str(cache)) == (str(cache), 0)
    assert any(cache.iterdir())
    directory, hits = probe(str(cache))
    assert directory == str(cache) and hits >= 1  # the jitted function (and jnp.ones's program)
    assert probe("off") == ("None", 0)


def test_default_compilation_cache(monkeypatch):
    monkeypatch.delenv("LM_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("LM_CACHE_DIR", "/data/lm")
    assert utils.default_compilation_cache() == "/data/lm/jax"
    monkeypatch.setenv("LM_COMPILATION_CACHE", "off")
    assert utils.default_compilation_cache() == "off"


def test_first_argmax_is_jnp_argmax():
    """Ties go to the first index, a NaN row to its first NaN, -inf rows to 0, as jnp.argmax."""
    from lm.utils import first_argmax

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (64, 37)).astype(np.float32)  # many ties
    x[3, 5] = np.nan
    x[3, 9] = np.nan
    x[7] = -np.inf
    x[8, 30] = np.inf
    got = np.asarray(first_argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert got[3] == 5 and got[7] == 0 and got[8] == 30
    assert got.dtype == np.int32


def test_lazy_array_reads_only_the_blocks_asked_for():
    full = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    reads = []

    def read(index):
        reads.append(index)
        return full[index]

    x = utils.LazyArray(full.shape, full.dtype, read)
    np.testing.assert_array_equal(x[1:3, ::2], full[1:3, ::2])
    assert reads == [(slice(1, 3, 1), slice(0, 6, 2), slice(0, 5, 1))]
    stacked = utils.LazyArray.stack([x.take(3), x.take(0), x.take(2)]).astype(np.float16)
    reads.clear()
    block = stacked[1:, 2:4]
    np.testing.assert_array_equal(block, full[[0, 2], 2:4].astype(np.float16))
    assert block.dtype == np.float16 and len(reads) == 2  # one read per stacked part covered
    np.testing.assert_array_equal(np.asarray(stacked), full[[3, 0, 2]])
    assert stacked.shape == (3, 6, 5) and stacked.nbytes == 3 * 6 * 5 * 2
    with pytest.raises(TypeError, match="slices only"):
        x[0]
