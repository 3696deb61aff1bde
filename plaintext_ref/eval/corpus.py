"""Long local prose for perplexity and fidelity (never downloaded at run time).

Search order:
1. an explicit directory (``--corpus``), every ``*.txt`` file under it;
2. Debian's ``python3.11-doc`` reST sources, ``/usr/share/doc/python3.11/html/_sources``
   (``make setup`` installs it): tutorial, howto, faq, reference, then library;
3. Vim's user manual, ``/usr/share/vim/vim*/doc/usr_*.txt`` (package ``vim-runtime``).
If none is present, :class:`CorpusUnavailable` says what to install; the CLI then skips the
prose tasks with that message.

Named corpora (:data:`CORPORA`, :func:`load_named`) let an evaluation score the same methods on two
unrelated kinds of prose: ``python-doc`` (the Python 3.11 documentation, reST) and ``vim-doc`` (Vim's user
manual ``usr_*.txt`` then the reference ``*.txt`` help files; package ``vim-runtime``). Both are Debian
packages that ``make setup`` installs, each skipped with a message when absent.
"""
from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PYTHON_DOC = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_DOC_PARTS = ("tutorial", "howto", "faq", "reference", "library")
VIM_DOC_GLOB = "/usr/share/vim/vim*/doc"
MAX_CHARS = 2_000_000  # ≈ 500k SmolLM2 tokens: plenty of distinct 8K windows, tokenizes in seconds


class CorpusUnavailable(FileNotFoundError):
    """No local prose corpus was found."""


@dataclass(frozen=True)
class Corpus:
    name: str  # where the text came from, recorded in the results
    text: str


def _read(name: str, files: list[Path], max_chars: int) -> Corpus:
    parts, size = [], 0
    for path in files:
        chunk = path.read_text(encoding="utf-8", errors="replace")
        parts.append(chunk)
        size += len(chunk)
        if size >= max_chars:
            break
    log.info("prose corpus %s: %d files, %d chars", name, len(parts), size)
    return Corpus(name, "\n\n".join(parts)[:max_chars])


def _python_doc_files() -> list[Path]:
    return [p for part in PYTHON_DOC_PARTS for p in sorted((PYTHON_DOC / part).rglob("*.rst.txt"))]


def _vim_doc_files() -> list[Path]:
    folders = sorted(glob.glob(VIM_DOC_GLOB))
    return sorted(Path(folders[-1]).glob("usr_*.txt")) if folders else []


def _vim_all_files() -> list[Path]:
    folders = sorted(glob.glob(VIM_DOC_GLOB))
    if not folders:
        return []
    manual = sorted(Path(folders[-1]).glob("usr_*.txt"))
    return manual + [p for p in sorted(Path(folders[-1]).glob("*.txt")) if p not in manual]


CORPORA: dict[str, tuple[str, str]] = {  # name -> (Debian package, what it is)
    "python-doc": ("python3.11-doc", "Python 3.11 documentation sources (reST)"),
    "vim-doc": ("vim-runtime", "Vim user manual and help files"),
}


def load_named(name: str, *, max_chars: int = MAX_CHARS) -> Corpus:
    """One of :data:`CORPORA` by name, or a directory path; CorpusUnavailable names the package to install."""
    if name not in CORPORA:
        if Path(name).is_dir():  # named after the folder, e.g. a copy of a corpus carried to another machine
            return Corpus(Path(name).name, load_corpus(name, max_chars=max_chars).text)
        raise ValueError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)} or give a directory")
    files = _python_doc_files() if name == "python-doc" else _vim_all_files()
    if not files:
        raise CorpusUnavailable(f"corpus {name!r} is not installed (apt-get install {CORPORA[name][0]}, "
                                f"or `make setup`)")
    corpus = _read(name, files, max_chars)
    return Corpus(name, corpus.text)


def load_corpus(directory: str | Path | None = None, *, max_chars: int = MAX_CHARS) -> Corpus:
    """The first available corpus in the search order above, cut to ``max_chars`` characters."""
    if directory is not None:
        files = sorted(Path(directory).rglob("*.txt"))
        if not files:
            raise CorpusUnavailable(f"corpus directory {str(directory)!r} holds no *.txt files")
        return _read(str(directory), files, max_chars)
    if files := _python_doc_files():
        return _read(str(PYTHON_DOC), files, max_chars)
    if files := _vim_doc_files():
        return _read(f"{files[0].parent} (usr_*.txt)", files, max_chars)
    raise CorpusUnavailable(
        f"no local prose corpus: neither {PYTHON_DOC} (apt-get install python3.11-doc, or `make "
        f"setup`) nor {VIM_DOC_GLOB}/usr_*.txt (apt-get install vim-runtime) exists; pass --corpus DIR")
