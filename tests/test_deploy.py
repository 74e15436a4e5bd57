"""deploy/: the Kubernetes manifests against the API schema, the compose file through Compose itself, the alert
rules through promtool, and every PromQL expression of the dashboard and the alerts against what a running
bridge's /metrics really exposes. (The image and the compose stack are run by deploy/smoke.sh and
deploy/compose-smoke.sh in .ci/run.)"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from telephony_bridge.serving import ServerThread
from telephony_bridge.settings import ServerSettings
from telephony_bridge.tools.caller import run_call
from telephony_bridge.tools.emulator import EmulatorConfig, create_emulator_app
from tests.support import DEVICE_IDS, BridgeProcess, signed_call, tool, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for
# Grafana's interval variables, replaced by a duration so the expression parses as plain PromQL.
GRAFANA_VARIABLES = re.compile(r"\$__(rate_interval|interval|range)\b")


# --- Kubernetes ----------------------------------------------------------------------------------------------


def kubernetes_objects() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    return [
        (name, doc)
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text())
        if doc is not None
    ]


def test_kubernetes_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    on_disk = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)


def test_kubernetes_manifests_match_the_api_schema() -> None:
    kinds = []
    for name, doc in kubernetes_objects():
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(
        ["Deployment", "Service", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    )


def only(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in kubernetes_objects() if doc["kind"] == kind]
    return doc


def test_kubernetes_deployment_outlasts_the_drain_and_runs_locked_down() -> None:
    deployment = only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain_timeout_s = float(env.get("BRIDGE__SERVER__DRAIN_TIMEOUT_S") or ServerSettings().drain_timeout_s)
    assert pod["terminationGracePeriodSeconds"] > drain_timeout_s + 1  # the process exits ~1 s after its last call
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    # /metrics and /status on the ops port, which only the internal Service exposes
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["OPS_PORT"] == str(ports["ops"])
    selectors = {doc["metadata"]["name"]: doc["spec"] for _, doc in kubernetes_objects() if doc["kind"] == "Service"}
    assert [p["targetPort"] for p in selectors["telephony-bridge"]["ports"]] == ["http"]
    assert [p["targetPort"] for p in selectors["telephony-bridge-ops"]["ports"]] == ["ops"]


def test_kubernetes_autoscaler_follows_calls_in_progress(exposed_metrics: dict[str, set[str]]) -> None:
    hpa = only("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == only("Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "bridge_calls_active"
    assert "bridge_calls_active" in exposed_metrics


# --- Compose -------------------------------------------------------------------------------------------------


def test_compose_file_is_valid_for_compose() -> None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        command = [docker, "compose"]
    else:
        command = [tool("docker-compose")]
    result = subprocess.run(
        [*command, "-f", str(DEPLOY / "compose.yaml"), "config"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert sorted(services) == ["bridge-1", "bridge-2", "lb", "redis", "savants"]
    # one public port, published on the load balancer only
    assert [name for name, service in services.items() if service.get("ports")] == ["lb"]
    for name in ("bridge-1", "bridge-2"):
        environment = services[name]["environment"]
        assert environment["REDIS_URL"] == "redis://redis:6379/0"
        assert environment["SAVANTS_BASE_URL"] == "http://savants:9100"


# --- Prometheus and Grafana ----------------------------------------------------------------------------------


def test_alert_rules_pass_promtool() -> None:
    promtool = tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yaml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


@pytest.fixture(scope="module")
def exposed_metrics() -> Iterator[dict[str, set[str]]]:
    """Sample name -> label names, from the /metrics of a real ``serve`` process after one real call."""
    emulator = ServerThread(create_emulator_app(EmulatorConfig(api_key="test-key", voice="echo")))
    emulator.start()
    bridge = BridgeProcess(emulator)
    try:
        result = asyncio.run(run_call(signed_call(bridge, seconds=1.0)))
        assert result.ended_by == "caller"
        wait_until(lambda: httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"] == [], what="call end")
        text = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    finally:
        bridge.kill()
        emulator.stop()
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
        # a labelled family with no sample yet still exposes its HELP/TYPE, and real series once counted
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            exposed.setdefault(family.name + suffix, set())
    yield exposed


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        return True

    promql_parser.walk(promql_parser.parse(GRAFANA_VARIABLES.sub("5m", expr)), visit)
    return found


def check_expression(where: str, expr: str, exposed: dict[str, set[str]]) -> set[str]:
    assert "$" not in GRAFANA_VARIABLES.sub("5m", expr), f"{where}: unknown Grafana variable in {expr!r}"
    used = selectors(expr)
    assert used, f"{where}: {expr!r} selects no metric"
    for selector in used:
        assert selector.name in exposed, f"{where}: {selector.name} is not exposed by /metrics"
        for matcher in selector.matchers.matchers:
            labels = exposed[selector.name]
            if labels:  # labels are known once the family has samples
                assert matcher.name in labels, f"{where}: {selector.name} has no label {matcher.name!r}"
    return {s.name for s in used}


def test_grafana_dashboard_queries_only_metrics_the_bridge_exposes(exposed_metrics: dict[str, set[str]]) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "telephony-bridge.json").read_text())
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used |= check_expression(f"panel {panel['title']!r}", target["expr"], exposed_metrics)
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for subject in ("outcome", "capacity per device", "token budget", "ai connect", "first ai audio", "underrun",
                    "barge-in", "errors by code", "core busy", "cpu per call"):  # fmt: skip
        assert subject in titles, f"the dashboard has no panel on {subject}"
    assert {"bridge_calls_total", "bridge_device_calls", "bridge_token_requests_total"} <= used


def test_alert_rules_use_only_metrics_the_bridge_exposes(exposed_metrics: dict[str, set[str]]) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    for rule in alerts:
        check_expression(f"alert {rule['alert']}", rule["expr"], exposed_metrics)
    names = " ".join(rule["alert"] for rule in alerts)
    for subject in ("PoolExhausted", "TokenEndpointFailing", "RedisDown", "FailingByAIError", "DrainStuck", "CoreBusy"):
        assert subject in names


async def test_device_calls_metric_counts_live_calls_per_device(emulator: ServerThread, bridge: ServerThread) -> None:
    def device_calls() -> dict[str, float]:
        text = httpx.get(bridge.http_url + "/metrics", timeout=5).text
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == "bridge_device_calls"]
        return {sample.labels["device"]: sample.value for sample in family.samples}

    assert device_calls() == dict.fromkeys(DEVICE_IDS, 0.0)
    call = asyncio.create_task(run_call(signed_call(bridge, seconds=2.0)))
    await asyncio.to_thread(wait_until, lambda: sum(device_calls().values()) == 1, 5.0, "the call on a device")
    (on,) = [device for device, calls in device_calls().items() if calls == 1]
    status = httpx.get(bridge.http_url + "/status", timeout=5).json()
    assert [c["device_id"] for c in status["calls"]] == [on]
    await call
    await asyncio.to_thread(wait_until, lambda: sum(device_calls().values()) == 0, 5.0, "the call to end")


async def test_draining_metric_turns_on_at_sigterm(emulator: ServerThread) -> None:
    bridge = BridgeProcess(emulator)
    try:

        def draining() -> float:
            text = httpx.get(bridge.http_url + "/metrics", timeout=5).text
            (family,) = [f for f in text_string_to_metric_families(text) if f.name == "bridge_draining"]
            return family.samples[0].value

        assert draining() == 0
        call = asyncio.create_task(run_call(signed_call(bridge, seconds=2.0)))
        await asyncio.to_thread(
            wait_until, lambda: httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"], 5.0, "the call"
        )
        bridge.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: draining() == 1, 5.0, "bridge_draining to turn 1")
        assert (await call).ended_by == "caller"  # the drain let the call finish
        assert await asyncio.to_thread(bridge.finish, 15.0) == 0
    finally:
        bridge.kill()
