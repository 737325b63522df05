"""The commands in the recipes are the real ones: each is started here, as the container runs it.

Read from deploy/: every Dockerfile's ENTRYPOINT + CMD, every container of the Kubernetes recipe
(rendered as test_deploy_k8s renders it: command/args over the image's entrypoint/cmd as the
kubelet combines them, $(VAR) expanded from the env, ConfigMaps and the Secret) and every
compose service (its command over its image's entrypoint, its mounted config files, its
healthcheck). Only what cannot be the same on this machine is substituted, and nothing else:

- `--host` → 127.0.0.1 and `--port` → a free port (the probe/healthcheck port is checked
  against the original first);
- `--model` / `--model.policy.path` naming a path absent here → a tiny local model;
- `--backend vllm` → transformers (vLLM is not installed here; every flag is still parsed by the
  same CLI), and `workers=N` → `workers=1` (2 cores);
- files the container mounts (a ConfigMap, a compose config) → the same text in a temporary file.

Each server must print `listening on`, pass the gRPC health check of the service its probe
names (without a token, as Kubernetes probes), require the token when the recipe sets one, pass
the compose healthcheck command (deploy/rpp_health.py, installed as rpp-health), and exit 0
after SIGTERM with its drain logged. The trainer's commands are parsed by torchrun's own parser
and `rpp-train ... --print_config`. A flag renamed in the code fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_port
from test_deploy_images import DEPLOY, DOCKERFILES, dockerfile_command
from test_deploy_k8s import by_kind, optional_resources, pod_spec, render

from rpp_lightning.clients.local_servers import ChildServer
from rpp_lightning.rpc.channels import ChannelConfig, wait_until_serving

TOKEN = "deploy-test-token"


@dataclass
class Recipe:
    origin: str
    argv: list[str]
    """The container's process, as it would start (variables expanded)."""
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    """Container path → text of the files mounted into the container."""
    probe: tuple[int, str] | None = None
    """(port, service) of the Kubernetes probes."""
    healthcheck: list[str] | None = None
    """The compose healthcheck command."""

    @property
    def is_trainer(self) -> bool:
        return self.argv[0] in ("torchrun", "rpp-train")


def image_dockerfile(image: str) -> Path:
    """deploy/<x>.Dockerfile of image rpp-<x> (a registry, a tag or ${VAR:-default} around it)."""
    default = re.fullmatch(r"\$\{\w+:-(.+)\}", image)
    name = (default[1] if default else image).rsplit("/", 1)[-1].split(":")[0]
    path = DEPLOY / f"{name.removeprefix('rpp-')}.Dockerfile"
    assert path.is_file(), f"image {image}: no {path.name} in deploy/"
    return path


def expand(values: list[str], env: dict[str, str]) -> list[str]:
    """$(VAR) as the kubelet expands it in command and args."""
    pattern = r"\$\(([A-Za-z_]\w*)\)"
    return [re.sub(pattern, lambda m: env.get(m[1], m[0]), value) for value in values]


def interpolate(value: str, env: dict[str, str]) -> str:
    """${VAR}, ${VAR:-default} and ${VAR:?error} as compose interpolates them."""

    def one(match: re.Match) -> str:
        name, op, arg = match[1], match[2], match[3]
        if env.get(name):
            return env[name]
        assert op != ":?", f"compose would stop: {arg}"
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


def dockerfile_recipes() -> list[Recipe]:
    recipes = []
    for path in DOCKERFILES:
        entrypoint, cmd = dockerfile_command(path)
        recipes.append(Recipe(f"{path.name} ENTRYPOINT+CMD", entrypoint + cmd))
    return recipes


def k8s_recipes() -> list[Recipe]:
    objects = render() + optional_resources()
    config_maps = {name: cm["data"] for name, cm in by_kind(objects, "ConfigMap").items()}
    recipes = []
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            entrypoint, cmd = dockerfile_command(image_dockerfile(container["image"]))
            command, args = container.get("command"), container.get("args")
            if command is None:  # the kubelet's rule: args replace CMD, command replaces both
                argv = entrypoint + (cmd if args is None else args)
            else:
                argv = command + (args or [])
            env = {}
            for item in container.get("env", []):
                source = item.get("valueFrom", {})
                if "value" in item:
                    env[item["name"]] = item["value"]
                elif "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    env[item["name"]] = config_maps[ref["name"]][ref["key"]]
                elif "secretKeyRef" in source:
                    env[item["name"]] = TOKEN
                elif "fieldRef" in source:
                    env[item["name"]] = "0"
            files = {}
            for mount in container.get("volumeMounts", []):
                config_map = volumes[mount["name"]].get("configMap")
                if config_map:
                    for key, text in config_maps[config_map["name"]].items():
                        files[f"{mount['mountPath']}/{key}"] = text
            probe = container.get("readinessProbe", {}).get("grpc")
            recipes.append(
                Recipe(
                    f"k8s {obj['kind']} {obj['metadata']['name']}",
                    expand(argv, env),
                    env,
                    files,
                    (probe["port"], probe["service"]) if probe else None,
                )
            )
    return recipes


def compose_recipes() -> list[Recipe]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    shell = {"RPP_TOKEN": TOKEN}
    recipes = []
    for name, service in compose["services"].items():
        entrypoint, cmd = dockerfile_command(image_dockerfile(service["image"]))
        argv = service.get("entrypoint", entrypoint) + service.get("command", cmd)
        env = {k: interpolate(str(v), shell) for k, v in service.get("environment", {}).items()}
        files = {
            config["target"]: (DEPLOY / compose["configs"][config["source"]]["file"]).read_text()
            for config in service.get("configs", [])
        }
        test = service.get("healthcheck", {}).get("test")
        recipes.append(Recipe(f"compose {name}", argv, env, files, healthcheck=test and test[1:]))
    return recipes


RECIPES = dockerfile_recipes() + k8s_recipes() + compose_recipes()
SERVERS = [r for r in RECIPES if not r.is_trainer]
TRAINERS = [r for r in RECIPES if r.is_trainer]


def _replace_flag(argv: list[str], flag: str, value: str) -> str | None:
    if flag not in argv:
        return None
    i = argv.index(flag) + 1
    old, argv[i] = argv[i], value
    return old


def _local_files(recipe: Recipe, argv: list[str], tmp: Path) -> list[str]:
    tmp = tmp / re.sub(r"\W+", "-", recipe.origin)
    tmp.mkdir()
    for target, text in recipe.files.items():
        local = tmp / target.lstrip("/").replace("/", "_")
        local.write_text(text)
        argv = [str(local) if a == target else a for a in argv]
    return argv


@dataclass
class Started:
    recipe: Recipe
    server: ChildServer | None = None
    port: int = 0
    original_port: int = 0
    trainer: subprocess.Popen | None = None
    printed: str = ""


def _start_server(recipe: Recipe, tiny_lm: Path, tiny_rm: Path, tmp: Path) -> Started:
    argv = _local_files(recipe, list(recipe.argv), tmp)
    port = free_port()
    original_port = int(_replace_flag(argv, "--port", str(port)))
    _replace_flag(argv, "--host", "127.0.0.1")
    model = _replace_flag(argv, "--model", "")
    if model is not None:
        tiny = tiny_rm if "preference" in argv else tiny_lm
        _replace_flag(argv, "--model", model if (ROOT / model).exists() else str(tiny))
    if _replace_flag(argv, "--backend", "transformers") not in (None, "vllm", "transformers"):
        raise AssertionError(f"{recipe.origin}: unknown backend")
    argv = [re.sub(r"^workers=\d+$", "workers=1", a) for a in argv]
    script = shutil.which(argv[0])
    assert script, f"{recipe.origin}: {argv[0]} is not an installed console script"
    server = ChildServer(
        [script, *argv[1:]], name=recipe.origin, env=recipe.env, start_timeout_s=180,
        cwd=str(ROOT), wait=False,
    )  # fmt: skip
    return Started(recipe, server=server, port=port, original_port=original_port)


def _start_trainer(recipe: Recipe, tiny_lm: Path, tmp: Path) -> Started:
    argv = _local_files(recipe, list(recipe.argv), tmp)
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        torchrun = get_args_parser().parse_args(argv[1:])
        assert torchrun.module and torchrun.training_script == "rpp_lightning.cli"
        argv = ["rpp-train", *torchrun.training_script_args]
    policy = _replace_flag(argv, "--model.policy.path", "")
    if policy is not None:
        local = policy if (ROOT / policy).exists() else str(tiny_lm)
        _replace_flag(argv, "--model.policy.path", local)
    process = subprocess.Popen(
        [shutil.which("rpp-train"), *argv[1:], "--print_config"],
        cwd=ROOT,
        env={**os.environ, **recipe.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Started(recipe, trainer=process)


@pytest.fixture(scope="module")
def started(tiny_lm_path, tiny_classifier_path, tmp_path_factory):
    """Every recipe's process, started at once (each spends seconds importing)."""
    tmp = tmp_path_factory.mktemp("deploy-files")
    runs: dict[str, Started] = {}
    try:
        for recipe in SERVERS:
            runs[recipe.origin] = _start_server(recipe, tiny_lm_path, tiny_classifier_path, tmp)
        for recipe in TRAINERS:
            runs[recipe.origin] = _start_trainer(recipe, tiny_lm_path, tmp)
        yield runs
    finally:
        for run in runs.values():
            if run.server is not None:
                run.server.stop(timeout_s=10)
            if run.trainer is not None and run.trainer.poll() is None:
                run.trainer.kill()
                run.trainer.wait()


def test_every_recipe_is_found():
    origins = [r.origin for r in RECIPES]
    expected = [
        "math.Dockerfile ENTRYPOINT+CMD",
        "preference.Dockerfile ENTRYPOINT+CMD",
        "trainer.Dockerfile ENTRYPOINT+CMD",
        "k8s Deployment rpp-math",
        "k8s Deployment rpp-generation",
        "k8s Job rpp-trainer",
        "k8s Deployment rpp-preference",
        "compose math",
        "compose generation",
        "compose trainer",
    ]
    assert sorted(origins) == sorted(expected)


@pytest.mark.parametrize("recipe", SERVERS, ids=lambda r: r.origin)
def test_server_command_serves_health_and_stops_on_sigterm(started, recipe):
    run = started[recipe.origin]
    server = run.server
    server.wait_ready()  # its `listening on HOST:PORT` line, or a failure with its output
    assert server.address == f"127.0.0.1:{run.port}"
    service = ""
    if recipe.probe is not None:
        probe_port, service = recipe.probe
        assert probe_port == run.original_port, "the probe checks another port"
    # no token: the probes of Kubernetes and compose send none
    wait_until_serving(ChannelConfig(addresses=[server.address]), timeout_s=60, service=service)
    if "--token-env" in recipe.argv:
        assert "bearer token" in server.text and TOKEN not in server.text
    if recipe.healthcheck is not None:
        assert recipe.healthcheck[0] == "rpp-health"
        target = recipe.healthcheck[1]
        assert target == f"127.0.0.1:{run.original_port}", "the healthcheck checks another port"
        check = [sys.executable, str(DEPLOY / "rpp_health.py"), server.address]
        done = subprocess.run(
            check + recipe.healthcheck[2:], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0 and "SERVING" in done.stdout, done.stdout + done.stderr
    server.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=45) == 0, server.text[-3000:]
    assert "draining" in server.text and "stopped" in server.text


@pytest.mark.parametrize("recipe", TRAINERS, ids=lambda r: r.origin)
def test_trainer_command_parses(started, recipe):
    run = started[recipe.origin]
    out, _ = run.trainer.communicate(timeout=180)
    assert run.trainer.returncode == 0, out[-3000:]
    printed = yaml.safe_load(out[out.index("seed_everything") :])
    config_file = next(iter(recipe.files.values()))
    model = yaml.safe_load(config_file)["model"]
    assert printed["model"]["generation"]["addresses"] == model["generation"]["addresses"]
    printed_rewards = [s["addresses"] for s in printed["model"]["rewards"]]
    assert printed_rewards == [s["addresses"] for s in model["rewards"]]
    assert Path(printed["model"]["policy"]["path"]).exists()
