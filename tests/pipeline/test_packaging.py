"""What ships to users through the Comfy Registry: pyproject's [tool.comfy] is complete, the archive (the git-tracked
files minus .comfyignore, as `comfy node publish` builds it) holds the pack and leaves tests, benchmarks and their
results out, and nothing in it is what the registry's security scan rejects (eval/exec, subprocess, pip at run time).
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIME = ("__init__.py", "cascade", "host", "model_patches", "nodes", "pipeline", "samplers", "web", "workflows")


def _ignore_rules() -> list[tuple[bool, str]]:
    """(negated, pattern) of .comfyignore, in order (the gitwildmatch subset it uses: dir/, globs, !)."""
    with open(os.path.join(ROOT, ".comfyignore"), encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.startswith("!"), ln.lstrip("!")) for ln in lines]


def _ignored(path: str, rules: list[tuple[bool, str]]) -> bool:
    out = False
    for negated, pat in rules:
        if pat.endswith("/"):
            hit = path.startswith(pat) or f"/{pat}" in f"/{path}"
        else:
            hit = fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(os.path.basename(path), pat) and "/" not in pat
        if hit:
            out = not negated
    return out


def _tree() -> list[str]:
    """The files `git ls-files` lists (plus new files git does not ignore); all files outside a checkout."""
    try:
        listed = subprocess.run(["git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, text=True, check=True, timeout=60).stdout.split("\n")
        return sorted(p for p in listed if p and os.path.isfile(os.path.join(ROOT, p)))
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available to list the files the registry archive takes")


def _archive() -> list[str]:
    rules = _ignore_rules()
    return [p for p in _tree() if not _ignored(p, rules)]


def test_tool_comfy_is_complete():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    comfy, project = meta["tool"]["comfy"], meta["project"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"]
    icon = comfy["Icon"]
    repo = project["urls"]["Repository"]
    assert icon.startswith("https://raw.githubusercontent.com/" + repo.removeprefix("https://github.com/"))
    assert os.path.isfile(os.path.join(ROOT, icon.split("/main/", 1)[1]))  # the file the URL serves is in the tree
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
        assert f"## {project['version']}" in f.read()  # the version has its changelog entry
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert repo in f.read()  # one repository URL, the same in README and pyproject
    for model in comfy["Models"]:
        assert model["model_url"].startswith("https://huggingface.co/stabilityai/stable-cascade")
        assert model["location"].split("/")[0] in ("diffusion_models", "vae", "text_encoders", "clip_vision",
                                                    "controlnet")


def test_the_archive_holds_the_pack_and_leaves_the_development_files_out():
    archive = _archive()
    assert archive, "no files listed"
    for top in RUNTIME:
        assert any(p == top or p.startswith(top + "/") for p in archive), f"{top} would not ship"
    for needed in ("README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "requirements.txt",
                   "web/scw_results.js", "scripts/convert_weights.py"):
        assert needed in archive, needed
    leaked = [p for p in archive if p.startswith(("tests/", "bench/", ".ci/")) or p.startswith("docs/RESULTS_")
              or p in ("requirements-dev.txt", "scripts/test.sh", "scripts/browser_check.py")]
    assert not leaked, leaked


def test_nothing_shipped_runs_code_the_registry_scan_rejects():
    # Running code: eval/exec calls (not methods of that name), a shell, pip from Python (a "pip install ..." hint in
    # a message is text, not a call).
    pattern = re.compile(r"(?<![\w.])(?<!def )(eval|exec)\s*\(|\bsubprocess\b|\bos\.(system|popen)\b|\bpip\._internal"
                         r"|\bpip\.main\b|\brunpy\b|__import__\(")
    bad = []
    for path in _archive():
        if not path.endswith((".py", ".js")):
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                code = line.split("#", 1)[0] if path.endswith(".py") else line.split("//", 1)[0]
                if pattern.search(code):
                    bad.append(f"{path}:{n}: {line.strip()[:120]}")
    assert not bad, bad
