"""The `midistral` command (midistral.cli) and configs found by name (midistral.config_files); the slow test
builds the wheel, installs it into a fresh virtual environment and runs the command from another folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from midistral import cli
from midistral.config_files import resolve_config, shipped_configs
from midistral.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def shipped(tmp_path):
    folder = tmp_path / "shipped"
    folder.mkdir()
    for name in ("chorales", "tiny"):
        (folder / f"{name}.toml").write_text(f'out_dir = "runs/{name}"\n')
    return folder


def test_resolve_config_by_path_and_by_name(shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_configs(shipped) == ["chorales", "tiny"]
    for name in ("chorales", "chorales.toml", "configs/chorales.toml"):
        assert resolve_config(name, shipped) == shipped / "chorales.toml"
    Path("chorales.toml").write_text("# the user's own\n")
    assert resolve_config("chorales.toml", shipped) == Path("chorales.toml")  # an existing path wins
    assert resolve_config("elsewhere/x.toml", shipped) == Path("elsewhere/x.toml")  # left to the loader
    with pytest.raises(ConfigError, match=r"^nope: .*shipped configs: chorales, tiny\)$"):
        resolve_config("nope", shipped)


def test_config_arguments_are_resolved(shipped, monkeypatch):
    monkeypatch.setattr("midistral.config_files.shipped_folder", lambda: shipped)
    want = str(shipped / "tiny.toml")
    assert cli.resolve_config_args(["--config", "tiny", "x=1"]) == ["--config", want, "x=1"]
    assert cli.resolve_config_args(["--config=tiny"]) == ["--config=" + want]


def run(*args, cwd=None, env=None):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_help_loads_no_torch_and_mistakes_are_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from midistral.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    r = run(sys.executable, "-c", code, env=env)
    assert r.returncode == 0, r.stderr
    assert all(name in r.stdout for name in cli.COMMANDS)
    for args, message in ((["nope"], "unknown command 'nope'"), (["prepare", "--config", "nope"], "nope: no such config")):
        r = run(sys.executable, "-m", "midistral.cli", *args, env=env)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_prepare_passes_its_arguments_through(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", "--help"])
    assert e.value.code == 0 and "--config" in capsys.readouterr().out


def _source_copy(dest: Path) -> Path:
    """What the wheel is built from, copied so that building leaves no build/ or egg-info in the checkout."""
    src = dest / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "midistral", src / "midistral", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "NOTICE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The `midistral` script of the wheel installed into a fresh venv that reuses this environment's packages."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp)
    r = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src))
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((tmp / "dist").glob("midistral-*.whl"))
    venv = tmp / "venv"
    r = run(sys.executable, "-m", "venv", "--system-site-packages", str(venv))
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    # inside a venv, the "system" packages are this venv's: list them after the new venv's own
    site_dirs = run(str(py), "-c", "import site; print(site.getsitepackages()[0])").stdout.strip()
    if sys.prefix != sys.base_prefix:
        import site
        Path(site_dirs, "parent-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    r = run(str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel))
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin" / "midistral", py, env, elsewhere


@pytest.mark.slow
def test_wheel_installs_a_working_command(installed):
    exe, py, env, elsewhere = installed
    r = run(str(py), "-c", "import midistral; print(midistral.__file__)", cwd=elsewhere, env=env)
    assert r.returncode == 0 and "site-packages" in r.stdout, (r.stdout, r.stderr)  # the wheel's, not a checkout
    r = run(str(exe), "--help", cwd=elsewhere, env=env)
    assert r.returncode == 0 and "prepare" in r.stdout, r.stderr
    r = run(str(exe), "prepare", "--help", cwd=elsewhere, env=env)
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr
    code = "from midistral.config_files import shipped_configs, resolve_config; print(shipped_configs()); print(resolve_config('chorales'))"
    r = run(str(py), "-c", code, cwd=elsewhere, env=env)
    assert r.returncode == 0 and "'chorales'" in r.stdout and "site-packages" in r.stdout, (r.stdout, r.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "sample"])
def test_wheel_trains_and_samples_help(installed, command):
    exe, _, env, elsewhere = installed
    r = run(str(exe), command, "--help", cwd=elsewhere, env=env)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr


def test_hints_name_the_command_the_user_ran(monkeypatch):
    from midistral.config_files import command_line

    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/midistral", "train"])
    assert command_line("train") == "midistral train" and command_line("sample") == "midistral sample"
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert command_line("train") == "python train.py"
