"""hydraulis.config: presets, YAML/TOML/JSON files, validation messages."""

import json

import pytest

from balancer.specs import HARDWARE_PRESETS, MODEL_PRESETS
from hydraulis.config import (
    ConfigError,
    JobConfig,
    cluster_preset_names,
    load_config_file,
    load_job,
    parse_cluster_preset,
    resolve_cluster,
    resolve_hardware,
    resolve_model,
)


def test_cluster_preset_means_ranks_of_a_hardware_node() -> None:
    n, hw = parse_cluster_preset("8xH100")
    assert n == 8 and hw == HARDWARE_PRESETS["h100-80g"]
    cluster, hw = resolve_cluster("64xA100")
    assert cluster.num_ranks == 64 and cluster.ranks_per_node == 8 and cluster.num_nodes == 8
    assert cluster.memory_bytes == HARDWARE_PRESETS["a100-80g"].memory_bytes
    assert cluster.inter_node_bandwidth == HARDWARE_PRESETS["a100-80g"].inter_node_bandwidth
    assert resolve_cluster("16 x h200")[0].num_ranks == 16
    assert resolve_cluster("4xH100")[0].num_ranks == 4  # part of one node
    assert "8xH100" in cluster_preset_names()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("12xH100", "not whole nodes of 8; use 8 or 16"),
        ("8xB200", "unknown hardware 'B200'; valid hardware: a100"),
        ("0xH100", "positive integer"),
        ("H100", "neither a preset NxHARDWARE"),
    ],
)
def test_bad_cluster_presets_say_the_fix(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve_cluster(text)


def test_model_presets_and_overrides() -> None:
    assert resolve_model("LLaMA-7B") is MODEL_PRESETS["llama-7b"]
    spec = resolve_model({"preset": "llama-7b", "activation_recompute": "full"})
    assert spec.activation_recompute == "full" and spec.num_layers == 32
    with pytest.raises(ConfigError, match="unknown model preset 'llama-8b'; valid presets: llama-13b, llama-70b, llama-7b, tiny"):
        resolve_model("llama-8b")


def test_unknown_key_lists_valid_keys_and_closest_match() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_model({"preset": "tiny", "num_layer": 4})
    msg = str(e.value)
    assert "unknown key 'num_layer'" in msg and "did you mean 'num_layers'?" in msg and "hidden_size" in msg


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(ConfigError, match="missing .*num_layers"):
        resolve_model({"hidden_size": 64})
    with pytest.raises(ConfigError, match="missing num_ranks"):
        resolve_cluster({"hardware": "h100-80g"})
    with pytest.raises(ConfigError, match="missing hardware"):
        resolve_cluster({"num_ranks": 8})


def test_yaml_toml_and_json_files_give_the_same_job(tmp_path) -> None:
    body = {"model": {"preset": "llama-13b"}, "cluster": {"num_ranks": 16, "hardware": "h100-80g"},
            "training": {"zero_stage": 1}}
    (tmp_path / "job.json").write_text(json.dumps(body))
    (tmp_path / "job.yaml").write_text(
        "model: {preset: llama-13b}\ncluster:\n  num_ranks: 16\n  hardware: h100-80g\ntraining: {zero_stage: 1}\n"
    )
    (tmp_path / "job.toml").write_text(
        '[model]\npreset = "llama-13b"\n[cluster]\nnum_ranks = 16\nhardware = "h100-80g"\n[training]\nzero_stage = 1\n'
    )
    jobs = [load_job(config=str(tmp_path / f"job.{ext}")) for ext in ("json", "yaml", "toml")]
    for job in jobs:
        assert job.model == MODEL_PRESETS["llama-13b"]
        assert job.cluster is not None and job.cluster.num_ranks == 16
        assert job.training == {"zero_stage": 1}
    cost = jobs[0].cost_model()
    assert cost.meta["options"]["zero_stage"] == 1 and cost.meta["options"]["num_ranks"] == 16


def test_flags_override_the_config_file(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: tiny\ncluster: {num_ranks: 8, hardware: a100-80g}\n")
    job = load_job(config=str(path), model="llama-7b", cluster="16xH100")
    assert job.model is MODEL_PRESETS["llama-7b"]
    assert job.cluster is not None and job.cluster.num_ranks == 16 and job.hardware == HARDWARE_PRESETS["h100-80g"]
    assert resolve_model(str(path)) is MODEL_PRESETS["tiny"]  # the file's model section alone


def test_cluster_file_overrides_reach_the_hardware(tmp_path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("num_ranks: 8\nranks_per_node: 4\nmemory_bytes: 42949672960\nhardware: {preset: h100-80g, mfu: 0.3}\n")
    cluster, hw = resolve_cluster(str(path))
    assert cluster.ranks_per_node == 4 and hw.ranks_per_node == 4
    assert cluster.memory_bytes == hw.memory_bytes == 40 * 1024**3
    assert hw.mfu == 0.3


def test_efficiency_tables_in_the_training_section_price_tp_layouts(tmp_path) -> None:
    from strategies import Layout

    base = "model: {preset: llama-7b}\ncluster: {num_ranks: 16, hardware: {preset: a100-80g}}\n"
    (tmp_path / "a.yaml").write_text(base + "training: {zero_stage: 1, tp_efficiency: [1.0, 0.9, 0.84, 0.66]}\n")
    (tmp_path / "b.yaml").write_text(base + "training: {zero_stage: 1, tp_efficiency: [1.0, 0.6, 0.5, 0.4]}\n")
    a = load_job(config=str(tmp_path / "a.yaml")).cost_model()
    b = load_job(config=str(tmp_path / "b.yaml")).cost_model()
    assert a.cost(Layout(1)) == b.cost(Layout(1))  # tp1 runs at full efficiency either way
    assert b.cost(Layout(2)).b > a.cost(Layout(2)).b  # a lower tp2 efficiency costs more per token
    (tmp_path / "c.yaml").write_text(base + "training: {zero_stage: 1, tp_efficiency: [1.0, 1.2]}\n")
    with pytest.raises(ConfigError, match="tp_efficiency"):
        load_job(config=str(tmp_path / "c.yaml")).cost_model()


def test_file_errors_name_the_file_and_section(tmp_path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("model: tiny\nclusters: {num_ranks: 8}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'clusters'; did you mean 'cluster'\? valid keys: model, hardware"):
        load_job(config=str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config_file(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown config type '.ini'"):
        load_config_file(tmp_path / "job.ini")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config_file(listing)
    training = tmp_path / "training.yaml"
    training.write_text("training: {zero: 1}\n")
    with pytest.raises(ConfigError, match="unknown key 'zero'"):
        load_job(config=str(training))


def test_invalid_values_keep_the_spec_message(tmp_path) -> None:
    with pytest.raises(ConfigError, match="mfu=1.5 is a fraction of peak"):
        resolve_hardware({"preset": "h100-80g", "mfu": 1.5})
    with pytest.raises(ConfigError, match="zero_stage=5"):
        JobConfig(model=MODEL_PRESETS["tiny"], hardware=HARDWARE_PRESETS["cpu"], training={"zero_stage": 5}).cost_model()
