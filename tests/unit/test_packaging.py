"""The README, Makefile, CI script and Dockerfile agree with each other."""

import os
import re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _makefile_lock() -> str:
    match = re.search(r"^LOCK\s*:?=\s*(\S+)", _read("Makefile"), re.MULTILINE)
    assert match, "Makefile defines no LOCK variable"
    return match.group(1)


def test_dockerfile_installs_from_the_makefiles_lock_file():
    lock = _makefile_lock()
    dockerfile = _read("Dockerfile")
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    copied = re.search(rf"^COPY\s+{re.escape(lock)}\s+(\S+)", dockerfile, re.MULTILINE)
    assert copied, f"Dockerfile does not copy {lock}"
    installs = re.findall(r"pip install[^\n]*-r\s+(\S+)", dockerfile)
    assert copied.group(1) in installs, "Dockerfile installs from another requirements file"
    assert re.search(r'^ENTRYPOINT \["dnc"\]', dockerfile, re.MULTILINE)


def test_lock_pins_every_package_exactly():
    names = []
    for line in _read(_makefile_lock()).splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            assert re.match(r"^[A-Za-z0-9_.\-\[\]]+==[^\s=]+ \\$", line), line
            names.append(line.split("==")[0].lower())
    for pinned in ("tensorflow", "tf-keras", "scann", "tensorflow-transform", "apache-beam"):
        assert pinned in names


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    readme = _read("README.md")
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.DOTALL)
    assert len(blocks) >= 2
    first_commands = [b.strip() for b in blocks[:2]]
    assert first_commands[0] == "make demo"
    assert first_commands[1] == "make test"
    ci = [
        line.strip()
        for line in _read(".ci/run").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert first_commands[1] in ci
