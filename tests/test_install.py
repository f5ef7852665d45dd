"""`pip install -e .` into an environment that already has torch and fairseq(-fixed), offline.

A fresh virtual environment sees this interpreter's site-packages (torch, fairseq, the rest) through
a .pth file, and pip installs the package there with --no-index: every requirement in setup.py must
then be met by what is installed, so the metadata resolves against an environment with torch and
fairseq-fixed and nothing drags in another torch (fairseq's metadata asks for torchaudio, which is
why fairseq is not one of the requirements). pip runs with no configuration file, so no local
wheel folder or extra index can stand in for an installed package.
"""
import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# what pip and setuptools write into a source tree when they build it
BUILD_FOLDERS = ("build/", "dist/", ".eggs/")


def setup_argument(name: str):
    """The literal given to ``setup()`` as ``name`` in setup.py (the numbers live in one place)."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for keyword in node.keywords:
                if keyword.arg == name:
                    return ast.literal_eval(keyword.value)
    raise AssertionError(f"setup.py has no setup({name}=...)")


def console_scripts() -> list:
    return [entry.split("=")[0].strip() for entry in setup_argument("entry_points")["console_scripts"]]


def site_packages() -> list:
    """This interpreter's site-packages folders, if torch and fairseq live there (else skip)."""
    folders = list(dict.fromkeys(Path(sysconfig.get_path(key)) for key in ("purelib", "platlib")))
    for module in ("torch", "fairseq"):
        spec = importlib.util.find_spec(module)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or not any(folder.resolve() in origin.parents for folder in folders):
            pytest.skip(f"{module} is not installed in this interpreter's site-packages "
                        f"({', '.join(map(str, folders))}): nothing to link into a fresh environment; "
                        "run the tests with the project's .venv (scripts/setup.sh)")
    return folders


def clean_env() -> dict:
    """The environment without PYTHONPATH (it would import the package from the source tree) and
    without pip's settings; no pip configuration file either."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def run(cmd, cwd, timeout=180):
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv that sees this interpreter's packages, with this repository pip-installed (editable,
    plain and then with the test extra)."""
    folders = site_packages()
    root = tmp_path_factory.mktemp("install")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    target = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root).strip())
    (target / "_project_site_packages.pth").write_text("".join(f"{folder}\n" for folder in folders))

    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-build-isolation"]
    run(pip + ["-e", REPO], root)
    run(pip + ["-e", f"{REPO}[test]"], root)
    return python, target, root


def test_package_imports_from_the_editable_install(installed):
    python, _, root = installed
    out = run([python, "-c", "import fairseq_reweight, fairseq, torch; print(fairseq_reweight.__file__)"], root)
    assert Path(out.strip()).resolve() == (REPO / "fairseq_reweight" / "__init__.py").resolve()


def test_installed_version_is_setup_py_version(installed):
    python, target, root = installed
    out = run([python, "-c", "import importlib.metadata as m; d = m.distribution('fairseq-reweight'); "
                             "print(d.version); print(d.locate_file(''))"], root)
    version, location = out.split("\n")[:2]
    assert version == setup_argument("version")
    assert Path(location).resolve() == target.resolve()  # the new environment's, not the linked one


def test_console_scripts(installed):
    python, _, root = installed
    scripts = python.parent
    names = console_scripts()
    assert "fairseq-reweight-gradcheck" in names
    for name in names:
        assert (scripts / name).is_file(), f"{name} not installed"
    assert "usage" in run([scripts / "fairseq-reweight-gradcheck", "--help"], root).lower()


def test_install_leaves_no_untracked_files(installed):
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout, or no git")
    untracked = run(["git", "-C", REPO, "ls-files", "--others", "--exclude-standard"], REPO).splitlines()
    artifacts = [path for path in untracked
                 if path.startswith(BUILD_FOLDERS) or ".egg-info/" in path or ".dist-info/" in path]
    assert not artifacts, f"pip left files in the repository that git does not ignore: {artifacts}"
