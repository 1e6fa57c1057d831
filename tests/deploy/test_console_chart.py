"""The console in the Helm chart: off by default, and when turned on a Deployment and a
Service that are valid Kubernetes, run hardened, probe /healthz on the served port, set
only real config settings (every required one) and hold no secret."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tensafe.common.config import describe
from tensafe.console.config import ConsoleConfig

from .test_helm_chart import KUBERNETES_VERSION, PRODUCTION, by_kind, render


def _enabled(base: dict[str, Any], **console: Any) -> dict[str, Any]:
    return {**base, "console": {**base.get("console", {}), "enabled": True, **console}}


def test_off_by_default() -> None:
    assert "console" not in by_kind(render({}), "Deployment")
    assert "console" not in by_kind(render(PRODUCTION), "Deployment")


@pytest.mark.parametrize("base", [{}, PRODUCTION], ids=["default", "production"])
def test_enabled_renders_a_hardened_http_deployment_and_service(base: dict[str, Any]) -> None:
    documents = render(_enabled(base, port=9443, replicas=2, secureCookie=True))
    deployment = by_kind(documents, "Deployment")["console"]
    service = by_kind(documents, "Service")["console"]
    for doc in (deployment, service):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert deployment["spec"]["replicas"] == 2
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"] == ["tensafe.console"]
    assert container["ports"] == [{"name": "http", "containerPort": 9443, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert service["spec"]["ports"][0]["port"] == 9443
    env = {e["name"]: e.get("value") for e in container["env"]}
    known = {name for name, _, _ in describe(ConsoleConfig)}
    required = {name for name, default, _ in describe(ConsoleConfig) if default == "(required)"}
    assert set(env) - known == set()
    assert required <= set(env)
    assert env["TENSAFE_REGISTRY_URL"] == "tensafe-registry:50051"
    assert env["TENSAFE_CONSOLE_SECURE_COOKIE"] == "1"
    assert not [e for e in container["env"] if "valueFrom" in e]


def test_a_bad_value_fails_the_render() -> None:
    with pytest.raises(Exception, match="secureCookie"):
        render(_enabled({}, secureCookie="yes"))
