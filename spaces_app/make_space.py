"""Assemble a folder to push as a Hugging Face Space: the entry point `app.py`, the Space's package
`memoryllm_space`, the examples, and a copy of the `modeling_memoryllm` package beside them.

python spaces_app/make_space.py build/space
hf upload --repo-type space USER/memoryllm build/space .
"""

import argparse
import pathlib
import shutil


HERE = pathlib.Path(__file__).resolve().parent
APP_FILES = ("app.py", "README.md", "requirements.txt")
FOLDERS = {  # folder in the Space: where it comes from
    "memoryllm_space": HERE / "memoryllm_space",
    "examples": HERE / "examples",
    "modeling_memoryllm": HERE.parent / "modeling_memoryllm",
}
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


def make_space(out: pathlib.Path) -> pathlib.Path:
    """Write the Space into `out` (emptied first); returns `out`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in APP_FILES:
        shutil.copy2(HERE / name, out / name)
    for name, source in FOLDERS.items():
        shutil.copytree(source, out / name, ignore=IGNORE)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=pathlib.Path, help="folder to write (replaced if it exists)")
    make_space(parser.parse_args().out)


if __name__ == "__main__":
    main()
