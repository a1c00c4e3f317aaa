"""The deployment files agree with requirements.lock and are well-formed Dockerfiles.

``serving/Dockerfile.tfserving`` cannot be built in the test environment; these tests check
what can be checked statically: pinned versions, the documented image tags, and that the
Dockerfile parses (instructions, stages, ARGs declared before use).
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
DOCKERFILE = os.path.join(ROOT, "serving", "Dockerfile.tfserving")
README = os.path.join(ROOT, "serving", "README-deploy.md")
LOCK = os.path.join(ROOT, "requirements.lock")

INSTRUCTIONS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}
# Variables Docker defines itself (usable without an ARG).
PREDEFINED = {
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
}
_HEREDOC = re.compile(r"<<(-?)(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[-+][^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def lock_versions(path: str = LOCK) -> Dict[str, str]:
    """``name==version`` pins of a pip-compile lock file (names lower-case)."""
    pins: Dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line)
            if match:
                pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def parse_dockerfile(text: str) -> List[Tuple[str, str, List[str]]]:
    """Instructions of a Dockerfile as ``(INSTRUCTION, arguments, heredoc bodies)``.

    Handles comments, the parser directive line, line continuations and BuildKit heredocs.

    Raises:
        ValueError: on an unknown instruction, an unterminated continuation or heredoc.
    """
    lines = text.splitlines()
    out: List[Tuple[str, str, List[str]]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [line]
        while parts[-1].rstrip().endswith("\\"):
            parts[-1] = parts[-1].rstrip()[:-1]
            while i < len(lines) and lines[i].lstrip().startswith("#"):
                i += 1  # comment lines inside a continuation are dropped by Docker
            if i >= len(lines):
                raise ValueError("line continuation at the end of the file")
            parts.append(lines[i])
            i += 1
        logical = " ".join(p.strip() for p in parts)
        keyword, _, arguments = logical.partition(" ")
        if keyword.upper() not in INSTRUCTIONS:
            raise ValueError(f"unknown instruction {keyword!r} in {logical!r}")
        bodies: List[str] = []
        for match in _HEREDOC.finditer(arguments):
            strip_tabs, terminator = match.group(1) == "-", match.group(3)
            body: List[str] = []
            while True:
                if i >= len(lines):
                    raise ValueError(f"unterminated heredoc {terminator!r}")
                current = lines[i]
                i += 1
                if (current.lstrip("\t") if strip_tabs else current) == terminator:
                    break
                body.append(current)
            bodies.append("\n".join(body))
        out.append((keyword.upper(), arguments.strip(), bodies))
    return out


def _arg_definitions(arguments: str) -> Dict[str, Optional[str]]:
    name, eq, default = arguments.partition("=")
    return {name.strip(): default.strip().strip('"') if eq else None}


def _variables(arguments: str) -> Set[str]:
    return {a or b for a, b in _VAR.findall(arguments)}


def _flag_free(arguments: str) -> str:
    """Arguments without leading ``--flag=value`` options."""
    words = arguments.split()
    while words and words[0].startswith("--"):
        words.pop(0)
    return " ".join(words)


@pytest.fixture(scope="module")
def instructions() -> List[Tuple[str, str, List[str]]]:
    with open(DOCKERFILE, encoding="utf-8") as f:
        return parse_dockerfile(f.read())


@pytest.fixture(scope="module")
def global_args(instructions) -> Dict[str, Optional[str]]:
    """ARGs declared before the first FROM (usable in FROM lines, re-declared in stages)."""
    args: Dict[str, Optional[str]] = {}
    for keyword, arguments, _ in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG":
            args.update(_arg_definitions(arguments))
    return args


def test_lock_has_the_serving_stack():
    pins = lock_versions()
    for name in ("tensorflow", "tensorflow-serving-api", "scann"):
        assert name in pins, f"{name} is not pinned in requirements.lock"


def test_dockerfile_versions_match_the_lock(global_args):
    pins = lock_versions()
    assert global_args["TF_SERVING_VERSION"] == pins["tensorflow-serving-api"]
    assert global_args["SCANN_VERSION"] == pins["scann"]
    assert global_args["TENSORFLOW_VERSION"] == pins["tensorflow"]
    # TF Serving x.y builds TensorFlow x.y.
    tf_minor = pins["tensorflow"].split(".")[:2]
    assert global_args["TF_SERVING_VERSION"].split(".")[:2] == tf_minor
    assert re.fullmatch(r"[0-9a-f]{40}", global_args["SCANN_GIT_COMMIT"] or "")


def test_dockerfile_parses_into_named_stages(instructions, global_args):
    froms = [arguments for keyword, arguments, _ in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    stages: List[str] = []
    for arguments in froms:
        words = _flag_free(arguments).split()
        assert len(words) in (1, 3), f"bad FROM {arguments!r}"
        if len(words) == 3:
            assert words[1].upper() == "AS"
            stages.append(words[2])
        for var in _variables(words[0]):
            assert var in global_args or var in PREDEFINED, f"FROM uses undeclared ${var}"
    assert len(set(stages)) == len(stages), f"duplicate stage names {stages}"
    build_image = next(f for f in froms if "serving" in f)
    assert "tensorflow/serving:${TF_SERVING_VERSION}-devel" in build_image
    assert instructions[0][0] in ("ARG", "FROM")
    for keyword, arguments, _ in instructions:
        if keyword == "COPY" and "--from=" in arguments:
            source = re.search(r"--from=(\S+)", arguments).group(1)
            assert source in stages, f"COPY --from={source} names no earlier stage"


def test_dockerfile_args_are_declared_before_use(instructions, global_args):
    declared: Set[str] = set()
    env: Set[str] = set()
    seen_from = False
    for keyword, arguments, _ in instructions:
        if keyword == "FROM":
            seen_from = True
            declared, env = set(), set()  # a stage sees only ARGs it (re)declares
            continue
        if not seen_from:
            continue
        if keyword == "ARG":
            name = next(iter(_arg_definitions(arguments)))
            assert name not in declared, f"ARG {name} declared twice in a stage"
            declared.add(name)
            continue
        if keyword == "RUN":
            continue  # shell variables are expanded by the shell, not by Docker
        used = _variables(arguments)
        if keyword == "ENV":
            env |= {m.group(1) for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)=", arguments)}
        for var in used:
            assert var in declared or var in env or var in PREDEFINED, (
                f"{keyword} {arguments!r} uses ${var} before an ARG/ENV in its stage"
            )
    # Every version ARG is re-declared in the stage that compiles (defaults come from the
    # global ARG, so a missing re-declaration would silently expand to "").
    build = _stage(instructions, "build")
    build_args = {next(iter(_arg_definitions(a))) for k, a, _ in build if k == "ARG"}
    assert {"TF_SERVING_VERSION", "TENSORFLOW_VERSION", "SCANN_VERSION"} <= build_args
    assert set(global_args) >= {"TF_SERVING_VERSION", "TENSORFLOW_VERSION", "SCANN_VERSION"}


def _stage(instructions, name: str) -> List[Tuple[str, str, List[str]]]:
    out: List[Tuple[str, str, List[str]]] = []
    inside = False
    for item in instructions:
        if item[0] == "FROM":
            words = _flag_free(item[1]).split()
            inside = len(words) == 3 and words[2] == name
            continue
        if inside:
            out.append(item)
    assert out, f"no stage {name!r}"
    return out


def test_dockerfile_links_the_scann_ops(instructions):
    text = "\n".join(a + "\n" + "\n".join(b) for _, a, b in instructions)
    assert "SUPPORTED_TENSORFLOW_OPS" in open(DOCKERFILE, encoding="utf-8").read()
    assert "//scann/scann_ops/cc:scann_ops_kernels" in text
    assert "//scann/scann_ops/cc:scann_ops" in text
    assert "tensorflow_serving/model_servers:tensorflow_model_server" in text
    entry = [a for k, a, _ in instructions if k == "ENTRYPOINT"]
    assert entry and "tf_serving_entrypoint.sh" in entry[-1]
    exposed = {p for k, a, _ in instructions if k == "EXPOSE" for p in a.split()}
    assert {"8500", "8501"} <= exposed


def test_readme_documents_the_stock_image_for_brute_force():
    pins = lock_versions()
    with open(README, encoding="utf-8") as f:
        text = f.read()
    tags = set(re.findall(r"tensorflow/serving:([0-9][0-9A-Za-z.\-]*)", text))
    assert tags == {pins["tensorflow-serving-api"]}, tags
    assert "-p 8500:8500" in text and "-p 8501:8501" in text
    assert re.search(r"-v \S+:/models", text)
    assert "-e MODEL_NAME=" in text
    assert "--index brute-force" in text or "--index=brute-force" in text
    assert "Dockerfile.tfserving" in text
    assert "untested" in text.lower()
    for name in ("scann", "tensorflow"):
        assert f"{name}=={pins[name]}" in text


def test_parser_rejects_broken_dockerfiles():
    with pytest.raises(ValueError, match="unknown instruction"):
        parse_dockerfile("FROM a\nFORM b\n")
    with pytest.raises(ValueError, match="unterminated heredoc"):
        parse_dockerfile("FROM a\nCOPY <<EOF /x\nbody\n")
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM a\nRUN true \\\n")
    parsed = parse_dockerfile("# c\nFROM a AS b\nRUN x \\\n  # note\n  y\nCOPY <<'E' /f\nk\nE\n")
    assert parsed == [("FROM", "a AS b", []), ("RUN", "x y", []), ("COPY", "<<'E' /f", ["k"])]
