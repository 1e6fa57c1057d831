"""The Helm chart in deploy/k8s/tensafe, rendered by the real Helm engine (Helm's Go SDK
through helm-python-sdk) for the default and the production values, with every
manifest validated against the Kubernetes OpenAPI schemas (kubernetes-validate, offline).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tensafe.auth.config import AuthConfig
from tensafe.common.config import describe
from tensafe.he_runtime.config import HeRuntimeConfig
from tensafe.registry.config import RegistryConfig
from tensafe.trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "k8s" / "tensafe"
PRODUCTION = yaml.safe_load((CHART / "values-production.yaml").read_text())
KUBERNETES_VERSION = "1.31.0"  # the oldest minor the schemas below are checked against
GRPC_SERVICES = {"auth", "trainer", "registry", "he-runtime"}
CONFIG_OF = {
    "auth": AuthConfig,
    "trainer": TrainerConfig,
    "trainer-worker": TrainerConfig,
    "registry": RegistryConfig,
    "he-runtime": HeRuntimeConfig,
}
SECRET_SETTINGS = {
    "TENSAFE_DATABASE_URL",
    "TENSAFE_SERVICE_API_KEY",
    "TENSAFE_SIGNING_KEY_ENCRYPTION_KEY",
    "TENSAFE_KEK_PKCS11_MODULE",
    "TENSAFE_KEK_PKCS11_TOKEN_LABEL",
    "TENSAFE_KEK_PKCS11_PIN",
}


def render(values: dict[str, Any], *, release: str = "tensafe") -> list[dict[str, Any]]:
    """Every manifest the chart renders for ``values`` (NOTES excluded)."""
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=release, namespace="tensafe", is_install=True)
    documents = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["labels"]["app.kubernetes.io/component"]: doc
        for doc in documents
        if doc["kind"] == kind
    }


def containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def pod_specs(documents: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in documents:
        if doc["kind"] in {"Deployment", "Job", "Pod"}:
            component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
            yield (
                component,
                doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"],
            )


PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor"}
"""Custom resources: kubernetes-validate has no schema for them (checked by shape)."""


def validate_all(documents: list[dict[str, Any]]) -> None:
    """Strict OpenAPI validation of every built-in object (unknown fields are errors)."""
    for doc in documents:
        if doc["kind"] not in PROMETHEUS_OPERATOR_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module", params=["default", "production"])
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render({} if request.param == "default" else PRODUCTION)


def test_the_engine_is_helm_itself() -> None:
    assert helm.helm_sdk_version().startswith("v4.")
    assert helm.lint(str(CHART))["errors"] == []


def test_every_manifest_is_valid_kubernetes(manifests: list[dict[str, Any]]) -> None:
    kinds = sorted(doc["kind"] for doc in manifests)
    assert kinds == (
        ["Deployment"] * 5
        + ["Job", "Pod"]
        + ["PodDisruptionBudget"] * 5
        + ["Service"] * 4
        + ["ServiceAccount"]
    )
    # strict: an unknown field (a typo such as `readOnlyRootFileSystem`) is an error.
    validate_all(manifests)


def test_a_deployment_and_service_per_service_and_workers_apart(
    manifests: list[dict[str, Any]],
) -> None:
    deployments = by_kind(manifests, "Deployment")
    services = by_kind(manifests, "Service")
    assert set(deployments) == GRPC_SERVICES | {"trainer-worker"}
    assert set(services) == GRPC_SERVICES
    for name, service in services.items():
        selector = service["spec"]["selector"]
        assert deployments[name]["spec"]["template"]["metadata"]["labels"].items() >= (
            selector.items()
        )
        assert service["spec"]["ports"] == [
            {
                "name": "grpc",
                "port": 50051,
                "targetPort": "grpc",
                "protocol": "TCP",
                "appProtocol": "grpc",
            },
            {
                "name": "metrics",
                "port": 9464,
                "targetPort": "metrics",
                "protocol": "TCP",
                "appProtocol": "http",
            },
        ]
    modules = {
        name: deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        for name, deployment in deployments.items()
    }
    assert modules == {
        "auth": ["tensafe.auth"],
        "trainer": ["tensafe.trainer"],
        "registry": ["tensafe.registry"],
        "he-runtime": ["tensafe.he_runtime"],
        "trainer-worker": ["tensafe.trainer.worker"],
    }


def test_probes_are_native_grpc_probes_on_the_served_port(
    manifests: list[dict[str, Any]],
) -> None:
    for name, deployment in by_kind(manifests, "Deployment").items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        if name == "trainer-worker":
            # No gRPC: only the metrics port, and a heartbeat-file liveness probe.
            assert [p["name"] for p in container["ports"]] == ["metrics"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert container["livenessProbe"]["exec"]["command"] == [
                "python",
                "-m",
                "tensafe.common.heartbeat",
                env["TENSAFE_HEARTBEAT_FILE"],
                "--max-age",
                "60",
            ]
            assert "readinessProbe" not in container
            continue
        port = container["ports"][0]["containerPort"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (name, probe)
            assert set(container[probe]) & {"httpGet", "exec", "tcpSocket"} == set()


def test_pods_run_non_root_on_a_read_only_root_with_requests(
    manifests: list[dict[str, Any]],
) -> None:
    seen = set()
    for component, spec in pod_specs(manifests):
        seen.add(component)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["automountServiceAccountToken"] is False
        for container in containers(spec):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, (component, container["name"])
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if not container["name"].startswith("install-"):
                assert "/tmp" in mounts, "the read-only root needs a writable /tmp"
    assert seen == GRPC_SERVICES | {"trainer-worker", "migrate", "test-health"}


def test_secrets_are_referenced_never_inlined(manifests: list[dict[str, Any]]) -> None:
    assert not [doc for doc in manifests if doc["kind"] == "Secret"]
    referenced = set()
    for component, spec in pod_specs(manifests):
        for container in containers(spec):
            for env in container.get("env", []):
                if env["name"] in SECRET_SETTINGS:
                    assert "value" not in env, (component, env["name"])
                    referenced.add(env["valueFrom"]["secretKeyRef"]["name"])
        for volume in spec["volumes"]:
            if "secret" in volume:
                referenced.add(volume["secret"]["secretName"])
    assert {
        "tensafe-auth-kek",
        "tensafe-service-api-keys",
        "tensafe-registry-signing-key",
        "tensafe-dataset-kek",
        "tensafe-trainer-signing-key",
    } <= referenced
    # The PKCS#11 token's module, label and PIN (default and production Secret names).
    assert referenced & {"tensafe-pkcs11", "tensafe-prod-hsm"}


def test_every_setting_the_chart_sets_is_a_real_config_field(
    manifests: list[dict[str, Any]],
) -> None:
    for component, spec in pod_specs(manifests):
        if component in ("migrate", "test-health"):
            continue
        known = {name for name, _, _ in describe(CONFIG_OF[component])}
        env = {e["name"] for e in spec["containers"][0]["env"]}
        assert env - known == set(), component
        required = {
            name for name, default, _ in describe(CONFIG_OF[component]) if default == "(required)"
        }
        assert required <= env, component


def test_external_postgres_and_nats_come_from_values() -> None:
    documents = render(PRODUCTION)
    worker = by_kind(documents, "Deployment")["trainer-worker"]
    env = {e["name"]: e for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TENSAFE_NATS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "tensafe-prod-nats",
        "key": "url",
    }
    assert env["TENSAFE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "tensafe-prod-postgresql",
        "key": "trainer-url",
    }
    plain = render({"nats": {"url": "nats://jetstream.messaging:4222"}})
    auth = by_kind(plain, "Deployment")["auth"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "TENSAFE_NATS_URL", "value": "nats://jetstream.messaging:4222"} in auth["env"]


def _env_and_mounts(deployment: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {m["mountPath"]: claims.get(m["name"], "") for m in container["volumeMounts"]}
    return env, mounts


def _secret_env(deployment: dict[str, Any]) -> dict[str, tuple[str, str]]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container["env"]
        if "valueFrom" in e
    }


def test_the_trainer_and_the_registry_share_the_pkcs11_token() -> None:
    deployments = by_kind(render(PRODUCTION), "Deployment")
    token = {
        "TENSAFE_KEK_PKCS11_MODULE": ("tensafe-prod-hsm", "module"),
        "TENSAFE_KEK_PKCS11_TOKEN_LABEL": ("tensafe-prod-hsm", "token-label"),
        "TENSAFE_KEK_PKCS11_PIN": ("tensafe-prod-hsm", "pin"),
    }
    for name in ("registry", "trainer", "trainer-worker"):
        env, mounts = _env_and_mounts(deployments[name])
        assert env["TENSAFE_KEK_PROVIDER"] == "pkcs11", name
        assert token.items() <= _secret_env(deployments[name]).items(), name
        # No KEK folder and no KEK volume: the keys never leave the token.
        assert "TENSAFE_KEK_DIR" not in env and "TENSAFE_REGISTRY_KEK_DIR" not in env
        assert "/var/lib/tensafe-keks" not in mounts
    # The HE runtime holds no KEK: the registry unwraps one data key per load for it.
    he_env, _ = _env_and_mounts(deployments["he-runtime"])
    assert not {k for k in he_env if k.startswith("TENSAFE_KEK")}
    # Both pin the same trust list of signers, from a ConfigMap (not from each other).
    registry_env, _ = _env_and_mounts(deployments["registry"])
    trust_file = "/etc/tensafe/trust-list/trust-list.json"
    assert he_env["TENSAFE_TRUST_LIST_FILE"] == trust_file
    assert registry_env["TENSAFE_REGISTRY_TRUST_LIST_FILE"] == trust_file
    for name in ("registry", "he-runtime"):
        volumes = deployments[name]["spec"]["template"]["spec"]["volumes"]
        assert {"name": "trust-list", "configMap": {"name": "tensafe-trust-list"}} in volumes
    local = by_kind(render({**DEV_VALUES, "kekProvider": "local-file"}), "Deployment")
    env, mounts = _env_and_mounts(local["registry"])
    assert env["TENSAFE_KEK_PROVIDER"] == "local-file"
    assert env["TENSAFE_REGISTRY_KEK_DIR"] in mounts
    assert "TENSAFE_KEK_PKCS11_PIN" not in _secret_env(local["registry"])


def test_the_trainer_publishes_to_the_registry() -> None:
    deployments = by_kind(render(PRODUCTION), "Deployment")
    registry_env, _ = _env_and_mounts(deployments["registry"])
    assert registry_env["TENSAFE_REGISTRY_TRUSTED_SIGNING_KEY_FILES"] == (
        "/etc/tensafe/trusted-keys/trainer-2026.pub.pem,"
        "/etc/tensafe/trusted-keys/trainer-2025.pub.pem"
    )
    for name in ("trainer", "trainer-worker"):
        env, mounts = _env_and_mounts(deployments[name])
        assert env["TENSAFE_REGISTRY_URL"] == "tensafe-registry:50051"
        assert mounts[env["TENSAFE_BASE_MODELS_DIR"]] == "tensafe-base-models"
        assert env["TENSAFE_TRAINER_SIGNING_KEY_FILE"].startswith("/var/run/tensafe/keys/")
        init = deployments[name]["spec"]["template"]["spec"]["initContainers"]
        installed = {c["command"][-1] for c in init}
        assert installed == {
            env["TENSAFE_TRAINER_SIGNING_KEY_FILE"],
            env["TENSAFE_DATASET_KEK_FILE"],
        }
        assert all(c["command"][:3] == ["install", "-m", "0600"] for c in init)
    # The HE runtime loads adapters from the registry, which lets it act for tenants.
    he_env, _ = _env_and_mounts(deployments["he-runtime"])
    assert he_env["TENSAFE_REGISTRY_URL"] == "tensafe-registry:50051"
    assert registry_env["TENSAFE_REGISTRY_ACTING_SERVICE_PRINCIPALS"] == (
        "prn-7c1e2f9a0b3d4e5f,prn-0a9b8c7d6e5f4a3b"
    )
    assert registry_env["TENSAFE_REGISTRY_PLATFORM_TENANT_ID"] == "tnt-platform"
    unpublished = by_kind(render({"publishing": {"enabled": False}}), "Deployment")
    env, _ = _env_and_mounts(unpublished["trainer-worker"])
    assert "TENSAFE_REGISTRY_URL" not in env and "TENSAFE_KEK_PROVIDER" not in env


def test_he_runtime_evaluation_cores_is_set_only_when_given() -> None:
    """Empty keeps the runtime's default (one per core it sees); a number is passed as
    TENSAFE_EVALUATION_CORES, which the HE runtime's config parses back."""
    default_env, _ = _env_and_mounts(by_kind(render({}), "Deployment")["he-runtime"])
    assert "TENSAFE_EVALUATION_CORES" not in default_env
    deployments = by_kind(render({"heRuntime": {"evaluationCores": 4}}), "Deployment")
    env, _ = _env_and_mounts(deployments["he-runtime"])
    assert env["TENSAFE_EVALUATION_CORES"] == "4"
    assert "TENSAFE_EVALUATION_CORES" in {row[0] for row in describe(HeRuntimeConfig)}
    for name in ("auth", "trainer", "registry"):
        other, _ = _env_and_mounts(deployments[name])
        assert "TENSAFE_EVALUATION_CORES" not in other, name


def test_workers_scale_independently_of_the_api() -> None:
    documents = render({"trainer": {"replicas": 1}, "trainerWorker": {"replicas": 7}})
    deployments = by_kind(documents, "Deployment")
    assert deployments["trainer"]["spec"]["replicas"] == 1
    assert deployments["trainer-worker"]["spec"]["replicas"] == 7


def test_migrations_run_in_a_pre_install_and_pre_upgrade_hook(
    manifests: list[dict[str, Any]],
) -> None:
    (job,) = [doc for doc in manifests if doc["kind"] == "Job"]
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    commands = [c["command"] for c in spec["containers"]]
    assert commands == [
        ["python", "/opt/tensafe/migrate.py", service]
        for service in ("auth", "he_runtime", "registry", "trainer")
    ]
    names = [c["name"] for c in spec["containers"]]
    assert names == ["migrate-auth", "migrate-he-runtime", "migrate-registry", "migrate-trainer"]
    he_env = {e["name"]: e for e in spec["containers"][1]["env"]}
    database_url = he_env["TENSAFE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert database_url["key"] == "he-runtime-url"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"grpcPort": "grpc"}, "grpcPort"),
        ({"trainerWorker": {"replicas": -1}}, "replicas"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"nats": {"url": "http://nats:4222"}}, "url"),
        ({"auht": {"replicas": 1}}, "auht"),
        # null deletes a default in Helm: a request without memory is refused.
        ({"auth": {"resources": {"requests": {"memory": None}}}}, "memory"),
        ({"auth": {"extraEnv": [{"name": "PATH", "value": "/"}]}}, "name"),
        ({"otel": {"exporter": "otlp"}}, "otel.endpoint is required"),
        (
            {"secrets": {"datasetKek": {"existingSecret": "", "key": "k"}}},
            "secrets.datasetKek.existingSecret is required",
        ),
        (
            {"trainer": {"baseModels": {"existingClaim": ""}}},
            "trainer.baseModels.existingClaim is required",
        ),
        (
            {"registry": {"trustedSigningKeys": {"keys": []}}},
            "registry.trustedSigningKeys (existingConfigMap and keys) is required",
        ),
        ({"kekProvider": "local-file"}, "kekProvider=local-file keeps KEKs in plain files"),
        ({"kekProvider": "vault"}, "kekProvider"),
        (
            {"secrets": {"pkcs11": {"existingSecret": "", "keys": {}}}},
            "secrets.pkcs11.existingSecret is required",
        ),
        (
            {"trustList": {"existingConfigMap": "", "key": "k"}},
            "trustList.existingConfigMap is required",
        ),
        (
            {"registry": {"actingServicePrincipals": ["prn-1"]}},
            "registry.platformTenantId is required",
        ),
        (
            {"registry": {"persistence": {"existingClaim": ""}}},
            "registry.persistence.existingClaim is required",
        ),
        (
            {"heRuntime": {"persistence": {"existingClaim": ""}}},
            "heRuntime.persistence.existingClaim is required",
        ),
        (
            {
                "trainerWorker": {
                    "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}
                }
            },
            "trainerWorker.autoscaling.minReplicas must not exceed maxReplicas",
        ),
        ({"heRuntime": {"evaluationCores": 0}}, "evaluationCores"),
        ({"heRuntime": {"evaluationCores": "all"}}, "evaluationCores"),
        ({"auth": {"evaluationCore": 2}}, "evaluationCore"),
        ({"metrics": {"port": 0}}, "port"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
        ({"podDisruptionBudget": {"maxUnavailable": 0}}, "maxUnavailable"),
        ({"networkPolicy": {"enabeld": True}}, "enabeld"),
        ({"auth": {"nodeSelector": {"disk": 1}}}, "nodeSelector"),
        ({"trainerWorker": {"heartbeatMaxAgeSeconds": 5}}, "heartbeatMaxAgeSeconds"),
    ],
)
def test_bad_values_fail_the_render_naming_the_value(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


DEV_VALUES: dict[str, Any] = {
    "devMode": True,
    "kekProvider": "local-file",
    "secrets": {
        "authKeyEncryption": {"existingSecret": "", "key": "k"},
        "serviceApiKeys": {
            "existingSecret": "",
            "keys": {"trainer": "t", "registry": "r", "heRuntime": "h"},
        },
        "registrySigningKey": {"existingSecret": "", "key": "k"},
        "datasetKek": {"existingSecret": "", "key": "k"},
    },
    "trainer": {"persistence": {"existingClaim": ""}, "baseModels": {"existingClaim": ""}},
    "registry": {"persistence": {"existingClaim": ""}},
    "heRuntime": {"persistence": {"existingClaim": ""}},
}


def test_dev_mode_renders_without_secrets_or_claims() -> None:
    documents = render({**DEV_VALUES, "keks": {"existingClaim": ""}})
    validate_all(documents)
    registry = by_kind(documents, "Deployment")["registry"]["spec"]["template"]["spec"]
    assert "initContainers" not in registry
    assert {"name": "data", "emptyDir": {}} in registry["volumes"]
    env = registry["containers"][0]["env"]
    assert {"name": "TENSAFE_DEV_MODE", "value": "1"} in env


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{path}.")
        else:
            yield path


def test_every_value_is_documented_with_a_param_line() -> None:
    text = (CHART / "values.yaml").read_text()
    documented = set(re.findall(r"^## @param (\S+) \S", text, flags=re.MULTILINE))
    values = yaml.safe_load(text)
    for leaf in _leaves(values):
        parts = leaf.split(".")
        ancestors = {".".join(parts[: i + 1]) for i in range(len(parts))}
        assert ancestors & documented, f"{leaf} has no ## @param line"
    leaves = set(_leaves(values))
    for name in documented:
        assert any(leaf == name or leaf.startswith(f"{name}.") for leaf in leaves), (
            f"## @param {name} documents no value"
        )


def test_the_schema_describes_every_top_level_value() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_config_classes_are_dataclasses() -> None:
    # The env-name check above relies on describe() listing every field.
    for config in set(CONFIG_OF.values()):
        assert dataclasses.is_dataclass(config)


def test_he_sessions_keys_live_on_a_claim(manifests: list[dict[str, Any]]) -> None:
    # HE sessions are rows plus Galois-key files (docs/he.md §2): the files must outlive
    # a pod, so the runtime's data folder is the claim, not an emptyDir.
    spec = by_kind(manifests, "Deployment")["he-runtime"]["spec"]["template"]["spec"]
    (data,) = [v for v in spec["volumes"] if v["name"] == "data"]
    assert data == {
        "name": "data",
        "persistentVolumeClaim": {"claimName": "tensafe-he-runtime-data"},
    }


COMPONENTS = GRPC_SERVICES | {"trainer-worker"}
VALUE_KEYS = {
    "auth": "auth",
    "trainer": "trainer",
    "trainer-worker": "trainerWorker",
    "registry": "registry",
    "he-runtime": "heRuntime",
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


EVERYTHING_ON: dict[str, Any] = {
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "networkPolicy": {
        "enabled": True,
        "clientsFrom": [{"namespaceSelector": {"matchLabels": {"tensafe-client": "yes"}}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        "postgresql": {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
        "nats": {"to": [{"namespaceSelector": {"matchLabels": {"name": "nats"}}}]},
        "extraEgress": [{"ports": [{"port": 4317, "protocol": "TCP"}]}],
    },
}
SCHEDULING: dict[str, Any] = {
    **{
        key: {
            "nodeSelector": {"pool": component},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": component}],
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {
                                    "matchLabels": {"app.kubernetes.io/component": component}
                                },
                            },
                        }
                    ]
                }
            },
            "podAnnotations": {"example.com/owner": component},
        }
        for component, key in VALUE_KEYS.items()
    },
}
EVERYTHING_ON = _merge(
    _merge(EVERYTHING_ON, SCHEDULING),
    {
        "trainerWorker": {
            "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
            "extraEnv": [{"name": "TENSAFE_RESIDENT_CLIENTS", "value": "4"}],
        }
    },
)


@pytest.mark.parametrize("base", ["default", "production"])
def test_every_new_value_on_renders_valid_objects(base: str) -> None:
    values = _merge({} if base == "default" else PRODUCTION, EVERYTHING_ON)
    documents = render(values)
    validate_all(documents)
    deployments = by_kind(documents, "Deployment")

    # Scheduling and annotations land on each component's pods.
    for component in COMPONENTS:
        template = deployments[component]["spec"]["template"]
        spec = template["spec"]
        assert spec["nodeSelector"] == {"pool": component}
        assert spec["tolerations"][0]["value"] == component
        assert "podAntiAffinity" in spec["affinity"]
        assert template["metadata"]["annotations"] == {"example.com/owner": component}

    # One PDB per component, selecting exactly its pods.
    budgets = by_kind(documents, "PodDisruptionBudget")
    assert set(budgets) == COMPONENTS
    for component, budget in budgets.items():
        assert budget["spec"]["maxUnavailable"] == 1
        labels = deployments[component]["spec"]["template"]["metadata"]["labels"]
        assert labels.items() >= budget["spec"]["selector"]["matchLabels"].items()

    # The HPA owns the worker count; the Deployment no longer pins replicas.
    (hpa,) = [d for d in documents if d["kind"] == "HorizontalPodAutoscaler"]
    worker = deployments["trainer-worker"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in worker["spec"]
    worker_env = [e["name"] for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert worker_env[-1] == "TENSAFE_RESIDENT_CLIENTS"

    # Prometheus Operator objects, by shape (no OpenAPI schema for custom resources).
    monitors = {d["kind"]: d for d in documents if d["kind"] in PROMETHEUS_OPERATOR_KINDS}
    assert set(monitors) == PROMETHEUS_OPERATOR_KINDS
    for monitor in monitors.values():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitors["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitors["PodMonitor"]["spec"]["selector"]["matchLabels"] == {
        k: v for k, v in worker["spec"]["selector"]["matchLabels"].items()
    }


def _peers_of(rule: dict[str, Any]) -> list[str]:
    """The components a rule's pod selectors name (``*`` for the whole release)."""
    names = []
    for peer in rule.get("to", rule.get("from", [])):
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        if labels:
            names.append(labels.get("app.kubernetes.io/component", "*"))
    return names


def test_network_policies_allow_only_the_architecture_paths() -> None:
    policies = by_kind(render(EVERYTHING_ON), "NetworkPolicy")
    assert set(policies) == COMPONENTS
    for component, policy in policies.items():
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        ingress = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
        egress = [peer for rule in policy["spec"]["egress"] for peer in _peers_of(rule)]
        # Everyone reaches auth (tokens, revocations) but auth itself; only the
        # trainer, its workers and the HE runtime reach the registry.
        expected = set()
        if component != "auth":
            expected.add("auth")
        if component in ("trainer", "trainer-worker", "he-runtime"):
            expected.add("registry")
        assert set(egress) == expected, component
        ports = [rule["ports"][0]["port"] for rule in policy["spec"]["egress"]]
        assert {53, 5432, 4222, 4317} <= set(ports)
        # Scrapers reach the metrics port; workers accept nothing else.
        assert ingress["metrics"]["from"] == [
            {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
        ]
        if component == "trainer-worker":
            assert set(ingress) == {"metrics"}
            continue
        callers = _peers_of(ingress["grpc"])
        assert "test-health" in callers
        if component == "auth":
            assert "*" in callers
        if component == "registry":
            assert {"trainer", "trainer-worker", "he-runtime"} <= set(callers)


def test_new_values_off_render_nothing_of_theirs() -> None:
    documents = render(
        {
            "metrics": {"enabled": False},
            "podDisruptionBudget": {"enabled": False},
            "tests": {"enabled": False},
        }
    )
    validate_all(documents)
    kinds = {doc["kind"] for doc in documents}
    assert kinds == {"Deployment", "Job", "Service", "ServiceAccount"}
    for _component, spec in pod_specs(documents):
        for container in spec["containers"]:
            assert "TENSAFE_METRICS_PORT" not in {e["name"] for e in container.get("env", [])}
            assert all(p["name"] != "metrics" for p in container.get("ports", []))
    for service in by_kind(documents, "Service").values():
        assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]
    # Metrics on, ServiceMonitor off (the default): no custom resources to install.
    assert not PROMETHEUS_OPERATOR_KINDS & {doc["kind"] for doc in render({})}


@pytest.mark.parametrize("tls", [False, True])
def test_helm_test_checks_every_service_health(tls: bool) -> None:
    documents = render({"tls": {"enabled": tls}})
    validate_all(documents)
    (pod,) = [d for d in documents if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[0] == "tensafe.common.healthcheck"
    assert args[-4:] == [
        f"tensafe-{name}:50051" for name in ("auth", "trainer", "registry", "he-runtime")
    ]
    assert ("--tls-dir" in args) is tls
    services = {s["metadata"]["name"] for s in by_kind(documents, "Service").values()}
    assert {a.split(":")[0] for a in args[-4:]} == services


def test_the_chart_readme_is_generated_from_the_param_lines() -> None:
    import importlib.util

    path = ROOT / "scripts" / "gen_chart_readme.py"
    spec = importlib.util.spec_from_file_location("gen_chart_readme", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (CHART / "README.md").read_text()
    assert module.generate() == readme, "run python scripts/gen_chart_readme.py"
    assert "| `trainerWorker.autoscaling.enabled` |" in readme
    assert "| `metrics.port` | Container (and Service) port of /metrics | `9464` |" in readme
