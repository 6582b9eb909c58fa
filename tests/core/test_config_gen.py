"""`mstar config gen`: every server setting with its default and a comment, in a YAML the
real loader takes back (alone as a `server:` section, or after a deployment with
`--config`, through `mstar-serve --config`)."""

from __future__ import annotations

import os

import pytest
import yaml

from mstar.cli.main import main
from mstar.cli.serve import serve_defaults, serve_main
from mstar.config import load_config
from mstar.config.settings import ServerSettings, layered_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.upper().startswith("MSTAR_")]:
        monkeypatch.delenv(name)


def test_every_setting_is_written_with_its_default_under_a_comment(tmp_path, capsys):
    out = tmp_path / "mstar.yaml"
    assert main(["config", "gen", "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "server:"
    command_owned = set(serve_defaults())
    for name in ServerSettings.model_fields:
        active = [i for i, line in enumerate(lines) if line.startswith(f"  {name}: ")]
        commented = [i for i, line in enumerate(lines) if line.startswith(f"  # {name}: ")]
        assert len(active + commented) == 1, name
        assert bool(commented) == (name in command_owned), name
        above = lines[(active + commented)[0] - 1]
        assert above.startswith("  # ") and len(above) > 6, name
    server = yaml.safe_load(out.read_text())["server"]
    assert set(server) == set(ServerSettings.model_fields) - command_owned
    assert server["cache_check_interval"] == 3600.0 and server["port"] == 8000
    # the section is valid settings and gives exactly the defaults
    assert layered_settings({}, server) == ServerSettings()


def test_a_generated_deployment_serves_back_through_mstar_serve(tmp_path, capsys):
    out = tmp_path / "mstar.yaml"
    assert main(["config", "gen", "--config", "testvla_single", "-o", str(out)]) == 0
    capsys.readouterr()
    assert serve_main(["--config", str(out), "--preset", "tiny", "--load-format", "dummy",
                       "--validate-config"]) == 0
    merged = yaml.safe_load(capsys.readouterr().out)
    server = merged.pop("server")
    assert server["cache_max_size"] is None and server["timeout"] == 600.0
    assert load_config(str(out)).model_dump() == load_config("testvla_single").model_dump()


def test_to_standard_output_and_an_unknown_config_is_an_error(capsys):
    assert main(["config", "gen"]) == 0
    assert capsys.readouterr().out.startswith("server:\n  # bind address\n  host: 0.0.0.0\n")
    assert main(["config", "gen", "--config", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_a_base_configs_own_server_values_are_kept(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("model: testvla\nserver: {port: 9001, cache_max_size: 50GB}\n")
    assert main(["config", "gen", "--config", str(base)]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["model"] == "testvla"
    assert (data["server"]["port"], data["server"]["cache_max_size"]) == (9001, "50GB")
    assert layered_settings({}, data["server"]).cache_max_size == 50 * 10**9
