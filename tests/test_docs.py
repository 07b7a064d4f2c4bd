"""What the README and the command lines promise about the installed package."""

import importlib
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def test_every_command_named_is_an_entry_point():
    """Each `llava-next-*` command the README or a --help names is in pyproject.toml, pointing at a main."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))   # no tomllib on Python 3.10
    texts = [ROOT / "README.md", *sorted((ROOT / "llava_next_jax").glob("*.py")), *sorted((ROOT / "docs").glob("*.md"))]
    named = {name: path.name for path in texts for name in re.findall(r"(?:`|bin/)(llava-next-[a-z]+)\b", path.read_text())}
    assert {"llava-next-caption", "llava-next-finetune", "llava-next-convert"} <= set(named), named
    for name, where in named.items():
        assert name in scripts, f"{where} names `{name}`, which pyproject.toml does not install"
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), (name, target)


def test_submodules_are_attributes_of_the_package():
    """`import llava_next_jax` then `llava_next_jax.distributed.initialize()`, as the README writes it;
    importing the package alone still imports no jax."""
    import subprocess
    import sys
    code = ("import sys, llava_next_jax\n"
            "assert 'jax' not in sys.modules\n"
            "assert callable(llava_next_jax.distributed.initialize) and callable(llava_next_jax.sharding.make_mesh)\n"
            "try:\n"
            "    llava_next_jax.no_such_thing\n"
            "except AttributeError as e:\n"
            "    assert \"has no attribute 'no_such_thing'\" in str(e)\n"
            "else:\n"
            "    raise AssertionError('no AttributeError')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
