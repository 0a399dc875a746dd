"""Where the Hydra configs live: ``conf/`` at the repository root, shared by every entry point."""

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
