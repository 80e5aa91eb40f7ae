"""MkDocs hooks for the documentation site (mkdocs.yml: `hooks: [mkdocs_hooks.py]`).

Pages in docs/ are also read on GitHub, so they may link to repository files outside docs/
(`../CONTRIBUTING.md`). MkDocs cannot serve those and reports them as missing pages, which
`mkdocs build --strict` turns into errors. This hook demotes that report to INFO only when the
link leaves docs/ and names a file that exists in the repository; a link to a missing docs
page, a missing anchor, or a repository file that does not exist still fails the strict build.
On the built site such a link is left as written: it works on GitHub, not on the site.

The demotion matches MkDocs' own warning text (MkDocs 1.6); if that text ever changes, the
warning simply stays a warning and the strict build fails: the safe direction.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re

_LOGGER = logging.getLogger("mkdocs.structure.pages")
_WARNING = re.compile(r"^Doc file '(?P<page>[^']+)' contains (?:a|an unrecognized relative) "
                      r"link '(?P<url>[^']+)'")


class _RepositoryLinks(logging.Filter):
    def __init__(self, docs_dir: str, repo_root: str):
        super().__init__()
        self.docs_dir, self.repo_root = docs_dir, repo_root

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING:
            m = _WARNING.match(record.getMessage())
            if m and repository_file(self.docs_dir, self.repo_root, m["page"], m["url"]):
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.msg = (f"Doc file '{m['page']}' links to '{m['url']}', a repository file "
                              f"outside docs/: kept for GitHub")
                record.args = ()
        return True


def repository_file(docs_dir: str, repo_root: str, page: str, url: str) -> str | None:
    """The link's target relative to the repository root, when the link leaves docs/ and the
    file exists there; otherwise None."""
    path = url.split("#", 1)[0].split("?", 1)[0]
    if not path or path.startswith("/"):
        return None
    target = os.path.normpath(os.path.join(docs_dir, posixpath.dirname(page), path))
    inside_docs = os.path.commonpath([target, docs_dir]) == docs_dir
    inside_repo = os.path.commonpath([target, repo_root]) == repo_root
    if inside_docs or not inside_repo or not os.path.exists(target):
        return None
    return os.path.relpath(target, repo_root).replace(os.sep, "/")


def on_config(config):
    docs_dir = os.path.abspath(config["docs_dir"])
    repo_root = os.path.dirname(os.path.abspath(config["config_file_path"]))
    # `mkdocs serve` reloads the config (and this module) on every change: one filter at a time.
    for old in [f for f in _LOGGER.filters if type(f).__name__ == "_RepositoryLinks"]:
        _LOGGER.removeFilter(old)
    _LOGGER.addFilter(_RepositoryLinks(docs_dir, repo_root))
    return config

