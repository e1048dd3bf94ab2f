"""The container files (Dockerfile, docker-compose.yml, .dockerignore) agree with the project.

Docker is not needed: the files are parsed, and every ``orch ...`` command line in
them is parsed -- not run -- by the real click group :func:`orchestrator.cli.main`,
so a renamed option, a value that no longer parses or a subcommand that does not
exist fails here instead of in a crash-looping container.

Paths inside the image (``/app``, ``/app/example.py``) are checked against a small
stand-in of the image's file system built from the Dockerfile's WORKDIR and COPY
instructions, so ``--path /app`` parses even when the option insists on an
existing directory, and ``orch submit /app/example.py`` names a file the image has.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import click
import pytest
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

ORCH_SERVICES = ("worker", "coordinator", "submit")
"""Services that must run the orch image (``status`` is optional)."""
CLUSTER_SERVICES = {"redis", "worker", "coordinator"}
"""What a plain ``docker compose up`` starts; everything else sits behind a profile."""
REDIS_URL = "redis://redis:6379/0"


# --------------------------------------------------------------------------- files


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "docker-compose.yml has no services"
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def argv_of(command: Any) -> list[str]:
    """A compose ``command`` (string, split like a shell would, or list) as argv."""
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def interpolated(value: str) -> str:
    """Compose's ``${VAR:-default}``: the variable when set and not empty, else the default."""
    return _DEFAULTED.sub(lambda m: os.environ.get(m.group(1)) or m.group(2), value)


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """A compose ``environment`` (mapping or ``KEY=VALUE`` list) as a dict, interpolated."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in env)
        return {key: interpolated(value) for key, value in pairs}
    return {str(key): "" if value is None else interpolated(str(value)) for key, value in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``{dependency: condition}`` from the short (list) or long (mapping) form."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


@dataclass
class Instruction:
    keyword: str
    value: str
    workdir: str  # the WORKDIR in effect when the instruction runs
    line: int


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if not buffer:
            start = number
        if text.endswith("\\"):
            buffer += text[:-1] + " "
            continue
        logical.append((start, buffer + text))
        buffer = ""
    if buffer.strip():
        logical.append((start, buffer))
    instructions, workdir = [], "/"
    for number, text in logical:
        keyword, _, value = text.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            workdir = "/"
        elif keyword == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, value))
        instructions.append(Instruction(keyword, value, workdir, number))
    return instructions


def instruction_words(value: str) -> list[str]:
    """The words of an instruction: JSON (exec) form, else whitespace-split."""
    if value.startswith("["):
        return [str(word) for word in json.loads(value)]
    return value.split()


@dataclass
class Copy:
    sources: list[str]
    dest: str  # absolute path in the image
    dest_is_dir: bool
    from_stage: Optional[str]
    line: int


def copies() -> list[Copy]:
    """Every COPY/ADD of the Dockerfile, with flags (``--chown=...``) removed."""
    found = []
    for ins in dockerfile():
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = instruction_words(ins.value)
        flags = [word for word in words if word.startswith("--")]
        args = [word for word in words if not word.startswith("--")]
        assert len(args) >= 2, f"Dockerfile line {ins.line}: {ins.keyword} needs a source and a destination"
        from_stage = next((flag.split("=", 1)[1] for flag in flags if flag.startswith("--from=")), None)
        raw_dest = args[-1]
        dest = posixpath.normpath(posixpath.join(ins.workdir, raw_dest))
        dest_is_dir = raw_dest.endswith("/") or raw_dest in (".", "./") or len(args) > 2
        found.append(Copy(args[:-1], dest, dest_is_dir, from_stage, ins.line))
    return found


def command_of_dockerfile() -> list[str]:
    cmds = [ins for ins in dockerfile() if ins.keyword == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    value = cmds[-1].value
    return instruction_words(value) if value.startswith("[") else shlex.split(value)


# --------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex on a relative path."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    if DOCKERIGNORE.exists():
        for line in DOCKERIGNORE.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
            rules.append((negate, _pattern_regex(pattern)))
    return rules


def is_ignored(relative: str, rules: Optional[list[tuple[bool, re.Pattern[str]]]] = None) -> bool:
    """Whether ``relative`` (a path in the build context) is left out of the context.

    As Docker does: a pattern that matches a parent directory excludes the path, and
    the last matching pattern wins (``!pattern`` re-includes).
    """
    rules = dockerignore_rules() if rules is None else rules
    parts = posixpath.normpath(relative).split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


# --------------------------------------------------------------------------- a stand-in image


def _context_sources(source: str) -> list[Path]:
    if any(char in source for char in "*?["):
        return sorted(ROOT.glob(source))
    return [ROOT / source]


def build_image_tree(root: Path) -> Path:
    """Under ``root``, the final image's WORKDIRs and COPYed context files (as symlinks)."""
    rules = dockerignore_rules()
    for ins in dockerfile():
        if ins.keyword == "WORKDIR":
            (root / ins.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for copy in copies():
        if copy.from_stage is not None:
            continue
        target = root / copy.dest.lstrip("/")
        for source in copy.sources:
            for path in _context_sources(source):
                if not path.exists():
                    continue  # reported by test_dockerfile_copies_only_files_that_exist
                if path.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    for child in path.iterdir():
                        relative = child.relative_to(ROOT).as_posix()
                        link = target / child.name
                        if not is_ignored(relative, rules) and not link.exists():
                            link.symlink_to(child)
                else:
                    link = target / path.name if copy.dest_is_dir or target.is_dir() else target
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if link.is_symlink() or link.exists():
                        link.unlink()
                    link.symlink_to(path)
    return root


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image_tree(tmp_path_factory.mktemp("image"))


def in_image(image_root: Path, path: str) -> Path:
    return image_root / posixpath.normpath(path).lstrip("/")


def to_host(image_root: Path, argv: list[str]) -> list[str]:
    """``argv`` with every absolute path moved under ``image_root``.

    An absolute path in a container's command line is a path in the image, so it
    must be one the Dockerfile creates (WORKDIR) or copies, not one that happens to
    exist on the machine running the tests.
    """

    def move(value: str) -> str:
        return str(in_image(image_root, value)) if value.startswith("/") else value

    moved = []
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            option, value = arg.split("=", 1)
            moved.append(f"{option}={move(value)}")
        else:
            moved.append(move(arg))
    return moved


# --------------------------------------------------------------------------- orch command lines


def orch_commands() -> list[tuple[str, list[str], dict[str, str]]]:
    """``(where, argv, environment)`` of every ``orch ...`` command line in the container files."""
    found = []
    for name, service in services().items():
        argv = argv_of(service.get("command"))
        if argv and argv[0] == "orch":
            found.append((f"docker-compose.yml:{name}", argv, environment_of(service)))
    if DOCKERFILE.exists():
        argv = command_of_dockerfile()
        if argv and argv[0] == "orch":
            found.append(("Dockerfile:CMD", argv, {"ORCH_REDIS_URL": REDIS_URL}))
    return found


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ORCH_* variables from the environment running the tests."""
    for key in list(os.environ):
        if key.startswith("ORCH_"):
            monkeypatch.delenv(key)
    return monkeypatch


def _remaining(ctx: click.Context) -> list[str]:
    """What a group left for its subcommand (click 8.2 renamed ``protected_args``)."""
    protected = ctx.__dict__.get("_protected_args")
    if protected is None:
        protected = ctx.__dict__.get("protected_args", [])
    return [*protected, *ctx.args]


def parse_orch(argv: list[str], where: str, shown: Optional[list[str]] = None) -> list[click.Context]:
    """Parse ``argv`` (``["orch", ...]``) with the real CLI, without running anything.

    Every option must exist and every value must convert; a missing subcommand fails
    the test, naming it. ``shown`` is the command line as written (before paths in
    the image were moved to the stand-in image), for messages.
    """
    from orchestrator.cli import main

    written = shlex.join(shown or argv)

    assert argv[0] == "orch", f"{where}: not an orch command line: {argv}"
    command: click.Command = main
    try:
        ctx = main.make_context("orch", list(argv[1:]), resilient_parsing=False)
        contexts = [ctx]
        while isinstance(command, click.Group):
            rest = _remaining(ctx)
            if not rest:
                pytest.fail(f"{where}: `{written}` names no orch subcommand")
            name, args = rest[0], rest[1:]
            sub = command.get_command(ctx, name)
            if sub is None:
                defined = ", ".join(sorted(command.list_commands(ctx))) or "none"
                pytest.fail(f"{where}: `{written}` needs subcommand '{ctx.command_path} {name}', "
                            f"which orchestrator/cli.py does not define (defined: {defined})")
            ctx = sub.make_context(name, list(args), parent=ctx, resilient_parsing=False)
            contexts.append(ctx)
            command = sub
    except click.UsageError as exc:  # NoSuchOption, BadParameter, MissingParameter, extra arguments...
        pytest.fail(f"{where}: `{written}` does not parse: {exc.format_message()}")
    return contexts


@pytest.mark.parametrize(("where", "argv", "env"), [pytest.param(*c, id=c[0]) for c in orch_commands()])
def test_orch_command_lines_parse(where: str, argv: list[str], env: dict[str, str],
                                  image_root: Path, clean_env: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        clean_env.setenv(key, value)
    host_argv = to_host(image_root, argv)
    contexts = parse_orch(host_argv, where, shown=argv)
    root = contexts[0]
    if env.get("ORCH_REDIS_URL"):
        assert root.params.get("redis_url") == env["ORCH_REDIS_URL"], (
            f"{where}: ORCH_REDIS_URL does not reach the root --redis-url option")

    # The same command line with --help appended runs through click to exit code 0.
    from orchestrator.cli import main

    result = CliRunner().invoke(main, host_argv[1:] + ["--help"], env=env)
    assert result.exit_code == 0, f"{where}: `{shlex.join(argv)} --help` exited {result.exit_code}:\n{result.output}"
    assert "Usage:" in result.output


def test_every_orch_service_runs_an_orch_command() -> None:
    where = {entry[0] for entry in orch_commands()}
    for name in ORCH_SERVICES:
        assert f"docker-compose.yml:{name}" in where, f"service {name} does not run an `orch ...` command"
    assert "Dockerfile:CMD" in where, "the Dockerfile's CMD is not an `orch ...` command"


# --------------------------------------------------------------------------- docker-compose.yml


def test_redis_is_persistent_and_healthchecked() -> None:
    data = compose()
    redis = data["services"].get("redis")
    assert redis, "no redis service"
    image = str(redis.get("image", ""))
    assert image == "redis:7" or image.startswith("redis:7."), f"redis image is not redis:7: {image!r}"
    command = " ".join(argv_of(redis.get("command")))
    assert re.search(r"--appendonly\s+yes\b", command), f"redis does not run with --appendonly yes: {command!r}"
    assert re.search(r"--appendfsync\s+everysec\b", command), f"redis: no --appendfsync everysec: {command!r}"

    volumes = [v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in redis.get("volumes", [])]
    data_volumes = [v.split(":")[0] for v in volumes if v.split(":")[1:2] == ["/data"]]
    assert data_volumes, "redis has no volume on /data"
    assert data_volumes[0] in (data.get("volumes") or {}), (
        f"redis' /data volume {data_volumes[0]!r} is not a named volume")

    healthcheck = redis.get("healthcheck") or {}
    test = healthcheck.get("test")
    test_text = " ".join(test) if isinstance(test, list) else str(test or "")
    assert "redis-cli" in test_text and "ping" in test_text, f"redis healthcheck does not ping: {test!r}"


@pytest.mark.parametrize("name", ORCH_SERVICES)
def test_orch_services_share_the_image_and_redis(name: str) -> None:
    service = services().get(name)
    assert service is not None, f"no {name} service"
    build = service.get("build")
    context = build.get("context", ".") if isinstance(build, dict) else build
    assert context in (".", "./"), f"{name} is not built from this repository (build: {build!r})"
    assert environment_of(service).get("ORCH_REDIS_URL") == REDIS_URL
    assert depends_on(service).get("redis") == "service_healthy", f"{name} does not wait for a healthy redis"


@pytest.mark.parametrize("name", ["worker", "coordinator"])
def test_long_lived_services_restart(name: str) -> None:
    assert services()[name].get("restart") == "unless-stopped"


def _host_ports(service: dict[str, Any]) -> list[str]:
    """Port mappings that bind a fixed host port (a bare container port is fine: Docker picks one)."""
    fixed = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published"):
                fixed.append(str(port))
        elif ":" in str(port):
            fixed.append(str(port))
    return fixed


def test_worker_scales() -> None:
    worker = services()["worker"]
    assert "container_name" not in worker, "a container_name stops `--scale worker=N`"
    assert not _host_ports(worker), f"fixed host ports stop `--scale worker=N`: {_host_ports(worker)}"
    argv = argv_of(worker.get("command"))
    assert argv[:2] == ["orch", "worker"]
    named = [arg for arg in argv if arg == "--name" or arg.startswith("--name=")]
    assert not named, "a fixed --name: RQ refuses a second live worker with the same name"
    assert "--burst" not in argv, "a --burst worker exits when the queue is empty (a restart loop)"
    assert "--queues" in argv or any(arg.startswith("--queues=") for arg in argv)


@pytest.mark.parametrize(("setting", "mode"), [(None, "lean"), ("rq", "rq")])
def test_worker_kind_is_one_setting(setting: Optional[str], mode: str, image_root: Path,
                                    clean_env: pytest.MonkeyPatch) -> None:
    """The default worker is the fast one; ``ORCH_WORKER_MODE=rq docker compose up`` makes every worker
    the RQ-compatible one, and nothing else in the file needs to change."""
    if setting:
        clean_env.setenv("ORCH_WORKER_MODE", setting)
    worker = services()["worker"]
    for key, value in environment_of(worker).items():
        clean_env.setenv(key, value)
    argv = argv_of(worker.get("command"))
    assert "--mode" not in argv
    contexts = parse_orch(to_host(image_root, argv), "docker-compose.yml:worker", shown=argv)
    assert contexts[-1].params["mode"] == mode


def test_tools_are_behind_a_profile() -> None:
    for name, service in services().items():
        profiles = service.get("profiles") or []
        if name in CLUSTER_SERVICES:
            assert not profiles, f"{name} must start with a plain `docker compose up`"
        else:
            assert "tools" in profiles, f"{name} would start with `docker compose up`; give it profile 'tools'"
    submit = services()["submit"]
    assert set(depends_on(submit)) >= {"redis", "worker"}
    assert argv_of(submit.get("command"))[:2] == ["orch", "submit"]


def _submit_target(argv: list[str], image_root: Path) -> str:
    """TARGET of ``orch submit ...`` as the CLI parses it, as a path in the image."""
    contexts = parse_orch(to_host(image_root, argv), "docker-compose.yml:submit", shown=argv)
    target = str(contexts[-1].params["target"])
    prefix = str(image_root)
    return target[len(prefix):] if target.startswith(prefix + "/") else target


def _path_values(argv: list[str]) -> list[str]:
    values = []
    for i, arg in enumerate(argv):
        if arg == "--path" and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith("--path="):
            values.append(arg.split("=", 1)[1])
    return [part for value in values for part in value.split(os.pathsep) if part]


def test_workers_can_import_the_submitted_workflow(image_root: Path, clean_env: pytest.MonkeyPatch) -> None:
    """The submit target is a file in the image, and its folder is on the workers' --path."""
    submit_argv = argv_of(services()["submit"].get("command"))
    for key, value in environment_of(services()["submit"]).items():
        clean_env.setenv(key, value)
    target = _submit_target(submit_argv, image_root)
    file_part = target.rsplit(":", 1)[0] if not target.endswith(".py") else target
    assert file_part.endswith(".py") and file_part.startswith("/"), (
        f"submit target is not a file in the image: {target}")
    assert in_image(image_root, file_part).is_file(), f"the image has no {file_part} (is it COPYed, and in the repo?)"
    worker_paths = [posixpath.normpath(p) for p in _path_values(argv_of(services()["worker"].get("command")))]
    assert posixpath.dirname(file_part) in worker_paths, (
        f"workers import {posixpath.basename(file_part)} as a module: their --path {worker_paths} "
        f"must include {posixpath.dirname(file_part)}")


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_workdir_and_user() -> None:
    instructions = dockerfile()
    froms = [ins.value.split()[0] for ins in instructions if ins.keyword == "FROM"]
    assert froms and froms[-1] == "python:3.11-slim", f"final stage is not python:3.11-slim: {froms}"
    assert instructions[-1].workdir == "/app", "the final WORKDIR is not /app"
    users = [ins.value.split(":")[0] for ins in instructions if ins.keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as root"


def test_dockerfile_installs_the_project(image_root: Path) -> None:
    """A RUN does ``pip install .`` without a cache, in a directory holding the project's source."""
    installs = [ins for ins in dockerfile()
                if ins.keyword == "RUN" and re.search(r"\bpip\d*(\.\d+)?\s+install\b", ins.value)]
    assert installs, "the Dockerfile never runs pip install"
    project_installs = [ins for ins in installs
                        if re.search(r"\bpip\d*(\.\d+)?\s+install\b[^&;|]*\s\.(\s|$|\[)", ins.value)]
    assert project_installs, f"no `pip install .` among: {[ins.value for ins in installs]}"
    ins = project_installs[0]
    env = " ".join(i.value for i in dockerfile() if i.keyword == "ENV")
    assert "--no-cache-dir" in ins.value or re.search(r"PIP_NO_CACHE_DIR[= ]+(1|true|yes|on)", env, re.I), (
        "pip install keeps its cache in the image (use --no-cache-dir)")

    source = in_image(image_root, ins.workdir)
    assert (source / "pyproject.toml").is_file(), f"pip install . runs in {ins.workdir}, which has no pyproject.toml"
    for name in _project_files():
        if (ROOT / name).exists():  # a missing readme is the repository's problem (the build only warns)
            assert (source / name).exists(), (
                f"{name} is not in {ins.workdir} when pip install . runs (COPY / .dockerignore)")
    for name in _project_files(readme=False):
        assert (ROOT / name).exists(), f"pyproject.toml builds {name}, which is not in the repository"


def _project_files(readme: bool = True) -> list[str]:
    """Files and packages pyproject.toml says the build needs (and its readme)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools_cfg = project.get("tool", {}).get("setuptools", {})
    names = [f"{module}.py" for module in setuptools_cfg.get("py-modules", [])]
    include = setuptools_cfg.get("packages", {}).get("find", {}).get("include", []) if isinstance(
        setuptools_cfg.get("packages"), dict) else []
    names += sorted({pattern.split(".")[0].rstrip("*") for pattern in include if pattern.split(".")[0].rstrip("*")})
    declared = project.get("project", {}).get("readme") if readme else None
    if isinstance(declared, str):
        names.append(declared)
    elif isinstance(declared, dict) and declared.get("file"):
        names.append(declared["file"])
    return names


def test_dockerfile_copies_only_files_that_exist() -> None:
    rules = dockerignore_rules()
    for copy in copies():
        if copy.from_stage is not None:
            continue
        for source in copy.sources:
            assert not source.startswith(("http://", "https://")), f"line {copy.line}: remote source {source}"
            matches = [p for p in _context_sources(source) if p.exists()]
            assert matches, f"Dockerfile line {copy.line} copies {source}, which is not in the repository"
            for path in matches:
                relative = path.relative_to(ROOT).as_posix()
                if relative != ".":
                    assert not is_ignored(relative, rules), (
                        f"Dockerfile line {copy.line} copies {source}, which .dockerignore leaves out")


def test_dockerfile_puts_the_example_workflow_in_app(image_root: Path) -> None:
    assert in_image(image_root, "/app/example.py").is_file(), "/app/example.py is not in the image"


# --------------------------------------------------------------------------- .dockerignore


@pytest.mark.parametrize("path", [
    ".git/HEAD",
    "__pycache__",
    "orchestrator/__pycache__",
    "orchestrator/backends/__pycache__/x.cpython-311.pyc",
    "tests/x.pyc",
    ".venv/bin/python",
    ".pytest_cache/README.md",
    "bench/results/run.json",
    "orch.egg-info",
    "src/orch.egg-info/PKG-INFO",
])
def test_dockerignore_excludes(path: str) -> None:
    assert DOCKERIGNORE.exists(), "no .dockerignore"
    assert is_ignored(path), f".dockerignore lets {path} into the build context"


def test_dockerignore_keeps_what_the_build_needs() -> None:
    needed = ["pyproject.toml", "example.py", *_project_files()]
    kept_out = [name for name in needed if is_ignored(name)]
    assert not kept_out, f".dockerignore leaves out files the image needs: {kept_out}"
