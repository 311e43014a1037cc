"""Deployment files stay in step with the code.

Every YAML under ``cluster/`` and ``configs/`` parses; every job config validates with the real
config model; every ``cryosam ...`` command line in the cluster manifests (RayJob entrypoints,
container command/args, launcher setup commands) parses with the real CLI parser, names configs
that exist and validate, and overrides only known keys; the image installs the package under
the console script's name; the launcher configs follow Ray's launcher schema; and the KubeRay
manifests agree with each other (image, Ray version, head service, token Secret, GPU counts).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cryosam_ray.cli import build_parser
from cryosam_ray.config import load_config, parse_override
from cryosam_ray.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
CONFIGS = REPO / "configs"
DOCKERFILE = CLUSTER / "Dockerfile"
KUBERAY = CLUSTER / "kuberay"

YAML_FILES = sorted({*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml"), *CONFIGS.glob("*.yaml"),
                     *CONFIGS.glob("*.yml")})
CONFIG_FILES = sorted(p for p in CONFIGS.iterdir() if p.is_file() and not p.name.startswith("."))
LAUNCHER_FILES = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]

# CLI additions that other work is landing at the same time. Until the parser knows them, a line
# using a pending subcommand is checked only after its `--`, and a pending flag (with its number of
# values) is left out before parsing; once they exist, the lines are checked in full.
PENDING_SUBCOMMANDS = {"submit"}
PENDING_FLAGS = {"run": {"--incremental": 0}}
SHELL_OPERATORS = set("();<>|&")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# --- finding command lines -------------------------------------------------------------------

def _shell_commands(text: str) -> list[list[str]]:
    """The `cryosam ...` commands in a shell string: split at operators, from the word cryosam on."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments, current = [], []
    for token in lexer:
        if token and set(token) <= SHELL_OPERATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for segment in segments:
        for i, token in enumerate(segment):
            if _is_cryosam(token):
                found.append(segment[i:])
                break
    return found


def _is_cryosam(token: str) -> bool:
    return token == "cryosam" or token.endswith("/cryosam")


def command_lines(node) -> list[list[str]]:
    """Every `cryosam ...` command in a parsed YAML document, as argv lists.

    Strings are scanned for `cryosam ` (entrypoints, shell commands); a mapping whose `command` is
    a list starting with the cryosam executable (a Kubernetes container) gives `command + args`.
    """
    found = []
    if isinstance(node, dict):
        command = node.get("command")
        skip = set()
        if isinstance(command, list) and command and all(isinstance(t, str) for t in command) \
                and _is_cryosam(command[0]):
            found.append([*command, *[str(a) for a in node.get("args") or []]])
            skip = {"command", "args"}
        for key, value in node.items():
            if key not in skip:
                found += command_lines(value)
    elif isinstance(node, list):
        for value in node:
            found += command_lines(value)
    elif isinstance(node, str) and "cryosam " in node:
        found += _shell_commands(node)
    return found


def _collect_lines() -> list[tuple[Path, list[str]]]:
    lines = []
    for path in YAML_FILES:
        if not path.is_relative_to(CLUSTER):
            continue
        try:
            docs = _documents(path)
        except yaml.YAMLError:
            continue  # reported by test_yaml_parses
        lines += [(path, line) for doc in docs for line in command_lines(doc)]
    return lines


COMMAND_LINES = _collect_lines()


# --- checking one command line ---------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _subcommand_of(argv: list[str]) -> str | None:
    return next((t for t in argv if not t.startswith("-")), None)


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0 and {"--version", "--help", "-h"} & set(argv):
            return None
        pytest.fail(f"{where}: the CLI parser rejects `cryosam {shlex.join(argv)}`:\n{stderr.getvalue().strip()}")


def _without_pending_flags(argv: list[str], sub: str, subparser: argparse.ArgumentParser) -> list[str]:
    out = list(argv)
    for flag, n_values in PENDING_FLAGS.get(sub, {}).items():
        if flag in subparser._option_string_actions:
            continue  # landed: checked for real
        while flag in out:
            i = out.index(flag)
            del out[i:i + 1 + n_values]
    return out


def _config_file(value: str, where: str) -> Path:
    """A --config value as the repo file it names (a path relative to the repo, or a name in configs/)."""
    path = Path(value)
    assert not path.is_absolute(), (f"{where}: --config {value} is absolute; name a repo file (configs/X.yaml): "
                                    "jobs run in the repository (the image's /app, the launcher's ~/cryosam_ray)")
    candidates = [REPO / path] + ([CONFIGS / f"{value}.yaml"] if "/" not in value and path.suffix == "" else [])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    pytest.fail(f"{where}: --config {value} names no file in the repository")


def _check_config_and_overrides(ns: argparse.Namespace, where: str) -> None:
    config = getattr(ns, "config", None)
    file = _config_file(config, where) if config else None
    overrides = {}
    for text in getattr(ns, "overrides", None) or []:
        key, value = parse_override(text)
        try:
            load_config(None, {key: value})
        except ConfigError as exc:
            pytest.fail(f"{where}: --set {text}: {exc}")
        overrides[key] = value
    try:
        load_config(file, overrides)
    except ConfigError as exc:
        pytest.fail(f"{where}: --config {config} with the line's --set values does not validate: {exc}")


def check_command_line(tokens: list[str], where: str, parser: argparse.ArgumentParser) -> None:
    assert _is_cryosam(tokens[0])
    argv = tokens[1:]
    subparsers = _subcommands(parser)
    sub = _subcommand_of(argv)
    if sub == "submit":
        inner = argv[argv.index("--") + 1:] if "--" in argv else []
        if "submit" in subparsers:
            _parse(parser, argv, where)
        else:
            assert "submit" in PENDING_SUBCOMMANDS, f"{where}: unknown subcommand submit"
        if inner and _is_cryosam(inner[0]):
            check_command_line(inner, f"{where} (the job after --)", parser)
        else:
            assert not inner or inner[0] in {"python", "ray"}, f"{where}: `--` is not followed by a command"
        return
    if sub in subparsers:
        argv = _without_pending_flags(argv, sub, subparsers[sub])
    ns = _parse(parser, argv, where)
    if ns is not None:
        _check_config_and_overrides(ns, where)


# --- tests -----------------------------------------------------------------------------------

def test_the_deploy_files_exist():
    for name in ["aws.yaml", "gcp.yaml", "Dockerfile", "README.md", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                 "kuberay/raycronjob.yaml", "kuberay/cronjob-submit.yaml"]:
        assert (CLUSTER / name).is_file(), f"cluster/{name} is missing"
    for name in ["demo.yaml", "paper.yaml", "empiar-10499.yaml"]:
        assert (CONFIGS / name).is_file(), f"configs/{name} is missing"


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path):
    assert _documents(path), f"{_rel(path)} holds no YAML document"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_rel)
def test_job_config_validates(path):
    load_config(path)  # ConfigError on an unknown key or a bad value, naming both


def test_command_lines_are_found():
    by_file: dict[str, list[list[str]]] = {}
    for path, line in COMMAND_LINES:
        by_file.setdefault(_rel(path), []).append(line)
    for name in ["cluster/kuberay/rayjob.yaml", "cluster/kuberay/raycronjob.yaml",
                 "cluster/kuberay/cronjob-submit.yaml"]:
        assert name in by_file, f"no `cryosam ...` command line found in {name}"
    for name in ["cluster/kuberay/raycronjob.yaml", "cluster/kuberay/cronjob-submit.yaml"]:
        assert all("--incremental" in line for line in by_file[name]), f"{name}: a nightly run needs --incremental"


@pytest.mark.parametrize("path, line", COMMAND_LINES,
                         ids=[f"{_rel(p)}:{' '.join(line[:2])}" for p, line in COMMAND_LINES])
def test_command_line_parses(path, line):
    check_command_line(line, f"{_rel(path)}: `{shlex.join(line)}`", build_parser())


def test_the_checker_rejects_what_the_cli_rejects():
    parser = build_parser()
    with pytest.raises(pytest.fail.Exception, match="rejects"):
        check_command_line(["cryosam", "run", "--tomograms", "t", "--prompts", "p", "--out", "o", "--bogus"], "x",
                           parser)
    with pytest.raises(pytest.fail.Exception, match="names no file"):
        check_command_line(["cryosam", "run", "--tomograms", "t", "--prompts", "p", "--out", "o", "--config",
                            "configs/absent.yaml"], "x", parser)
    with pytest.raises(pytest.fail.Exception, match="--set"):
        check_command_line(["cryosam", "run", "--tomograms", "t", "--prompts", "p", "--out", "o", "--set",
                            "segmenter.sam.chekpoint=s3://b/m.pth"], "x", parser)
    with pytest.raises(pytest.fail.Exception, match="rejects"):  # the job after a submit's `--` is checked
        check_command_line(["cryosam", "submit", "--address", "http://h:8265", "--name", "n", "--", "cryosam", "run",
                            "--bogus"], "x", parser)
    assert _shell_commands("cd ~/cryosam_ray && FOO=1 cryosam --version; ray job submit -- cryosam run --out o") == [
        ["cryosam", "--version"], ["cryosam", "run", "--out", "o"]]


def test_dockerfile_installs_the_console_script():
    text = DOCKERFILE.read_text()
    uncommented = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    instructions = re.sub(r"\\\n", " ", uncommented)
    assert re.search(r"^RUN .*\bpip install\b", instructions, re.M), "cluster/Dockerfile must pip install the package"
    scripts = _project_scripts()
    assert scripts.get("cryosam") == "cryosam_ray.cli:main", f"[project.scripts] is {scripts}"
    assert build_parser().prog == "cryosam"
    assert re.search(r"^RUN .*\bcryosam --version\b", instructions, re.M), "the image should prove the script runs"
    # The manifests name configs relative to the job's working directory: the image's WORKDIR holds configs/.
    workdir = re.findall(r"^WORKDIR\s+(\S+)", instructions, re.M)
    assert workdir, "cluster/Dockerfile must set WORKDIR (Ray starts there; jobs resolve configs/ from it)"
    assert re.search(r"^COPY\b.*\bconfigs\b", instructions, re.M), "cluster/Dockerfile must copy configs/"


def _project_scripts() -> dict[str, str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_rel)
def test_launcher_config_follows_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    jsonschema = pytest.importorskip("jsonschema")
    schema_file = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    if not schema_file.is_file():
        pytest.skip("this ray has no autoscaler/ray-schema.json")
    jsonschema.validate(config, json.loads(schema_file.read_text()))

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, f"{_rel(path)}: no node type with {{'GPU': 1}}"
    for node_type in gpu_types:
        assert node_type.get("min_workers", 0) == 0 and node_type.get("max_workers", 0) >= 1
    assert config.get("idle_timeout_minutes", 0) > 0
    setup = " ".join([*config.get("setup_commands", []), *config.get("head_setup_commands", [])])
    assert "pip install" in setup, f"{_rel(path)}: setup_commands must pip install the package"
    assert config.get("head_start_ray_commands") and config.get("worker_start_ray_commands")
    # Enough GPU workers for every shipped config's GPU actors.
    max_gpus = min(config.get("max_workers", 0), sum(t.get("max_workers", 0) * t["resources"]["GPU"]
                                                     for t in gpu_types))
    for file, needed in _gpu_demands().items():
        assert needed <= max_gpus, f"{_rel(file)} needs {needed} GPUs, {_rel(path)} offers {max_gpus}"


def _gpu_demands() -> dict[Path, float]:
    from cryosam_ray.job import precomputes_embeddings

    demands = {}
    for file in CONFIG_FILES:
        cfg = load_config(file)
        pools = ["encoders", "segmenters"] + (["embedders"] if precomputes_embeddings(cfg) else [])
        demands[file] = sum(getattr(cfg.ray, p).size * getattr(cfg.ray, p).num_gpus for p in pools)
    return demands


# --- the KubeRay manifests agree with each other and with the image ---------------------------

def _kuberay_docs() -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _documents(path):
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def _values(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v, key)


def _ray_version_of_base_image() -> str:
    match = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", DOCKERFILE.read_text())
    assert match, "cluster/Dockerfile should build on a rayproject/ray:<version> image"
    return match.group(1)


def test_kuberay_manifests_agree():
    docs = _kuberay_docs()
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= set(docs), sorted(docs)
    everything = [d for group in docs.values() for d in group]

    images = set(_values(everything, "image"))
    assert len(images) == 1, f"the manifests should all run the image built from cluster/Dockerfile: {images}"
    ray_version = _ray_version_of_base_image()
    assert set(_values(everything, "rayVersion")) == {ray_version}, "spec.rayVersion must be the image's Ray"
    for path in LAUNCHER_FILES:
        image = yaml.safe_load(path.read_text()).get("docker", {}).get("image", "")
        assert ray_version in image, f"{_rel(path)} runs {image}, the image builds on Ray {ray_version}"

    token_vars = [var for env in _values(everything, "env") for var in env if var.get("name") == "RAY_AUTH_TOKEN"]
    assert token_vars and all("secretKeyRef" in var.get("valueFrom", {}) for var in token_vars), \
        "RAY_AUTH_TOKEN must come from a Secret, never a literal in a manifest"
    token_secrets = {var["valueFrom"]["secretKeyRef"]["name"] for var in token_vars}
    assert len(token_secrets) == 1, f"one token Secret for the cluster and its clients: {token_secrets}"

    cluster = docs["RayCluster"][0]
    specs = [cluster["spec"], *(j["spec"]["rayClusterSpec"] for j in docs["RayJob"]),
             *(c["spec"]["jobTemplate"]["rayClusterSpec"] for c in docs["RayCronJob"])]
    for spec in specs:
        assert spec["enableInTreeAutoscaling"] is True
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if any(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == 1
                             for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, "a worker group with nvidia.com/gpu: 1"
        for group in gpu_groups:
            assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
            for file, needed in _gpu_demands().items():
                assert needed <= group["maxReplicas"], f"{_rel(file)} needs {needed} GPUs"

    for job in docs["RayJob"]:
        assert job["spec"]["shutdownAfterJobFinishes"] is True
    for cron in docs["RayCronJob"]:
        assert cron["spec"]["schedule"] and "--incremental" in cron["spec"]["jobTemplate"]["entrypoint"]

    # The nightly CronJob submits to the RayCluster's head service: <name>-head-svc, dashboard port.
    head_svc = f"http://{cluster['metadata']['name']}-head-svc:8265"
    for cron in docs["CronJob"]:
        assert cron["spec"]["schedule"] == "0 2 * * *"
        lines = command_lines(cron)
        submits = [line for line in lines if _subcommand_of(line[1:]) == "submit"]
        assert submits, "the CronJob runs `cryosam submit`"
        for line in submits:
            outer = line[:line.index("--")] if "--" in line else line
            assert outer[outer.index("--address") + 1] == head_svc
        env = [v for c in _values(cron, "containers") for container in c for v in container.get("env", [])]
        assert any(v["name"] == "RAY_AUTH_TOKEN" and "secretKeyRef" in v.get("valueFrom", {}) for v in env)
