"""The Kubernetes recipe (deploy/k8s): rendered, schema-checked, and consistent with the code.

`render()` applies the kustomization's fields itself (resources, namespace, images, replicas,
configMapGenerator without name hashes, JSON 6902 patches): the recipe uses only those, so the
suite needs no kustomize. Where `kubectl` is installed, a test checks that `kubectl kustomize`
renders the same objects. Every object is validated against the Kubernetes OpenAPI schemas of
1.29 and 1.37 (`kubernetes-validate`, offline, strict: unknown fields are errors).
test_deploy_commands.py starts each container's command.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT

from rpp_lightning.proto import generation_pb2, reward_pb2

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSIONS = ["1.29.0", "1.37.0"]  # grpc probes, Indexed Jobs: GA long before 1.29
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding"}
HEALTH_SERVICES = {
    "rpp-reward-server": reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name,
    "rpp-generation-server": generation_pb2.DESCRIPTOR.services_by_name[
        "GenerationService"
    ].full_name,
}
"""The service each server CLI registers with grpc.health.v1 (from the proto descriptors)."""


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _json_pointer(doc, path: str) -> tuple[object, str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    last = parts[-1]
    return doc, (int(last) if isinstance(doc, list) and last != "-" else last)


def apply_json6902(obj: dict, operations: list[dict]) -> None:
    """The JSON patch operations the recipe uses: test, replace, add, remove."""
    for op in operations:
        parent, key = _json_pointer(obj, op["path"])
        if op["op"] == "test":
            assert parent[key] == op["value"], f"patch test failed at {op['path']}"
        elif op["op"] == "replace":
            if isinstance(parent, dict) and key not in parent:
                raise KeyError(f"replace: nothing at {op['path']}")
            parent[key] = op["value"]
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else key, op["value"])
            else:
                parent[key] = op["value"]
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise ValueError(f"unsupported patch op {op['op']}")


def pod_spec(obj: dict) -> dict | None:
    return obj.get("spec", {}).get("template", {}).get("spec")


def render(directory: Path = K8S) -> list[dict]:
    """The objects `kubectl kustomize directory` renders, for the fields this recipe uses."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "images", "replicas"}
    known |= {"configMapGenerator", "generatorOptions", "patches"}
    unknown = set(kustomization) - known
    assert not unknown, f"render() does not implement {unknown}: extend it (or use kubectl)"
    assert kustomization.get("generatorOptions", {}).get("disableNameSuffixHash") is True

    objects = [o for r in kustomization["resources"] for o in load_yaml_documents(directory / r)]
    for generator in kustomization.get("configMapGenerator", []):
        data = dict(literal.split("=", 1) for literal in generator.get("literals", []))
        for item in generator.get("files", []):
            key, _, file = item.rpartition("=")
            data[key or Path(file).name] = (directory / file).read_text()
        meta = {"name": generator["name"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    namespace = kustomization.get("namespace")
    images = {i["name"]: i for i in kustomization.get("images", [])}
    replicas = {r["name"]: r["count"] for r in kustomization.get("replicas", [])}
    for obj in objects:
        meta = obj["metadata"]
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = namespace
        if meta["name"] in replicas and obj["kind"] == "Deployment":
            obj["spec"]["replicas"] = replicas[meta["name"]]
        spec = pod_spec(obj)
        for container in (spec or {}).get("containers", []) + (spec or {}).get(
            "initContainers", []
        ):
            name, _, tag = container["image"].partition(":")
            if name in images:
                image = images[name]
                new_tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        for obj in objects:
            if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]:
                apply_json6902(obj, yaml.safe_load(patch["patch"]))
    return objects


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def optional_resources() -> list[dict]:
    """Manifests shipped next to the kustomization but not in its resources (preference.yaml),
    with the kustomization's namespace."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"]) | {"kustomization.yaml", "trainer-config.yaml"}
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name not in listed:
            for obj in load_yaml_documents(path):
                obj["metadata"]["namespace"] = kustomization["namespace"]
                objects.append(obj)
    return objects


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render()


def test_render_equals_kubectl_kustomize(rendered):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: render() alone renders the recipe")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}
    ours = {(o["kind"], o["metadata"]["name"]): o for o in rendered}
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key] == theirs[key], f"{key} differs from kubectl kustomize"


def test_every_manifest_passes_the_kubernetes_schemas(rendered):
    objects = rendered + optional_resources()
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "Job", "ConfigMap"}
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_catches_a_broken_probe(rendered):
    """The check above can fail: a named port in a grpc probe is not in the schema."""
    broken = copy.deepcopy(by_kind(rendered, "Deployment")["rpp-math"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _entrypoint(image: str) -> list[str]:
    """The ENTRYPOINT of deploy/<image without rpp->.Dockerfile (test_deploy_commands reads
    the Dockerfiles the same way)."""
    from test_deploy_images import dockerfile_command

    return dockerfile_command(ROOT / "deploy" / f"{image.removeprefix('rpp-')}.Dockerfile")[0]


@pytest.mark.parametrize("name", ["rpp-math", "rpp-generation", "rpp-preference"])
def test_server_deployment_probes_token_and_headless_service(rendered, name):
    objects = rendered + optional_resources()
    deployment = by_kind(objects, "Deployment")[name]
    service = by_kind(objects, "Service")[name]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    assert service["spec"]["clusterIP"] == "None"  # headless: DNS lists every replica
    assert service["spec"]["selector"].items() <= labels.items()
    argv = container.get("command") or _entrypoint(container["image"].split("/")[-1].split(":")[0])
    argv = argv + container["args"]
    port = int(_flag(argv, "--port"))
    assert _flag(argv, "--host") == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert [p["port"] for p in service["spec"]["ports"]] == [port]

    health_service = HEALTH_SERVICES[Path(argv[0]).name]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": health_service}

    token_env = _flag(argv, "--token-env")
    env = {e["name"]: e for e in container["env"]}
    assert env[token_env]["valueFrom"]["secretKeyRef"] == {"name": "rpp-token", "key": "token"}

    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]
    uses_gpu = "--backend" in argv and _flag(argv, "--backend") == "vllm"
    assert ("nvidia.com/gpu" in resources["limits"]) == uses_gpu
    assert spec["securityContext"]["runAsNonRoot"] is True
    grace = float(_flag(argv, "--grace-s"))
    assert spec["terminationGracePeriodSeconds"] > grace  # the drain ends before SIGKILL


def _expand(values: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in command and args (unknown names are left as they are)."""
    return [
        re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), v) for v in values
    ]


def test_trainer_is_an_indexed_job_running_torchrun_multi_node(rendered):
    from torch.distributed.run import get_args_parser

    job = by_kind(rendered, "Job")["rpp-trainer"]
    service = by_kind(rendered, "Service")["rpp-trainer"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    nodes = job["spec"]["completions"]
    # the three places kustomization.yaml sets the node count agree
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["parallelism"] == nodes
    assert int(env["TRAINER_NODES"]["value"]) == nodes
    index = env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # pod 0 is reachable as <job>-0.<subdomain>, a name the headless Service publishes early
    assert spec["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]

    values = {"TRAINER_NODES": str(nodes), "NODE_RANK": "1", "MODEL_PATH": "/m"}
    argv = _expand(container["command"] + container["args"], values)
    assert argv[0] == "torchrun"
    torchrun = get_args_parser().parse_args(argv[1:])  # a renamed torchrun flag fails here
    assert torchrun.nnodes == str(nodes) and torchrun.module
    assert torchrun.master_addr == f"{job['metadata']['name']}-0.{spec['subdomain']}"
    assert int(torchrun.master_port) == service["spec"]["ports"][0]["port"]
    assert torchrun.training_script == "rpp_lightning.cli"
    assert _flag(torchrun.training_script_args, "--trainer.num_nodes") == str(nodes)
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1 and torchrun.nproc_per_node == "gpu"


def test_trainer_config_points_at_the_rendered_services(rendered):
    """Every dns:/// address of the trainer's config names a headless Service of the recipe,
    in the kustomization's namespace, on the port its server listens on."""
    config_map = by_kind(rendered, "ConfigMap")["rpp-trainer-config"]
    config = yaml.safe_load(config_map["data"]["trainer.yaml"])
    model = config["model"]
    addresses = model["generation"]["addresses"] + [
        a for source in model["rewards"] for a in source["addresses"]
    ]
    services = by_kind(rendered, "Service")
    assert len(addresses) >= 2
    for address in addresses:
        match = re.fullmatch(
            r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", address
        )
        assert match, address
        name, namespace, port = match[1], match[2], int(match[3])
        assert name in services, f"{address}: no Service {name}"
        assert services[name]["metadata"]["namespace"] == namespace
        assert services[name]["spec"]["clusterIP"] == "None"
        assert port in [p["port"] for p in services[name]["spec"]["ports"]]
    assert model["generation"]["token_env"] == "RPP_TOKEN"


def test_images_and_model_path_are_set_in_the_kustomization(rendered):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    registry = {i["newName"] for i in kustomization["images"]}
    images = [c["image"] for o in rendered if pod_spec(o) for c in pod_spec(o)["containers"]]
    assert images and all(image.split(":")[0] in registry for image in images)
    settings = by_kind(rendered, "ConfigMap")["rpp-settings"]["data"]
    users = [
        o["metadata"]["name"]
        for o in rendered
        if pod_spec(o)
        for c in pod_spec(o)["containers"]
        if "$(MODEL_PATH)" in c.get("args", [])
    ]
    assert settings["MODEL_PATH"] and sorted(users) == ["rpp-generation", "rpp-trainer"]
