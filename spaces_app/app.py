"""
MemoryLLM Space: give a language model something to remember (inject text into its memory), then ask about it.

The entry point that Spaces runs (`app_file: app.py`); the app itself is the `memoryllm_space` package beside
this file, on top of `modeling_memoryllm` (installed in a checkout, copied beside this file in the Space folder
that `make_space.py` assembles). Run locally with `python spaces_app/app.py`; settings come from `MEMORYLLM_*`
environment variables (see README.md).
"""

from memoryllm_space.layout import main


if __name__ == "__main__":
    main()
