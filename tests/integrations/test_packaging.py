"""The package as a user gets it: an sdist and a wheel that ``twine check`` accepts, and
the wheel, installed into a fresh virtual environment with nothing else, running the
README's usage example against the reference server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from lehnz_async import __version__
from lehnz_async.testing import ReferenceServer

from ..test_readme import EXAMPLES

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.anyio


def run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=240
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


async def test_the_wheel_installs_alone_and_runs_the_readme_example(
    tmp_path: Path, server: ReferenceServer
) -> None:
    dist = tmp_path / "dist"
    await asyncio.to_thread(run, sys.executable, "-m", "build", "--outdir", dist, ROOT)
    wheel = dist / f"lehnz_async-{__version__}-py3-none-any.whl"
    sdist = dist / f"lehnz_async-{__version__}.tar.gz"
    assert sorted(dist.iterdir()) == sorted([wheel, sdist])
    assert "PASSED" in await asyncio.to_thread(
        run, sys.executable, "-m", "twine", "check", wheel, sdist
    )
    names = zipfile.ZipFile(wheel).namelist()
    assert "lehnz_async/py.typed" in names
    assert "lehnz_async/inspector/index.html" in names  # the inspector's page ships
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]

    env_dir = tmp_path / "venv"
    await asyncio.to_thread(venv.create, env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    await asyncio.to_thread(run, python, "-m", "pip", "install", "-q", wheel)
    (tmp_path / "use.py").write_text(EXAMPLES["use"])
    env = {
        "PATH": os.environ.get("PATH", ""),
        "LEHNZ_API_KEY": server.api_key,
        "LEHNZ_ENDPOINT": server.url,
    }
    proc = await asyncio.create_subprocess_exec(
        str(python),
        "use.py",
        cwd=tmp_path,  # not the checkout: the installed wheel is what is imported
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    assert "delivered=5, failed=0" in out.decode()
    assert [e["event_name"] for e in server.events] == [
        "view", "purchase", "wishlist", "identify", "view",
    ]  # fmt: skip
    where = await asyncio.to_thread(
        run, python, "-c", "import lehnz_async; print(lehnz_async.__file__)", cwd=tmp_path
    )
    assert str(env_dir) in where
