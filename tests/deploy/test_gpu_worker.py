"""Trainer workers on GPU nodes: the chart accepts `nvidia.com/gpu` resources, node
selection, tolerations, affinity and a worker image of its own (the CUDA variant), renders
them on the worker Deployment only as valid Kubernetes, and refuses values Kubernetes
would refuse later or a scheduler would silently ignore."""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import pytest
import yaml

from .test_helm_chart import CHART, PRODUCTION, _merge, by_kind, render, validate_all

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
GPU_NODE: dict[str, Any] = {
    "trainerWorker": {
        "image": {"tag": "0.1.0-cu128"},
        "resources": {
            "requests": {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": 1},
            "limits": {"memory": "48Gi", "nvidia.com/gpu": 1},
        },
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "nvidia.com/gpu.product",
                                    "operator": "In",
                                    "values": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"],
                                }
                            ]
                        }
                    ]
                }
            }
        },
        "extraEnv": [{"name": "TENSAFE_DEVICE", "value": "cuda"}],
    }
}


@pytest.mark.parametrize("base", [{}, PRODUCTION], ids=["default", "production"])
def test_gpu_values_render_on_the_worker_only(base: dict[str, Any]) -> None:
    documents = render(_merge(base, GPU_NODE))
    validate_all(documents)
    deployments = by_kind(documents, "Deployment")
    worker = deployments["trainer-worker"]["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    repository = base.get("image", {}).get("repository", "ghcr.io/tensafe/tensafe")
    assert container["image"] == f"{repository}:0.1.0-cu128"
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert worker["tolerations"] == GPU_NODE["trainerWorker"]["tolerations"]
    assert worker["affinity"] == GPU_NODE["trainerWorker"]["affinity"]
    assert {"name": "TENSAFE_DEVICE", "value": "cuda"} in container["env"]
    # The worker's init containers (migrations wait, model checks) need no GPU and keep
    # the chart's image; no other component asks for a GPU or lands on the GPU pool.
    for init in worker.get("initContainers", []):
        assert "nvidia.com/gpu" not in str(init.get("resources", {}))
    for component, deployment in deployments.items():
        if component == "trainer-worker":
            continue
        spec = deployment["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in str(spec), component
        assert all(":0.1.0-cu128" not in c["image"] for c in spec["containers"]), component


def test_a_gpu_limit_alone_is_enough_and_a_digest_pins_the_worker_image() -> None:
    digest = "sha256:" + "a" * 64
    documents = render(
        {
            "trainerWorker": {
                "image": {"tag": "ignored", "digest": digest},
                "resources": {
                    "requests": {"cpu": "2", "memory": "8Gi"},
                    "limits": {"nvidia.com/gpu": "2"},
                },
            }
        }
    )
    validate_all(documents)
    (container,) = by_kind(documents, "Deployment")["trainer-worker"]["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["image"] == f"ghcr.io/tensafe/tensafe@{digest}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    auth = by_kind(documents, "Deployment")["auth"]["spec"]["template"]["spec"]
    assert auth["containers"][0]["image"] == f"ghcr.io/tensafe/tensafe:{APP_VERSION}"


def _requests(**extra: Any) -> dict[str, Any]:
    return {"cpu": "2", "memory": "8Gi", **extra}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # Kubernetes refuses a GPU request without the same limit (no overcommit).
        (
            {"resources": {"requests": _requests(**{"nvidia.com/gpu": 1})}},
            "trainerWorker.resources.limits.nvidia.com/gpu must equal",
        ),
        (
            {
                "resources": {
                    "requests": _requests(**{"nvidia.com/gpu": 2}),
                    "limits": {"nvidia.com/gpu": 1},
                }
            },
            "trainerWorker.resources.limits.nvidia.com/gpu must equal",
        ),
        # Whole GPUs only, as a count.
        ({"resources": {"requests": _requests(), "limits": {"nvidia.com/gpu": 0.5}}}, "gpu"),
        ({"resources": {"requests": _requests(), "limits": {"nvidia.com/gpu": "one"}}}, "gpu"),
        ({"resources": {"requests": _requests(), "limits": {"nvidia.com/gpu": -1}}}, "gpu"),
        # A misspelt resource name would schedule a worker with no GPU at all.
        ({"resources": {"requests": _requests(), "limits": {"nvidia/gpu": 1}}}, "nvidia/gpu"),
        ({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Present"}]}, "operator"),
        ({"tolerations": [{"key": "nvidia.com/gpu", "effect": "NoSchedul"}]}, "effect"),
        ({"tolerations": [{"keys": "nvidia.com/gpu"}]}, "keys"),
        ({"tolerations": {"key": "nvidia.com/gpu"}}, "tolerations"),
        ({"affinity": {"nodeAfinity": {}}}, "nodeAfinity"),
        ({"nodeSelector": {"nvidia.com/gpu.present": True}}, "nodeSelector"),
        ({"image": {"digest": "sha256:short"}}, "digest"),
        ({"image": {"tag": "has space"}}, "tag"),
    ],
)
def test_nonsense_gpu_values_fail_the_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render({"trainerWorker": values})


def test_other_components_get_the_same_scheduling_checks() -> None:
    with pytest.raises(helm.HelmError, match="operator"):
        render({"auth": {"tolerations": [{"key": "k", "operator": "Sometimes"}]}})
    with pytest.raises(helm.HelmError, match="gpuAffinity"):
        render({"registry": {"affinity": {"gpuAffinity": {}}}})
