"""The package as users install it: ``pip install freshrec``, without the ``dev`` extra.

A fresh virtualenv would download torch again on every run, so the test simulates it where it
matters: in a child interpreter, every distribution that only the ``dev`` extra brings (pytest,
httpx, pyyaml, …, minus what the runtime requirements pull in anyway) is made unimportable, then
every module of the four packages is imported and every CLI command's ``--help`` runs, plus the
cheap commands for real. A runtime import of a dev-only package fails here, as it would for a user.
"""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement
from support import PACKAGES


def _closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution that ``requirements`` install, extras included, by normalised name."""
    seen: set[str] = set()
    stack = [(r, frozenset(r.extras)) for r in requirements]
    while stack:
        requirement, extras = stack.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            nested = [Requirement(text) for text in metadata.requires(name) or []]
        except metadata.PackageNotFoundError:
            continue
        for child in nested:
            wanted = child.marker is None or any(child.marker.evaluate({"extra": e}) for e in extras or {""})
            if wanted:
                stack.append((child, frozenset(child.extras)))
    return seen


def _dev_only_modules() -> list[str]:
    own = [Requirement(text) for text in metadata.requires("freshrec") or []]
    runtime = _closure([r for r in own if r.marker is None])
    dev = _closure([r for r in own if r.marker is not None and r.marker.evaluate({"extra": "dev"})])
    dev_only = dev - runtime
    assert {"pytest", "hypothesis"} <= dev_only  # the computation itself is sane
    modules = {
        module
        for module, distributions in metadata.packages_distributions().items()
        if any(d.lower().replace("_", "-") in dev_only for d in distributions)
    }
    return sorted(m for m in modules if not m.startswith("_"))


def test_every_module_imports_and_every_command_helps_without_the_dev_extra(tmp_path: Path) -> None:
    blocked = _dev_only_modules()
    script = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        for name in {blocked!r}:
            sys.modules[name] = None  # `import name` now raises ImportError, as if not installed
        for package in {PACKAGES!r}:
            root = importlib.import_module(package)
            for module in pkgutil.walk_packages(root.__path__, package + "."):
                if not module.name.endswith("__main__"):
                    importlib.import_module(module.name)
        import click
        from click.testing import CliRunner
        from freshrec_app.cli import main

        def commands(group, path):
            for name, command in group.commands.items():
                yield [*path, name]
                if isinstance(command, click.Group):
                    yield from commands(command, [*path, name])

        runner = CliRunner()
        helped = 0
        for path in [[], *commands(main, [])]:
            result = runner.invoke(main, [*path, "--help"])
            assert result.exit_code == 0, (path, result.output, result.exception)
            helped += 1
        print(helped)
        """
    )
    env = {"FRESHREC_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert int(result.stdout.split()[-1]) > 15  # every command and subcommand


def test_the_cheap_commands_run_for_real_without_the_dev_extra(tmp_path: Path) -> None:
    blocked = _dev_only_modules()
    script = textwrap.dedent(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None
        from freshrec_app.cli import main
        sys.argv = ["freshrec", *sys.argv[1:]]
        main()
        """
    )
    env = {"FRESHREC_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        return result

    status = run("broker", "status")
    assert status.returncode == 3 and status.stdout.startswith("stopped "), status  # LSB: not running
    query = run("sql", "--json", "SELECT 1 + 1 AS two")
    assert query.returncode == 0 and '"two":2' in query.stdout.replace(" ", ""), query
