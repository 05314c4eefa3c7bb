"""The Dockerfile installs the package the README and `make install` install, from the same pins but without
the dev extra, and the deploy/ manifests run the image it builds (parsed, no docker needed)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib  # requires-python >= 3.11
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# apt packages the image adds for its platform, not for vidsift: each with the reason.
IMAGE_ONLY_APT = {"wget": "KubeRay's readiness / liveness probes run wget in the container"}
MANIFESTS = sorted((ROOT / "deploy").glob("*.yaml"))


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def shell_commands(text: str) -> list[list[str]]:
    """Every simple command of a shell text (``&&``, ``;``, ``||`` and ``|`` split it), as argv lists."""
    text = text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                argv = shlex.split(part, comments=True)
            except ValueError:
                continue
            if argv:
                commands.append(argv)
    return commands


def apt_packages(commands: list[list[str]]) -> set[str]:
    out = set()
    for argv in commands:
        if "apt-get" in argv and "install" in argv:
            out |= {a for a in argv[argv.index("install") + 1:] if not a.startswith("-")}
    return out


def package_installs(commands: list[list[str]]) -> list[tuple[bool, frozenset[str]]]:
    """``pip install`` of this package (``.`` or ``.[extras]``): (editable, extras) of each one."""
    found = []
    for argv in commands:
        if "pip" not in argv or "install" not in argv:
            continue
        args = argv[argv.index("install") + 1:]
        for arg in args:
            match = re.fullmatch(r"\.(?:\[([\w,\- ]+)\])?", arg)
            if match:
                extras = frozenset(e.strip() for e in (match.group(1) or "").split(",") if e.strip())
                found.append(("-e" in args or "--editable" in args, extras))
    return found


def makefile_install() -> list[list[str]]:
    """The install recipe's commands, with the Makefile's own ``NAME = value`` variables expanded (others,
    such as ``$(PYTHON)``, dropped)."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^install:.*\n((?:\t.*\n|(?:  .*\n))+)", text, re.MULTILINE)
    assert recipe, "Makefile has no install target"
    variables = dict(re.findall(r"^([A-Z_]+) *=(?!=)(.*)$", text, re.MULTILINE))
    body = re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m.group(1), "").strip(), recipe.group(1))
    return shell_commands(re.sub(r"\$\([A-Z_]+\)", "", body))


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, one a line (comments dropped, continuation lines joined)."""
    text = (ROOT / "Dockerfile").read_text()
    return re.sub(r"\\\n\s*", " ", "\n".join(line for line in text.splitlines()
                                             if not line.lstrip().startswith("#"))).splitlines()


def dockerfile() -> tuple[list[str], list[list[str]], dict[str, str]]:
    """FROM images, the RUN commands, and ENV / LABEL pairs."""
    logical = "\n".join(dockerfile_lines())
    froms, runs, pairs = [], [], {}
    for line in logical.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            froms.append(rest.split()[0])
        elif word.upper() == "RUN":
            runs += shell_commands(rest)
        elif word.upper() in ("ENV", "LABEL"):
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                pairs[key] = value
    return froms, runs, pairs


def readme_install() -> tuple[set[str], list[tuple[bool, frozenset[str]]]]:
    text = (ROOT / "README.md").read_text()
    apt = set(re.findall(r"Debian's `([\w.+-]+)`", text))
    pip = [argv for cmd in re.findall(r"`(pip install [^`]+)`", text) for argv in shell_commands(cmd)]
    return apt, package_installs(pip)


def test_dockerfile_installs_what_the_readme_and_makefile_install():
    _, runs, _ = dockerfile()
    make = makefile_install()
    readme_apt, readme_pip = readme_install()
    make_apt, docker_apt = apt_packages(make), apt_packages(runs)
    assert make_apt and make_apt == readme_apt, (make_apt, readme_apt)
    assert docker_apt - set(IMAGE_ONLY_APT) == make_apt, (docker_apt, make_apt)
    make_pip, docker_pip = package_installs(make), package_installs(runs)
    assert len(make_pip) == 1 and len(docker_pip) == 1, (make_pip, docker_pip)
    # Developers install the dev extra (tests, linters); the image the same package with no extras.
    assert make_pip == readme_pip == [(True, frozenset({"dev"}))], (make_pip, readme_pip)
    assert docker_pip == [(True, frozenset())], docker_pip


def test_image_and_make_install_from_the_same_pins():
    _, runs, pairs = dockerfile()
    assert pairs.get("PIP_CONSTRAINT", "").endswith("/deploy/constraints.txt"), "image pip is unconstrained"
    for argv in makefile_install():
        if package_installs([argv]):
            args = argv[argv.index("install") + 1:]
            constraints = {b for a, b in zip(args, args[1:]) if a in ("-c", "--constraint")}
            assert constraints == {"deploy/constraints.txt"}, argv


def test_image_installs_runtime_dependencies_only(tmp_path):
    """Every ``pip install -r FILE`` of the image reads a file the Dockerfile writes from pyproject.toml's
    [project] dependencies (its program run here on a copy of pyproject.toml), never the dev closure that
    deploy/constraints.txt pins."""
    _, runs, _ = dockerfile()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    generators = {}
    for line in dockerfile_lines():
        for program, target in re.findall(r'python -c "([^"]+)" > (\S+)', line):
            generators[target] = program
    requirement_files = [b for argv in runs if "pip" in argv and "install" in argv
                         for a, b in zip(argv, argv[1:]) if a in ("-r", "--requirement")]
    assert requirement_files, "the image installs no dependency layer"
    for path in requirement_files:
        assert path in generators, f"pip install -r {path}: not written from pyproject.toml by the Dockerfile"
        (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
        written = subprocess.run([sys.executable, "-c", generators[path]], cwd=tmp_path, capture_output=True,
                                 text=True, check=True).stdout.split()
        assert written == project["dependencies"], (path, written)
    dev_only = {canon(Requirement(d).name) for d in project["optional-dependencies"]["dev"]}
    dev_only -= {canon(Requirement(d).name) for d in project["dependencies"]}
    assert dev_only and not dev_only & {canon(Requirement(w).name) for w in written}


def test_dockerfile_is_pinned():
    froms, runs, pairs = dockerfile()
    assert froms, "no FROM"
    for image in froms:  # an exact python version (3.11.7-...) or a digest, never a floating tag
        assert "@sha256:" in image or re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", image), image
    constraint = pairs.get("PIP_CONSTRAINT", "")
    assert constraint.endswith("deploy/constraints.txt"), "pip installs are not constrained"
    for argv in runs:
        if "pip" in argv and "install" in argv:
            args = argv[argv.index("install") + 1:]
            files = {b for a, b in zip(args, args[1:]) if a in ("-r", "-c", "--requirement", "--constraint")}
            named = [a for a in args if not a.startswith(("-", ".")) and a not in files]
            assert all("==" in a for a in named), f"unpinned pip install: {argv}"
            constraints = {b for a, b in zip(args, args[1:]) if a in ("-c", "--constraint")}
            assert constraints <= {"deploy/constraints.txt"}, f"constraints other than the pins: {argv}"


def test_constraints_pin_every_dependency_within_its_range():
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line}"
            pins[canon(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        assert canon(req.name) in pins, f"{req.name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[canon(req.name)], prereleases=True), (spec, pins[canon(req.name)])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_run_the_image_the_dockerfile_builds(path):
    _, _, pairs = dockerfile()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert pairs["org.opencontainers.image.version"] == version
    image = f"{pairs['org.opencontainers.image.title']}:{version}"
    ray_pin = next(line.split("==")[1] for line in (ROOT / "deploy" / "constraints.txt").read_text().split()
                   if line.startswith("ray=="))
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or not str(doc.get("apiVersion", "")).startswith("ray.io/"):
            continue
        text = yaml.safe_dump(doc)
        images = set(re.findall(r"image: (\S+)", text))
        assert images == {image}, (path.name, images)
        assert set(re.findall(r"rayVersion: '?([\d.]+)", text)) == {ray_pin}, path.name
        assert "persistentVolumeClaim" not in text, f"{path.name} still needs a shared volume"
