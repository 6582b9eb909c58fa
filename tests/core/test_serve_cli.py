"""`mstar-serve` and `mstar serve`: options and defaults (the original M* server's), settings
layering, `--validate-config` (the merged YAML, or every error), the tensor-protocol default,
and the
packaged testvla configs (each valid, each placing what its name says, mirrored in
`configs/`). Commands run in-process; only the launch tests stand in for `run_server`."""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants as hf_constants

import mstar.serving
from mstar.cli.main import main
from mstar.cli.serve import build_serve_parser, serve_main
from mstar.config import DeploymentConfig, load_config, packaged_configs, placement
from mstar.config.settings import ServerSettings
from mstar.plugins import model_registry
from mstar.serving.launcher import worker_threads

REPO = Path(__file__).resolve().parents[2]
TINY = ["--preset", "tiny", "--load-format", "dummy", "--validate-config"]
HAS_MOONCAKE = importlib.util.find_spec("mooncake") is not None
TESTVLA_CONFIGS = sorted(model_registry().get("testvla").configs)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MSTAR_* variables from the caller's shell leak into the layering."""
    for name in [n for n in os.environ if n.upper().startswith("MSTAR_")]:
        monkeypatch.delenv(name)


def run(capsys: pytest.CaptureFixture[str], entry, argv: list[str]) -> tuple[int, str, str]:
    code = entry(argv)
    out, err = capsys.readouterr()
    return code, out, err


def merged(capsys, entry, argv: list[str]) -> dict:
    """The `--validate-config` output of a command that must succeed, parsed."""
    code, out, err = run(capsys, entry, argv)
    assert code == 0, err
    return yaml.safe_load(out)


def write(tmp_path: Path, text: str, name: str = "deploy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------------
# Options and defaults


def test_mstar_serve_options_parse_and_only_given_ones_are_set():
    parser = build_serve_parser()
    args = parser.parse_args(["--config", "x.yaml"])
    assert all(getattr(args, name, None) is None for name in ServerSettings.model_fields)
    args = parser.parse_args([
        "--config", "x.yaml", "--host", "127.0.0.1", "--port", "9000",
        "--tensor-comm-protocol", "tcp", "--cache-dir", "/c", "--socket-path-prefix", "/s",
        "--upload-dir", "/u", "--timeout", "12.5", "--mooncake-port", "9090",
        "--tcp-transfer-device", "eth0", "--enable-nvtx", "--log-level", "debug",
        "--model-path", "/m", "--revision", "main", "--load-format", "dummy",
        "--preset", "tiny", "--api-key", "k", "--data-workers", "3",
        "--policy-ws-port", "9001", "--set",
        "max_seq_len=64", "--set", "a.b=1", "--validate-config"])
    assert (args.host, args.port, args.tensor_comm_protocol, args.timeout) == (
        "127.0.0.1", 9000, "TCP", 12.5)
    assert (args.mooncake_port, args.tcp_transfer_device, args.enable_nvtx,
            args.log_level) == (9090, "eth0", True, "DEBUG")
    assert (args.data_workers, args.policy_ws_port) == (3, 9001)
    assert args.overrides == ["max_seq_len=64", "a.b=1"] and args.validate_config


@pytest.mark.parametrize("argv", [[], ["--config", "x", "--tensor-comm-protocol", "UDP"],
                                  ["--config", "x", "--port", "eighty"]])
def test_mstar_serve_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        serve_main(argv)
    assert info.value.code == 2


def test_mstar_serve_defaults_are_seed_000s(capsys):
    data = merged(capsys, serve_main, ["--config", "testvla_single", *TINY])
    server = data.pop("server")
    assert server == {
        "host": "0.0.0.0", "port": 8000, "tensor_comm_protocol": "RDMA" if HAS_MOONCAKE
        else "SHM", "cache_dir": None, "cache_max_size": None, "cache_min_free_space": None,
        "cache_unused_threshold": None, "cache_max_models": None,
        "cache_check_interval": 3600.0, "cache_gc": False, "socket_path_prefix": "/tmp/mstar",
        "upload_dir": "/tmp/mstar_uploads", "image_url_ttl": 3600.0, "timeout": 600.0,
        "mooncake_port": 8080,
        "tcp_transfer_device": None, "enable_nvtx": False, "log_level": "INFO",
        "model_path": None, "revision": None, "load_format": "dummy", "preset": "tiny",
        "weights_from_peers": False, "policy_ws_port": None, "max_body_bytes": 64 * 1024 * 1024, "startup_timeout": 600.0, "shutdown_grace": 30.0,
        "data_workers": 1, "data_parallel_size": None,
        "cpu_threads": None, "allow_private_media_urls": False, "media_max_bytes": 20971520,
        "media_max_image_pixels": 16777216, "media_max_audio_seconds": 600.0,
        "media_max_video_seconds": 600.0, "media_fetch_timeout": 10.0, "nnodes": 1,
        "node_rank": 0, "master_addr": "127.0.0.1", "master_port": 29600,
        "dist_init_addr": None}
    expected = load_config("testvla_single").model_copy(update={"request_timeout": 600.0})
    assert DeploymentConfig.model_validate(data) == expected


def test_mstar_serve_resolves_the_default_config_and_plumbing(capsys, monkeypatch):
    import getpass

    data = merged(capsys, main, ["serve", "testvla", *TINY])
    server = data.pop("server")
    user = getpass.getuser()
    assert (server["tensor_comm_protocol"], server["socket_path_prefix"],
            server["upload_dir"], server["cache_dir"]) == (
        "SHM", f"/tmp/mstar_{user}/", f"/tmp/mstar_uploads_{user}/", hf_constants.HF_HUB_CACHE)
    assert (server["host"], server["port"], server["log_level"]) == ("0.0.0.0", 8000, "INFO")
    default = model_registry().get("testvla").default_config
    assert default == "testvla_single"
    assert DeploymentConfig.model_validate(data) == load_config(default).model_copy(
        update={"request_timeout": 600.0})


def test_mstar_serve_takes_another_config_and_checks_its_model(capsys, tmp_path):
    data = merged(capsys, main, ["serve", "testvla", "--config", "testvla_tp2", *TINY])
    assert data["node_groups"][0]["tp_size"] == 2
    other = write(tmp_path, "model: nosuch\n")
    code, out, err = run(capsys, main, ["serve", "testvla", "--config", other, *TINY])
    assert code == 1 and out == ""
    assert "model: the config serves 'nosuch', not 'testvla'" in err


def test_a_second_name_of_one_model_serves_its_configs_under_that_name(capsys):
    """`bagel_cfg_parallel` is BAGEL registered again with another default layout: its
    YAML says `model: bagel`, and it is served as the name typed."""
    data = merged(capsys, main, ["serve", "bagel_cfg_parallel", *TINY])
    assert data["model"] == "bagel_cfg_parallel" and len(data["node_groups"]) == 5
    assert merged(capsys, main, ["serve", "bagel", "--config", "bagel_cfg_parallel",
                                 *TINY])["model"] == "bagel"


def test_mstar_serve_unknown_model_exits_2_listing_the_installed_ones(capsys):
    code, out, err = run(capsys, main, ["serve", "nosuch", *TINY])
    assert code == 2 and out == ""
    assert "unknown model 'nosuch'; installed models:" in err and "testvla" in err


def test_bad_gpu_list_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "testvla", "--gpus", "0, 1"])
    assert info.value.code == 2
    assert "--gpus" in capsys.readouterr().err


def test_gpus_without_cuda_fails_instead_of_running_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # restored after: --gpus sets it
    code, out, err = run(capsys, main, ["serve", "testvla", "--gpus", "0", *TINY])
    assert code == 1 and out == ""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # set before torch counts devices
    assert "error: --gpus 0: no CUDA device is available on this machine" in err


def test_a_devices_mapping_naming_a_missing_device_fails_before_starting(capsys, tmp_path):
    path = write(tmp_path, "model: testvla\nnode_groups:\n"
                           "  - {node_names: [vision_encoder], ranks: [1]}\n"
                           "  - {node_names: [LLM, action_init, combine, cem_sample, "
                           "cem_refit, consumer], ranks: [0]}\n"
                           "devices: {0: cpu, 1: 'cuda:0'}\n")
    code, _, err = run(capsys, serve_main, ["--config", path, *TINY])
    assert code == 1
    assert "devices.1: cuda:0 does not exist; no CUDA device is visible" in err
    merged_ok = merged(capsys, serve_main, ["--config", path, *TINY,
                                            "--set", "devices={0: cpu, 1: cpu}"])
    merged_ok.pop("server")
    assert DeploymentConfig.model_validate(merged_ok).devices == {0: "cpu", 1: "cpu"}


def test_a_model_that_ships_no_config_runs_every_node_on_rank_0(plugin_dir, capsys):
    plugin_dir.add("mstar-bare", "mstar_bare", {"__init__.py": '''
        from mstar.plugins import ModelSpec, hookimpl


        @hookimpl
        def mstar_register_models(registry):
            registry.add(ModelSpec(name="bare", model_class="mstar_testvla.model:TestVLA",
                                   presets=("tiny",)))
        '''})
    data = merged(capsys, main, ["serve", "bare", *TINY])
    assert (data["model"], data["node_groups"]) == ("bare", [])


# ------------------------------------------------------------------------------------------
# Layering: CLI > MSTAR_* env > the YAML's server: section > command defaults > defaults


def test_layering_order(capsys, monkeypatch, tmp_path):
    single = importlib.resources.files("mstar_testvla").joinpath(
        "configs/testvla_single.yaml").read_text()
    path = write(tmp_path, single + "server: {port: 7001, host: 127.0.0.1, timeout: 30, "
                                    "upload_dir: /tmp/from_yaml, log_level: WARNING}\n")
    monkeypatch.setenv("MSTAR_PORT", "7002")
    monkeypatch.setenv("MSTAR_TIMEOUT", "40")
    server = merged(capsys, serve_main, ["--config", path, "--port", "7003", *TINY])["server"]
    assert server["port"] == 7003  # CLI beats env and YAML
    assert server["timeout"] == 40.0  # env beats YAML
    assert (server["host"], server["upload_dir"]) == ("127.0.0.1", "/tmp/from_yaml")  # YAML
    assert (server["mooncake_port"], server["log_level"]) == (8080, "WARNING")  # default, YAML
    # `mstar serve`'s own defaults sit under the YAML: its upload dir loses, its socket wins.
    data = merged(capsys, main, ["serve", "testvla", "--config", path, *TINY])
    assert data["server"]["upload_dir"] == "/tmp/from_yaml"
    assert data["server"]["socket_path_prefix"].startswith("/tmp/mstar_")
    assert data["request_timeout"] == 40.0  # from the merged --timeout


def test_data_workers_come_from_any_layer_and_must_be_positive(capsys, monkeypatch, tmp_path):
    path = write(tmp_path, "model: testvla\nserver: {data_workers: 2}\n")
    assert merged(capsys, serve_main, ["--config", path, *TINY])["server"]["data_workers"] == 2
    monkeypatch.setenv("MSTAR_DATA_WORKERS", "3")
    assert merged(capsys, serve_main, ["--config", path, *TINY])["server"]["data_workers"] == 3
    assert merged(capsys, main, ["serve", "testvla", "--data-workers", "4", *TINY])[
        "server"]["data_workers"] == 4
    code, out, err = run(capsys, serve_main, ["--config", path, "--data-workers", "0", *TINY])
    assert code == 1 and out == ""
    assert "--data-workers: Input should be greater than or equal to 1" in err


def test_revisions_are_per_weight_source_from_any_layer(capsys, monkeypatch, tmp_path):
    orpheus = ["serve", "orpheus", *TINY]
    server = merged(capsys, main, [*orpheus, "--revision", "v1",
                                   "--revision", "snac=v2"])["server"]
    assert server["revision"] == {"default": "v1", "snac": "v2"}  # a bare REV: default's
    path = write(tmp_path, "model: orpheus\nserver: {revision: {snac: v3}}\n")
    assert merged(capsys, main, ["serve", "orpheus", "--config", path, *TINY])[
        "server"]["revision"] == {"snac": "v3"}
    monkeypatch.setenv("MSTAR_REVISION", "default=v4,snac=v5")
    assert merged(capsys, main, orpheus)["server"]["revision"] == {"default": "v4",
                                                                   "snac": "v5"}
    code, out, err = run(capsys, main, [*orpheus, "--revision", "snca=v2"])
    assert code == 1 and out == ""
    assert ("--revision names weight source 'snca', which the model does not have; its "
            "sources: default, snac") in err
    code, _, err = run(capsys, main, [*orpheus, "--revision", "v1,default=v2"])
    assert code == 1 and "--revision: Value error, two revisions for weight source " \
                         "'default': 'v1' and 'v2'" in err


def test_request_timeout_follows_timeout_unless_the_yaml_sets_it(capsys, tmp_path):
    data = merged(capsys, serve_main, ["--config", "testvla_single", "--timeout", "9", *TINY])
    assert data["request_timeout"] == 9.0
    path = write(tmp_path, "model: testvla\nrequest_timeout: 5\n")
    data = merged(capsys, serve_main, ["--config", path, "--timeout", "9", *TINY])
    assert (data["request_timeout"], data["server"]["timeout"]) == (5.0, 9.0)


def test_set_overrides_and_api_key_from_env_is_never_printed(capsys, monkeypatch):
    monkeypatch.setenv("MSTAR_API_KEY", "sekrit")
    code, out, err = run(capsys, serve_main, [
        "--config", "testvla_single", "--set", "max_seq_len=1024",
        "--set", "kv_cache.num_pages=64", *TINY])
    assert code == 0, err
    assert "sekrit" not in out + err and "api_key is set" in out
    data = yaml.safe_load(out)
    assert (data["max_seq_len"], data["kv_cache"]["num_pages"]) == (1024, 64)
    assert "api_key" not in data["server"]


def test_the_merged_output_is_a_valid_config_again(capsys, tmp_path):
    code, out, _ = run(capsys, serve_main, ["--config", "testvla_cfg_parallel", "--port", "9",
                                            *TINY])
    assert code == 0
    again = merged(capsys, serve_main, ["--config", write(tmp_path, out), "--validate-config"])
    assert again == yaml.safe_load(out)


# ------------------------------------------------------------------------------------------
# --validate-config failures: non-zero, every error printed, no traceback

INVALID = {
    "schema-and-settings": (
        "model: testvla\nmax_seq_len: 0\nbogus: 1\nserver: {port: -1, colour: red}\n",
        [], {"MSTAR_TIMEOUT": "soon"},
        ["max_seq_len: Input should be greater than or equal to 1", "bogus: unknown key",
         "server.port: Input should be greater than or equal to 0",
         "server.colour: unknown setting", "MSTAR_TIMEOUT: Input should be a valid number"]),
    "placement": (
        "model: testvla\nnode_groups:\n"
        "  - {node_names: [LLM, vision], ranks: [0, 1], tp_size: 3}\n"
        "  - {node_names: [vision_encoder, action_init, combine, consumer], ranks: [0],"
        " graph_walks: [encode, denoise, strem]}\n",
        ["--preset", "tiny"], {},
        ["node_groups.0.node_names.1: unknown node 'vision'",
         "node_groups.0.tp_size: 3 with 2 rank(s)",
         "node_groups.1.graph_walks.2: unknown walk 'strem'",
         "node 'consumer' is placed nowhere for walk(s) stream"]),
    "set-syntax": ("model: testvla\n", ["--set", "oops"], {},
                   ["--set 'oops': expected key=value"]),
    "set-paths": (
        "model: testvla\nnode_groups: [{node_names: [LLM], ranks: [0]}]\n",
        ["--set", "node_groups.3.ranks=[1]", "--set", "server.port=1"], {},
        ["node_groups.3: no such entry (the list has 1)",
         "--set server.port: --set changes the deployment"]),
    "unknown-model": ("model: nosuch\n", [], {}, ["model: unknown model 'nosuch'"]),
    "model-kwargs": ("model: testvla\nmodel_kwargs: {colour: 1}\n", ["--preset", "tiny"], {},
                     ["model_kwargs: unknown model_kwargs ['colour']"]),
    "yaml-syntax": ("model: [testvla\n", [], {}, ["yaml (line"]),
    "no-hub-repo": ("model: testvla\n", [], {},
                    ["--model-path: the model names no hub repo for its weight source "
                     "'default'"]),
    "no-preset-for-dummy": ("model: testvla\n", ["--load-format", "dummy"], {},
                            ["--preset: load_format 'dummy' needs a preset"]),
    "ranks-exceed-nodes": (
        "model: testvla\nranks_per_node: 1\nnode_groups:\n"
        "  - {node_names: [LLM, vision_encoder, action_init, combine, cem_sample, cem_refit],"
        " ranks: [0]}\n  - {node_names: [consumer], ranks: [1]}\n",
        ["--preset", "tiny", "--load-format", "dummy"], {},
        ["ranks_per_node: 1 rank(s) per node on 1 node(s) (--nnodes) hold ranks 0..0, but "
         "the placement uses 2 rank(s) (0, 1): it needs 2 nodes"]),
    "nodes-list": (
        "model: testvla\nnodes: [{host: a, ranks: [0]}, {host: b, ranks: [0, 5]}]\n",
        ["--preset", "tiny", "--load-format", "dummy", "--nnodes", "2",
         "--tensor-comm-protocol", "TCP"], {},
        ["nodes[1].ranks: rank 0 is on node 0 too",
         "nodes[1].ranks: 1 rank(s) (5) that no node group uses"]),
    "nodes-and-nnodes": (
        "model: testvla\nnodes: [{host: a, ranks: [0]}]\nranks_per_node: 2\n",
        ["--nnodes", "2", "--node-rank", "2", "--tensor-comm-protocol", "SHM"], {},
        ["nodes and ranks_per_node both map ranks to nodes: set one",
         "--node-rank 2 is not a node of --nnodes 2 (0..1)"]),
    "cache-settings": (
        "model: testvla\nserver: {cache_unused_threshold: soon}\n",
        ["--preset", "tiny", "--load-format", "dummy", "--cache-check-interval", "hourly"],
        {"MSTAR_CACHE_MAX_SIZE": "lots"},
        ["server.cache_unused_threshold: Value error, 'soon' is not a duration",
         "MSTAR_CACHE_MAX_SIZE: Value error, 'lots' is not a size",
         "--cache-check-interval: Value error, 'hourly' is not a duration"]),
    "unknown-preset": ("model: testvla\n", ["--preset", "huge"], {},
                       ["--preset: unknown preset 'huge' for model 'testvla'; allowed: "
                        "small, tiny"]),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_configs_print_every_error(case, capsys, monkeypatch, tmp_path):
    text, argv, env, expected = INVALID[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = run(capsys, serve_main, ["--config", write(tmp_path, text), *argv,
                                              "--validate-config"])
    assert code == 1 and out == ""
    assert err.startswith("error: invalid config") and "Traceback" not in err
    for fragment in expected:
        assert fragment in err


def test_node_flags_and_the_sglang_form(capsys, tmp_path):
    """--dist-init-addr sets the master address and port; across nodes the default tensor
    transport is TCP (without Mooncake) and SHM is refused; nodes but no map is an error."""
    nodes = ("model: testvla\nnodes: [{host: 127.0.0.1, ranks: [0]}, "
             "{host: 127.0.0.2, ranks: [1]}]\nnode_groups:\n"
             "  - {node_names: [vision_encoder, LLM], ranks: [0]}\n"
             "  - {node_names: [action_init, combine, cem_sample, cem_refit, consumer],"
             " ranks: [1]}\n")
    config = write(tmp_path, nodes)
    data = merged(capsys, serve_main, ["--config", config, *TINY, "--nnodes", "2",
                                       "--node-rank", "1", "--dist-init-addr", "10.1.2.3:7000"])
    server = data.pop("server")
    assert (server["master_addr"], server["master_port"], server["node_rank"]) == (
        "10.1.2.3", 7000, 1)
    assert server["tensor_comm_protocol"] == ("RDMA" if HAS_MOONCAKE else "TCP")
    assert data["nodes"] == [{"host": "127.0.0.1", "ranks": [0]},
                             {"host": "127.0.0.2", "ranks": [1]}]
    code, _, err = run(capsys, serve_main, ["--config", config, *TINY, "--nnodes", "2",
                                            "--tensor-comm-protocol", "SHM"])
    assert code == 1 and "SHM moves tensors within one node" in err
    code, _, err = run(capsys, serve_main, ["--config", "testvla_pd_disaggregated", *TINY,
                                            "--nnodes", "2", "--tensor-comm-protocol", "TCP"])
    assert code == 1 and "--nnodes 2: the config maps no rank to a node" in err
    code, _, err = run(capsys, main, ["serve", "testvla", "--config", config, *TINY,
                                      "--nnodes", "2"])  # `mstar serve`'s SHM is per node
    assert code == 0, err


def test_missing_config_names_the_packaged_ones(capsys):
    code, _, err = run(capsys, serve_main, ["--config", "configs/nosuch.yaml", *TINY])
    assert code == 1
    assert "no file 'configs/nosuch.yaml' and no packaged config named 'nosuch'" in err
    assert "testvla_single" in err


def test_model_config_comes_from_the_checkpoint_config_json(capsys, tmp_path):
    """No preset: the model is sized by --model-path's config.json (here a single KV head,
    which tp_size 2 cannot split)."""
    import json

    from mstar_testvla.config import TestVLAConfig

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    config = TestVLAConfig(num_attention_heads=4, num_key_value_heads=1)
    (checkpoint / "config.json").write_text(json.dumps(config.to_json_dict()))
    base = ["--model-path", str(checkpoint), "--load-format", "dummy", "--validate-config"]
    assert run(capsys, serve_main, ["--config", "testvla_single", *base])[0] == 0
    code, _, err = run(capsys, serve_main, ["--config", "testvla_tp2", *base])
    assert code == 1 and "query heads and 1 KV heads" in err
    code, _, err = run(capsys, serve_main, ["--config", "testvla_single", "--model-path",
                                            str(tmp_path / "absent"), "--validate-config"])
    assert code == 1 and "--model-path: weight path" in err


# ------------------------------------------------------------------------------------------
# Tensor protocol


@pytest.mark.skipif(HAS_MOONCAKE, reason="Mooncake is installed here")
def test_rdma_asked_for_without_mooncake_fails_before_starting(capsys):
    code, out, err = run(capsys, serve_main, ["--config", "testvla_single",
                                              "--tensor-comm-protocol", "RDMA", *TINY])
    assert code == 1 and out == ""
    assert "--tensor-comm-protocol RDMA needs Mooncake" in err
    assert "mstar-core[rdma]" in err and "SHM" in err


@pytest.mark.skipif(HAS_MOONCAKE, reason="Mooncake is installed here")
def test_default_protocol_without_mooncake_is_shm_and_logged(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="mstar"):
        server = merged(capsys, serve_main, ["--config", "testvla_single", *TINY])["server"]
    assert server["tensor_comm_protocol"] == "SHM"
    assert any("SHM" in r.getMessage() and "Mooncake" in r.getMessage()
               and "not installed" in r.getMessage() for r in caplog.records)


def test_default_protocol_with_mooncake_is_rdma(capsys, monkeypatch, tmp_path):
    """An importable `mooncake` package (a stand-in on sys.path) is all the check needs."""
    (tmp_path / "mooncake").mkdir()
    (tmp_path / "mooncake" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    server = merged(capsys, serve_main, ["--config", "testvla_single", *TINY])["server"]
    assert server["tensor_comm_protocol"] == "RDMA"
    server = merged(capsys, serve_main, ["--config", "testvla_single",
                                         "--tensor-comm-protocol", "RDMA", *TINY])["server"]
    assert server["tensor_comm_protocol"] == "RDMA"
    # `mstar serve` stays on SHM, its single-node default.
    assert merged(capsys, main, ["serve", "testvla", *TINY])["server"][
        "tensor_comm_protocol"] == "SHM"


# ------------------------------------------------------------------------------------------
# Launching


def test_both_commands_hand_the_checked_deployment_to_run_server(capsys, monkeypatch):
    calls = []

    def run_server(settings, config):
        calls.append((settings, config))
        return 3

    monkeypatch.setattr(mstar.serving, "run_server", run_server)
    assert serve_main(["--config", "testvla_stream_rank", "--preset", "tiny",
                       "--load-format", "dummy", "--port", "9100"]) == 3
    assert main(["serve", "testvla", "--preset", "tiny", "--load-format", "dummy"]) == 3
    (settings, config), (settings2, config2) = calls
    assert isinstance(settings, ServerSettings) and isinstance(config, DeploymentConfig)
    assert (settings.port, settings.tensor_comm_protocol, settings.preset) == (
        9100, "RDMA" if HAS_MOONCAKE else "SHM", "tiny")
    assert config == load_config("testvla_stream_rank").model_copy(
        update={"request_timeout": 600.0})
    assert settings2.tensor_comm_protocol == "SHM" and config2.model == "testvla"


def test_an_invalid_deployment_never_reaches_run_server(capsys, monkeypatch):
    def run_server(settings, config):
        raise AssertionError("launched an invalid deployment")

    monkeypatch.setattr(mstar.serving, "run_server", run_server)
    assert serve_main(["--config", "testvla_single", "--preset", "huge"]) == 1


# ------------------------------------------------------------------------------------------
# The packaged configs

#: What each packaged config must place: (walk, node) -> (ranks, tp_size).
EXPECTED_PLACEMENT = {
    "testvla_single": {("encode", "vision_encoder"): ((0,), 1), ("decode", "LLM"): ((0,), 1),
                       ("stream", "consumer"): ((0,), 1)},
    "testvla_node_split": {("encode", "vision_encoder"): ((1,), 1),
                           ("prefill", "LLM"): ((0,), 1)},
    "testvla_pd_disaggregated": {
        ("prefill", "LLM"): ((0,), 1), ("prefill_act", "LLM"): ((0,), 1),
        ("prefill_rollout", "LLM"): ((0,), 1), ("decode", "LLM"): ((1,), 1),
        ("denoise", "LLM"): ((1,), 1), ("denoise", "LLM_uncond"): ((1,), 1),
        ("rollout", "LLM"): ((1,), 1)},
    "testvla_stream_rank": {("stream", "consumer"): ((1,), 1), ("decode", "LLM"): ((0,), 1)},
    "testvla_cfg_parallel": {("denoise", "LLM"): ((0,), 1),
                             ("denoise", "LLM_uncond"): ((1,), 1)},
    "testvla_tp2": {("prefill", "LLM"): ((0, 1), 2), ("decode", "LLM"): ((0, 1), 2),
                    ("encode", "vision_encoder"): ((0,), 1)},
}


def test_every_packaged_config_has_an_expectation():
    assert sorted(EXPECTED_PLACEMENT) == TESTVLA_CONFIGS


@pytest.mark.parametrize("name", TESTVLA_CONFIGS)
def test_packaged_config_validates_and_places_what_its_name_says(name, capsys):
    from mstar_testvla.model import TestVLA

    data = merged(capsys, serve_main, ["--config", name, *TINY])
    assert (data["model"], data["max_seq_len"]) == ("testvla", 512)
    placed = placement(load_config(name), TestVLA(TestVLA.make_config(preset="tiny")))
    for (walk, node), (ranks, tp_size) in EXPECTED_PLACEMENT[name].items():
        got = placed.get(walk, node)
        assert (got.ranks, got.tp_size) == (ranks, tp_size), (walk, node)


def test_repo_configs_mirror_the_packaged_ones_byte_for_byte():
    """`configs/` is a copy of the configs packaged in the repository's plugins (the single
    source of truth, shipped in their wheels): same names, same bytes."""
    in_repo = {}
    for name, resource in packaged_configs().items():
        package, _, relative = resource.partition(":")
        file = importlib.resources.files(package).joinpath(relative)
        if REPO in Path(str(file)).resolve().parents:
            in_repo[name] = file.read_bytes()
    assert set(TESTVLA_CONFIGS) <= set(in_repo)
    mirrored = {p.stem: p.read_bytes() for p in (REPO / "configs").glob("*.yaml")}
    assert sorted(mirrored) == sorted(in_repo)
    for name, data in in_repo.items():
        assert mirrored[name] == data, f"configs/{name}.yaml differs from its packaged copy"
    readme = (REPO / "configs" / "README.md").read_text()
    for name in mirrored:
        assert f"`{name}.yaml`" in readme, f"configs/README.md does not describe {name}.yaml"


def test_cpu_threads_split_the_cores_unless_given(capsys):
    assert worker_threads(None, 3, cpus=8) == 2
    assert worker_threads(None, 3, cpus=2) == 1
    assert worker_threads(4, 3, cpus=2) == 4
    assert merged(capsys, main, ["serve", "testvla", "--cpu-threads", "1", *TINY])[
        "server"]["cpu_threads"] == 1
    code, out, err = run(capsys, serve_main, ["--config", "testvla_single", "--cpu-threads",
                                              "0", *TINY])
    assert code == 1 and out == ""
    assert "--cpu-threads: Input should be greater than or equal to 1" in err
