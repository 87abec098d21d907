"""Meshes from jax.make_mesh, and logical-axis rules from the config reaching the compiled step."""

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from lm import config as config_lib
from lm import parallel
from lm.models import transformer as T
from lm.train import OptimizerConfig, create_trainer
from ml_collections import config_flags

CONFIG = T.preset("llama", **T.TINY, num_kv_heads=2)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=1)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 8, 1), (-1, 2, 1)])
def test_mesh_is_jax_make_mesh(shape):
    mesh = parallel.make_mesh(shape)
    resolved = parallel.mesh_shape(shape, jax.device_count())
    assert (mesh.devices == jax.make_mesh(resolved, parallel.MESH_AXES).devices).all()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.axis_types == (AxisType.Auto,) * 3  # what the jit + NamedSharding steps expect


def test_mesh_on_given_devices():
    mesh = parallel.make_mesh((-1, 1, 1), jax.devices()[:2])
    assert mesh.devices.shape == (2, 1, 1) and set(mesh.devices.flat) == set(jax.devices()[:2])


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 1, 1), "uses 3 devices but there are 8"),
        ((3, -1, 1), "does not divide the 8 devices"),
        ((8, 1), "needs 3 sizes"),
        ((-1, -1, 1), "at most one -1"),
    ],
)
def test_bad_mesh_shape_is_a_clear_error(shape, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(shape)


def test_parse_rules():
    assert parallel.parse_rules("") == ()
    assert parallel.parse_rules("embed=fsdp, mlp=tensor,heads=None,vocab=data+tensor") == (
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", None),
        ("vocab", ("data", "tensor")),
    )
    rules = parallel.ParallelConfig(rules="mlp=none,experts=data").logical_rules
    assert dict(rules) == {**dict(parallel.DEFAULT_RULES), "mlp": None, "experts": "data"}
    assert [name for name, _ in rules][: len(parallel.DEFAULT_RULES)] == [
        n for n, _ in parallel.DEFAULT_RULES
    ]
    assert dict(parallel.DEFAULT_RULES)["layers"] is None


@pytest.mark.parametrize(
    "rules, message",
    [
        ("embed=fsdp,mlp=model", r"'mlp=model'.*\('data', 'fsdp', 'tensor'\)"),
        ("vocab=data+tensr", "'vocab=data\\+tensr'"),
        ("mlp=tensor+tensor", "'mlp=tensor\\+tensor'"),
        ("mlp", "'mlp' is not LOGICAL=AXES"),
        ("mlp=", "'mlp=' is not LOGICAL=AXES"),
        ("mlp=none,mlp=tensor", "sets 'mlp' twice"),
    ],
)
def test_bad_rules_are_a_clear_error(rules, message):
    with pytest.raises(ValueError, match=message):
        parallel.ParallelConfig(rules=rules)


def test_misspelt_logical_axis_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\['emebd'\] that no parameter carries"):
        create_trainer(
            CONFIG,
            T.build_model(CONFIG),
            OPT,
            10,
            parallel.ParallelConfig(mesh=(2, 1, 4), rules="emebd=tensor"),
        )


def _wi(tree):
    return tree["decoder"]["layers"]["block_0"]["mlp"]["wi_gate"]["kernel"]  # [layers, embed, mlp]


def test_rules_from_config_reach_the_compiled_step():
    default = create_trainer(
        CONFIG, T.build_model(CONFIG), OPT, 10, parallel.ParallelConfig(mesh=(2, 1, 4))
    )
    assert _wi(default.state_shardings.params).spec == P(None, "fsdp", "tensor")

    trainer = create_trainer(
        CONFIG,
        T.build_model(CONFIG),
        OPT,
        10,
        parallel.ParallelConfig(mesh=(2, 1, 4), rules="embed=tensor,mlp=none"),
    )
    batch = {
        k: jax.ShapeDtypeStruct(
            (8, 16),
            jnp.float32 if k == "weights" else jnp.int32,
            sharding=parallel.batch_sharding(trainer.mesh),
        )
        for k in ("inputs", "targets", "segment_ids", "positions", "weights")
    }
    compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    (state_in, _), _ = compiled.input_shardings
    state_out, _ = compiled.output_shardings
    want = NamedSharding(trainer.mesh, P(None, "tensor", None))
    for state in (state_in, state_out):
        assert _wi(state.params).is_equivalent_to(want, 3)
        assert _wi(state.opt_state[1][0].mu).is_equivalent_to(want, 3)  # Adam's moments follow
    assert not _wi(state_in.params).is_equivalent_to(_wi(default.state_shardings.params), 3)


def test_rules_pass_through_the_config_and_its_command_line():
    # As lm.main: an experiment ConfigDict, overridden by flags, resolved and built.
    argv = [
        "prog",
        "--config.parallel.rules=embed=none, vocab=data+tensor",
        "--config.parallel.mesh=(2,1,4)",
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict(
        "config", config_lib.experiment(), flag_values=flag_values, sys_argv=argv
    )
    flag_values(argv)
    par = config_lib.build(config_lib.resolve(flag_values.config)).parallel
    assert par.rules == "embed=none, vocab=data+tensor" and par.mesh == (2, 1, 4)
    rules = dict(par.logical_rules)
    assert (
        rules["embed"] is None and rules["vocab"] == ("data", "tensor") and rules["mlp"] == "tensor"
    )

    bad = config_lib.experiment(parallel={"rules": "mlp=model"})
    with pytest.raises(ValueError, match="'mlp=model'"):
        config_lib.build(config_lib.resolve(bad))
