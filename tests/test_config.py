"""The swarm config: every shipped file loads, and mistakes name the dotted field."""

from pathlib import Path

import pytest

from swarm.config import ConfigError, SwarmConfig, adopt_shared, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_dir_has_the_required_files():
    assert {"tiny.yaml", "gpt2-small.yaml"} <= {path.name for path in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    config = load_config(path)
    assert isinstance(config, SwarmConfig)
    assert config.averaging.compression in ("blockwise8", "uniform8", "fp16", "none")
    assert "peer" not in config.shared()


def test_set_overrides_and_types(tmp_path):
    config = load_config(CONFIGS[0], ["averaging.compression=fp16", "peer.batch_size=3", "optimizer.lr=1e-4"])
    assert config.averaging.compression == "fp16"
    assert config.peer.batch_size == 3
    assert config.optimizer.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("override, words", [
    (["averaging.compresion=fp16"], ["unknown field averaging.compresion", "compression"]),
    (["averaging.compression=zip"], ["averaging.compression", "blockwise8"]),
    (["model.n_layer=lots"], ["model.n_layer", "integer"]),
    (["optimizer.lr=nan"], ["optimizer.lr"]),
    (["nonsense"], ["section.key=value"]),
])
def test_bad_overrides_name_the_field(override, words):
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS[0], override)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_broken_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_id: x\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match="broken YAML at line"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(not_mapping)


def test_joiner_may_change_peer_fields_but_not_shared_ones():
    shared = load_config(CONFIGS[0]).shared()
    mine = adopt_shared(shared, ["peer.batch_size=2", "averaging.compression=" + shared["averaging"]["compression"]])
    assert mine.peer.batch_size == 2
    assert mine.shared() == shared
    with pytest.raises(ConfigError, match="conflicts with the swarm's config"):
        adopt_shared(shared, ["optimizer.lr=0.5"])


def test_shared_part_round_trips_through_yaml():
    config = load_config(CONFIGS[0])
    again = adopt_shared(parse_overrides([]) | config.shared())
    assert again.fingerprint() == config.fingerprint()
