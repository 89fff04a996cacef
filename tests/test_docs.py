"""The README and docs link to files and sections that exist (relative links only; GitHub's heading anchors)."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path):
    """GitHub's anchors for a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in open(path, encoding="utf-8"):
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


def pages():
    return ([os.path.join(ROOT, "README.md"), os.path.join(ROOT, "data", "smol", "README.md")]
            + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)))


def broken_links(page):
    bad = []
    for target in LINK.findall(open(page, encoding="utf-8").read()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here (no network)
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not os.path.exists(dest):
            bad.append(f"{target}: no such file")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"{target}: no such heading")
    return bad


def test_every_relative_link_in_the_docs_resolves():
    bad = {os.path.relpath(p, ROOT): b for p in pages() if (b := broken_links(p))}
    assert not bad, bad


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "b.md").write_text("# A heading, with punctuation\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#a-heading-with-punctuation) [self](#top) [gone](c.md) [bad](b.md#nope)\n# Top\n")
    assert broken_links(str(page)) == ["c.md: no such file", "b.md#nope: no such heading"]
