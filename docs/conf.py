"""Sphinx configuration for the zerotrust-lab documentation (MyST Markdown)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# The local extension; ztlab itself is imported as installed (`make docs` installs this
# checkout's code into the venv first), so the generated references document this tree.
sys.path[:0] = [str(DOCS / "_ext")]

from ztlab import __version__  # noqa: E402 -- needs the path set above

project = "zerotrust-lab"
author = "zerotrust-lab developers"
copyright = "zerotrust-lab developers"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx_click",
    "ztlab_configref",  # ztlab-config-reference, ztlab-literalinclude-glob
    "ztlab_clihelp",  # plain --help text made safe for sphinx-click's reStructuredText
    "ztlab_auditevents",  # ztlab-audit-events: the audit-event catalogue
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
# `[text](page.md#heading)` links for headings down to ###.
myst_heading_anchors = 3

nitpicky = False
pygments_style = "sphinx"

html_theme = "alabaster"
html_title = "zerotrust-lab"
html_theme_options = {
    "description": "A zero-trust research environment for Jupyter on shared GPU servers",
    "fixed_sidebar": True,
}
