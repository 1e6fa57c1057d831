"""The Tinker API in the Helm chart: off by default, and when turned on a Deployment and
a Service that are valid Kubernetes, run hardened, probe HTTP on the served port and set
only real config settings (every required one)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tensafe.common.config import describe
from tensafe.tinker_api.config import TinkerApiConfig

from .test_helm_chart import KUBERNETES_VERSION, PRODUCTION, by_kind, render


def _enabled(base: dict[str, Any], **tinker: Any) -> dict[str, Any]:
    return {**base, "tinkerApi": {**base.get("tinkerApi", {}), "enabled": True, **tinker}}


def test_off_by_default() -> None:
    assert "tinker-api" not in by_kind(render({}), "Deployment")
    assert "tinker-api" not in by_kind(render(PRODUCTION), "Deployment")


@pytest.mark.parametrize("base", [{}, PRODUCTION], ids=["default", "production"])
def test_enabled_renders_a_hardened_http_deployment_and_service(base: dict[str, Any]) -> None:
    documents = render(_enabled(base, port=8443, replicas=2))
    deployment = by_kind(documents, "Deployment")["tinker-api"]
    service = by_kind(documents, "Service")["tinker-api"]
    for doc in (deployment, service):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert deployment["spec"]["replicas"] == 2
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"] == ["tensafe.tinker_api"]
    assert container["ports"] == [{"name": "http", "containerPort": 8443, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/api/v1/healthz"
        assert container[probe]["httpGet"]["port"] == "http"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}
    assert service["spec"]["ports"][0]["port"] == 8443
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    env = {e["name"]: e.get("value") for e in container["env"]}
    known = {name for name, _, _ in describe(TinkerApiConfig)}
    required = {name for name, default, _ in describe(TinkerApiConfig) if default == "(required)"}
    assert set(env) - known == set()
    assert required <= set(env)
    assert env["TENSAFE_TRAINER_URL"] == "tensafe-trainer:50051"
    assert env["TENSAFE_AUTH_URL"] == "tensafe-auth:50051"
    # It holds no secret: every call carries the caller's own token.
    assert not [e for e in container["env"] if "valueFrom" in e]


def test_with_tls_it_serves_https_and_presents_the_certificate() -> None:
    documents = render(_enabled({"tls": {"enabled": True, "secretName": "tensafe-tls"}}))
    container = by_kind(documents, "Deployment")["tinker-api"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TENSAFE_TLS_CERT_FILE"] == env["TENSAFE_TLS_CLIENT_CERT_FILE"]
    assert env["TENSAFE_TLS_CA_FILE"] == "/etc/tensafe/tls/ca.crt"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_a_bad_port_fails_the_render() -> None:
    with pytest.raises(Exception, match="port"):
        render(_enabled({}, port=0))


def test_public_endpoints_are_announced_only_when_set() -> None:
    """tensafe.tinker clients outside the cluster learn the gRPC endpoints from the Tinker
    API (GET /api/v1/tensafe/endpoints); the chart passes the public addresses through,
    and leaves them unset (the in-cluster Services are announced) by default."""

    def env_of(documents: list[dict[str, Any]]) -> dict[str, Any]:
        container = by_kind(documents, "Deployment")["tinker-api"]["spec"]["template"]["spec"][
            "containers"
        ][0]
        return {e["name"]: e.get("value") for e in container["env"]}

    public = env_of(
        render(
            _enabled(
                {},
                publicTrainerUrl="trainer.example.com:443",
                publicAuthUrl="auth.example.com:443",
            )
        )
    )
    assert public["TENSAFE_PUBLIC_TRAINER_URL"] == "trainer.example.com:443"
    assert public["TENSAFE_PUBLIC_AUTH_URL"] == "auth.example.com:443"
    default = env_of(render(_enabled({})))
    assert "TENSAFE_PUBLIC_TRAINER_URL" not in default
    assert "TENSAFE_PUBLIC_AUTH_URL" not in default
    # A URL with a scheme is what the service refuses at start-up; the schema says so first.
    with pytest.raises(Exception, match="publicTrainerUrl"):
        render(_enabled({}, publicTrainerUrl="https://trainer.example.com:443"))
