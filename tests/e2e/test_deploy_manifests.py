"""The Kubernetes manifests of `deploy/kubernetes`, checked offline: every manifest against
the schema of the oldest Kubernetes they support (kubernetes-validate's bundled JSON
schemas, strict, so a misspelt or misplaced field fails), the `mstar serve` command each
pod runs against our own CLI (the ConfigMap's deployment validated against its model, as
`--validate-config` does), the probe script against a live HTTP server, and the names and
ports the files must agree on (a typo there deploys fine and never serves)."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mstar.cli.main import build_parser, main
from mstar.cli.serve import model_for
from mstar.config import loader, placement
from mstar.config.devices import device_plan
from mstar.config.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
#: The oldest Kubernetes the manifests support: the pod-index label that becomes
#: `--node-rank` (`apps.kubernetes.io/pod-index`) is on by default from 1.28, GA in 1.32.
KUBERNETES_VERSION = "1.32"
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) for every manifest the kustomization applies."""
    return [(path.name, doc) for path in sorted(ROOT.glob("*.yaml"))
            if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for _, doc in _documents() if doc["kind"] == kind
             and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    (container,) = _one("StatefulSet")["spec"]["template"]["spec"]["containers"]
    return container


def _command(pod_index: int) -> list[str]:
    """The container's command as pod `pod_index` runs it: `$(VAR)` expanded from its env
    (Kubernetes leaves an undefined reference as it is, so each must be defined)."""
    values = {}
    for var in _container()["env"]:
        if "value" in var:
            values[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == POD_INDEX:
            values[var["name"]] = str(pod_index)

    def expand(match: re.Match[str]) -> str:
        assert match[1] in values, f"$({match[1]}) is not a literal or pod-index env var"
        return values[match[1]]

    return [re.sub(r"\$\((\w+)\)", expand, arg) for arg in _container()["command"]]


def _parse(command: list[str]) -> argparse.Namespace:
    """`mstar ...` parsed by our own CLI; a flag it does not know fails the test."""
    try:
        return build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"not a valid mstar command (argparse's message above): {command}")


def _node0_host() -> str:
    """Pod 0's name through the headless Service: how node k > 0 reaches node 0."""
    statefulset = _one("StatefulSet")
    return f"{statefulset['metadata']['name']}-0.{statefulset['spec']['serviceName']}"


def _port(name: str) -> int:
    (port,) = [p["containerPort"] for p in _container()["ports"] if p["name"] == name]
    return port


def test_kustomization_applies_every_manifest():
    kustomization = yaml.safe_load((ROOT / "kustomization.yaml").read_text())
    files = {p.name for p in ROOT.glob("*.y*ml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


@pytest.mark.parametrize(("name", "resource"), _documents(),
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_matches_the_kubernetes_schema(name, resource):
    problem = None
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # its text holds the whole schema
        problem = f"{name}: {'.'.join(map(str, exc.absolute_path))}: {exc.message}"
    assert problem is None, problem


def test_schema_check_rejects_a_misplaced_field():
    """The check above is strict: a GPU limit written at the container's top level (an
    easy slip) does not pass."""
    broken = yaml.safe_load(yaml.safe_dump(_one("StatefulSet")))
    broken["spec"]["template"]["spec"]["containers"][0]["nvidia.com/gpu"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("pod_index", [0, 1])
def test_pod_command_is_mstar_serve_with_its_node_flags(pod_index, tmp_path, capsys):
    statefulset = _one("StatefulSet")
    command = _command(pod_index)
    assert command[:2] == ["mstar", "serve"], command
    args = _parse(command)
    replicas = statefulset["spec"]["replicas"]
    assert (args.nnodes, args.node_rank) == (replicas, pod_index)
    host, port = args.dist_init_addr.rsplit(":", 1)
    assert host == _node0_host()
    assert int(port) == _port("dist-init")
    assert args.port == _port("http")

    # The deployment it serves is the ConfigMap's, mounted where --config points.
    config_map = _one("ConfigMap")
    mounts = {m["name"]: m["mountPath"] for m in _container()["volumeMounts"]}
    volume = next(v for v in statefulset["spec"]["template"]["spec"]["volumes"]
                  if v.get("configMap", {}).get("name") == config_map["metadata"]["name"])
    directory, key = args.config.rsplit("/", 1)
    assert directory == mounts[volume["name"]] and key in config_map["data"]

    # `mstar serve` accepts it, flags and config, for the model it names (tiny, dummy) ...
    path = tmp_path / key
    path.write_text(config_map["data"][key])
    status = main([*command[1:], "--config", str(path), "--preset", "tiny",
                   "--load-format", "dummy", "--validate-config"])
    assert status == 0, capsys.readouterr().err
    deployment = yaml.safe_load(capsys.readouterr().out)
    assert deployment["model"] == args.model
    # ... and its ranks fill exactly the pods' nodes.
    ranks = {r for group in deployment["node_groups"] for r in group["ranks"]}
    assert ranks == set(range(replicas * deployment["ranks_per_node"]))


def test_each_pod_has_the_gpus_its_ranks_need():
    """A pod sees its `nvidia.com/gpu` limit of CUDA devices; its node's ranks must be
    placed on them."""
    gpus = int(_container()["resources"]["limits"]["nvidia.com/gpu"])
    data = yaml.safe_load(_one("ConfigMap")["data"]["deployment.yaml"])
    config = loader.config_from_data(data, "deployment.yaml")
    model = model_for(config, ServerSettings(preset="tiny", load_format="dummy"))
    plan = device_plan(config, placement(config, model), cuda_devices=gpus)
    # each node numbers its own GPUs: every rank on its pod's GPU, none sharing it
    assert set(plan.devices.values()) == {"cuda:0"}
    assert {plan.ranks_sharing(r) for r in plan.devices} == {1}


def test_http_service_reaches_node_0_only_and_probes_ask_node_0():
    statefulset = _one("StatefulSet")
    name = statefulset["metadata"]["name"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    http_service = _one("Service", name)
    selector = dict(http_service["spec"]["selector"])
    assert selector.pop("statefulset.kubernetes.io/pod-name") == f"{name}-0"
    assert selector.items() <= labels.items()
    (target,) = [p["targetPort"] for p in http_service["spec"]["ports"]]
    assert _port(target) == _port("http")

    nodes_service = _one("Service", statefulset["spec"]["serviceName"])
    assert nodes_service["spec"]["clusterIP"] == "None"
    assert nodes_service["spec"].get("publishNotReadyAddresses")  # node 0 is ready after node 1
    assert nodes_service["spec"]["selector"].items() <= labels.items()
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        _python, script, port, node0 = _container()[probe]["exec"]["command"]
        assert script.rsplit("/", 1)[1] in _one("ConfigMap")["data"]
        assert (int(port), node0) == (_port("http"), _node0_host())


def _readme_commands() -> list[str]:
    """The `mstar serve` commands of the README's Deployments section (continuations
    joined, comments dropped)."""
    text = (ROOT.parents[1] / "README.md").read_text()
    section = text.split("\n## Deployments\n", 1)[1].split("\n## ", 1)[0]
    lines = section.replace("\\\n", " ").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.startswith("mstar serve")]


def test_readme_deployment_commands_are_mstar_commands():
    commands = _readme_commands()
    assert len(commands) >= 5, commands  # one layout per subsection at least
    for command in commands:
        _parse(command.split())


@contextlib.contextmanager
def _health_server(status: list[int]) -> Iterator[int]:
    """A server on 127.0.0.1 whose /health answers `status[0]`; yields its port."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(status[0] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_probe_script_passes_only_on_a_healthy_node_0(tmp_path):
    script = tmp_path / "health.py"
    script.write_text(_one("ConfigMap")["data"]["health.py"])

    def probe(node_rank: int, port: int, node0: str) -> int:
        return subprocess.run([sys.executable, str(script), str(port), node0],
                              env={"NODE_RANK": str(node_rank)}, capture_output=True,
                              timeout=60).returncode

    status = [200]
    with _health_server(status) as port:
        # Node 0 asks itself (not the node-0 name); node 1 asks node 0 by that name.
        assert probe(0, port, "127.0.0.2") == 0
        assert probe(1, port, "127.0.0.1") == 0
        assert probe(1, port, "127.0.0.2") != 0  # nothing listens there
        status[0] = 503  # starting, stopping, or a node lost
        assert probe(0, port, "127.0.0.2") != 0
        assert probe(1, port, "127.0.0.1") != 0
