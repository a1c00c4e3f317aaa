"""Security invariants of the source tree: no unsafe deserialization or dynamic code.

Nothing read from disk or the network may go through ``pickle`` (or its relatives),
``eval``/``exec``, unsafe YAML loading or ``np.load(allow_pickle=True)``. The check tokenizes
every source file, so comments and strings (this kind of sentence) do not count.
"""

from __future__ import annotations

import io
import os
import re
import tokenize
from typing import List, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
PACKAGES = ("preprocessing", "trainer", "serving", "pipeline", "bench")

FORBIDDEN = {
    "pickle-like module": re.compile(
        r"\b(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle|shelve|marshal|joblib)\b"
    ),
    "pickle-like call": re.compile(
        r"\b(pickle|cPickle|_pickle|dill|cloudpickle|shelve|marshal|joblib)\s*\."
    ),
    "pandas pickle": re.compile(r"\.read_pickle\s*\("),
    "eval/exec/compile": re.compile(r"(?<![\w.])(eval|exec|compile|__import__)\s*\("),
    "unsafe yaml": re.compile(
        r"\byaml\s*\.\s*(load|load_all|unsafe_load|unsafe_load_all|full_load|full_load_all)\s*\("
        r"|\b(Unsafe|Full)?Loader\s*=\s*yaml\s*\.\s*(Unsafe|Full)?Loader\b"
    ),
    "allow_pickle": re.compile(r"\ballow_pickle\s*=\s*True\b"),
    "torch.load": re.compile(r"\btorch\s*\.\s*load\s*\("),
    "keras unsafe mode": re.compile(r"\bsafe_mode\s*=\s*False\b"),
    "shell command": re.compile(r"\bshell\s*=\s*True\b|\bos\s*\.\s*(system|popen)\s*\("),
}


def _code_only(source: str) -> List[Tuple[int, str]]:
    """Returns (line number, code) with comments and string literals blanked out."""
    lines = source.splitlines()
    kept = [list(line) for line in lines]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING) and not (
            tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1)
        ):
            continue
        (row, col), (end_row, end_col) = tok.start, tok.end
        for r in range(row, end_row + 1):
            start = col if r == row else 0
            stop = end_col if r == end_row else len(kept[r - 1])
            kept[r - 1][start:stop] = " " * (stop - start)
    return [(i + 1, "".join(chars)) for i, chars in enumerate(kept)]


def find_unsafe(source: str) -> List[Tuple[int, str]]:
    """Returns (line number, rule) for every forbidden construct in Python ``source``."""
    hits = []
    for number, line in _code_only(source):
        for rule, pattern in FORBIDDEN.items():
            if pattern.search(line):
                hits.append((number, rule))
    return hits


def _python_files() -> List[str]:
    files = [os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")]
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def test_the_checker_catches_unsafe_code():
    unsafe = [
        "import pickle",
        "import cPickle as p",
        "from joblib import load",
        "x = pickle.loads(data)",
        "m = marshal.loads(b)",
        "df = pd.read_pickle(path)",
        "eval(text)",
        "exec(code)",
        "f = compile(src, 'x', 'exec')",
        "yaml.load(stream)",
        "yaml.unsafe_load(stream)",
        "yaml.load(f, Loader=yaml.Loader)",
        "a = np.load(path, allow_pickle=True)",
        "torch.load(p)",
        "tf.keras.models.load_model(p, safe_mode=False)",
        "subprocess.run(cmd, shell=True)",
        "os.system(cmd)",
    ]
    for line in unsafe:
        assert find_unsafe(line + "\n"), line
    safe = [
        "cfg = yaml.safe_load(stream)",
        "a = np.load(path)",
        "pattern = re.compile('x')",
        "model.compile(optimizer='adam')",
        "model.evaluate(ds)",
        "# pickle.loads(x) in a comment",
        "'''eval(x) in a docstring'''",
        "msg = f'exec({name})'",
        "retrieval = 1",
    ]
    for line in safe:
        assert not find_unsafe(line + "\n"), line


def test_no_unsafe_deserialization_or_dynamic_code_in_the_source_tree():
    files = _python_files()
    assert len(files) > 40 and any(f.endswith("model_manager.py") for f in files)
    found = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, rule in find_unsafe(f.read()):
                found.append(f"{os.path.relpath(path, ROOT)}:{number}: {rule}")
    assert not found, "\n".join(found)
