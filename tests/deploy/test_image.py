"""The Dockerfile passes hadolint, pins what it installs and matches the Kubernetes manifests."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.toolchain import DEPLOY, REPO, find, find_tool, run

DOCKERFILE = REPO / "Dockerfile"
CONSTRAINTS = DEPLOY / "docker" / "constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned with ==: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [Requirement(r) for r in project["project"]["dependencies"]]


def _stage(name: str) -> str:
    """The instructions of one build stage of the Dockerfile (without comments)."""
    text = DOCKERFILE.read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    assert match, f"no stage {name}"
    return "".join(line for line in match.group(1).splitlines(True) if not line.startswith("#"))


def test_dockerfile_passes_hadolint() -> None:
    result = run([find_tool("hadolint"), str(DOCKERFILE)], cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_constraints_pin_every_dependency_within_pyproject_bounds() -> None:
    pins = _pins()
    wanted = _project_requirements()
    for requirement in wanted:
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin, f"{requirement.name} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pin, prereleases=True), (requirement, pin)
    assert "setuptools" in pins and "wheel" in pins  # the build backend, pinned as well
    # ... and the whole runtime closure (as installed here), not only the direct dependencies
    seen: set[str] = set()
    todo = [r for r in wanted if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"{name} (needed by the guard) is not pinned in {CONSTRAINTS.name}"
        for text in importlib.metadata.requires(requirement.name) or []:
            child = Requirement(text)
            if child.marker is None or child.marker.evaluate({"extra": ""}):
                todo.append(child)


def test_image_runs_the_guard_as_the_manifests_expect(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    guard = _stage("guard")
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", guard, re.M).group(1)
    cmd = re.search(r"^CMD (\[.*\])$", guard, re.M).group(1)
    assert entrypoint == '["guard-server"]'
    deployment = find(rendered["overlays/prod"], "Deployment", "guard")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert cmd == "[" + ", ".join(f'"{a}"' for a in container["args"]) + "]"
    # a numeric non-root user, so that runAsNonRoot can verify it
    user = re.search(r"^USER (\d+):(\d+)$", guard, re.M)
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert user and int(user.group(1)) == pod_security["runAsUser"] != 0
    assert "/healthz" in re.search(r"^HEALTHCHECK .*?CMD (.*)$", guard, re.M | re.S).group(1)
    assert re.search(r"^EXPOSE 8080$", guard, re.M)
    for label in ("title", "version", "revision", "licenses", "description"):
        assert f"org.opencontainers.image.{label}=" in guard
    # the guard image has neither vLLM nor torch
    build = _stage("build")
    assert "vllm" not in build.lower() and "torch" not in build.lower()
    assert "PIP_CONSTRAINT=/src/deploy/docker/constraints.txt" in build


def test_base_image_is_pinned_and_build_context_holds_every_copied_path() -> None:
    text = DOCKERFILE.read_text()
    image = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for source in sources.split():
            assert (REPO / source).exists() or source.startswith("guard_server"), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), source
