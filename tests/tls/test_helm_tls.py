"""The Helm chart with ``tls.enabled``: every service and worker mounts the TLS Secret
read-only and gets the TENSAFE_TLS_* settings (mTLS everywhere), probes stay working as
tcpSocket probes on the one TLS port, and the manifests are valid Kubernetes."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from tensafe.common.config import ServiceConfig, describe


def _chart_tests() -> Any:
    path = Path(__file__).resolve().parents[1] / "deploy" / "test_helm_chart.py"
    spec = importlib.util.spec_from_file_location("tls_helm_chart_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


chart = _chart_tests()
MOUNT = "/etc/tensafe/tls"
EXPECTED_ENV = {
    "TENSAFE_TLS_CERT_FILE": f"{MOUNT}/tls.crt",
    "TENSAFE_TLS_KEY_FILE": f"{MOUNT}/tls.key",
    "TENSAFE_TLS_CLIENT_CA_FILE": f"{MOUNT}/ca.crt",
    "TENSAFE_TLS_CA_FILE": f"{MOUNT}/ca.crt",
}


def _with_tls(**tls: Any) -> dict[str, Any]:
    values = copy.deepcopy(chart.PRODUCTION)
    values["tls"] = {"enabled": True, **tls}
    return values


def test_tls_mounts_the_secret_and_configures_every_process() -> None:
    documents = chart.render(_with_tls(secretName="prod-tls"))
    chart.validate_all(documents)
    settings = {name for name, _, _ in describe(ServiceConfig)}
    deployments = chart.by_kind(documents, "Deployment")
    assert set(deployments) == chart.GRPC_SERVICES | {"trainer-worker"}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "tls")
        assert volume["secret"]["secretName"] == "prod-tls", name
        container = pod["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
        assert mount == {"name": "tls", "mountPath": MOUNT, "readOnly": True}, name
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in EXPECTED_ENV} == EXPECTED_ENV, name
        assert set(EXPECTED_ENV) <= settings
        if name in chart.GRPC_SERVICES:
            port = chart.PRODUCTION.get("grpcPort", 50051)
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert container[probe]["tcpSocket"]["port"] == port, (name, probe)
                assert "grpc" not in container[probe]
            # One gRPC port, the TLS one: no plaintext side door for probes. (The
            # metrics port speaks plain HTTP /metrics only, no gRPC; see
            # docs/operations.md on restricting it with networkPolicy.metricsFrom.)
            assert [p["name"] for p in container["ports"]] == ["grpc", "metrics"]


def test_without_tls_nothing_changes() -> None:
    documents = chart.render(chart.PRODUCTION)
    for _, pod in chart.pod_specs(documents):
        assert all(v["name"] != "tls" for v in pod.get("volumes", []))
        for container in pod["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & set(EXPECTED_ENV)


def test_tls_without_a_secret_name_fails_the_render() -> None:
    with pytest.raises(helm.HelmError, match=re.escape("tls.secretName is required")):
        chart.render(_with_tls(secretName=""))
