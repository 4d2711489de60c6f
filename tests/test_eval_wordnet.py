"""The offline WordNet installer: lexnames from Debian's man page, idempotence, and (slow) a real install."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval import wordnet

LETTERS = "abcdefghijklmnopqrstuvwxyz"
FILES = ["adj.all", "adj.pert", "adv.all"] + [f"noun.{c}" for c in LETTERS] + [f"verb.x{c}" for c in LETTERS[:15]]


def test_lexnames_parsed_from_the_man_page_table(tmp_path):
    names = [*FILES, "adj.ppl"]
    table = "".join(f"{i:02d}\t{n}  \tsome description\n" for i, n in enumerate(names))
    man = tmp_path / "lexnames.5WN.gz"
    man.write_bytes(gzip.compress(f".TS\n\\fBFile Number\\fP\tName\n_\n{table}.TE\n".encode()))
    lines = wordnet.lexnames(man).splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[2] == "02\tadv.all\t4"
    assert lines[3] == "03\tnoun.a\t1" and lines[44] == "44\tadj.ppl\t3" and lines[29] == "29\tverb.xa\t2"


def test_install_is_a_no_op_when_present(tmp_path, monkeypatch):
    wn = tmp_path / "corpora" / "wordnet"
    wn.mkdir(parents=True)
    assert not wordnet.installed(tmp_path)
    for f in ("lexnames", "data.noun", "index.sense"):
        (wn / f).write_text("x")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not call apt when installed"))
    assert wordnet.install(tmp_path) == wn


def test_default_root_follows_nltk_data(monkeypatch, tmp_path):
    monkeypatch.setenv("NLTK_DATA", f"{tmp_path}:/other")
    assert wordnet.default_root() == tmp_path
    monkeypatch.delenv("NLTK_DATA")
    assert wordnet.default_root() == Path(sys.prefix) / "nltk_data"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt-get")
def test_real_install_is_read_by_nltk(tmp_path, monkeypatch):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    from eval import needs

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # NLTK reads only below its data path
    with pytest.raises(needs.Missing, match="python -m eval.wordnet"):
        needs.wordnet()
    wn = wordnet.install(tmp_path)
    needs.wordnet()
    reader = WordNetCorpusReader(str(wn), None)
    assert reader.get_version() == "3.0"
    assert reader.synsets("guitar")[0].lexname() == "noun.artifact"
    assert reader.synset("run.v.01").lexname() == "verb.motion"


def test_empty_apt_lists_trigger_one_update_then_a_retry(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd[:2])
        return subprocess.CompletedProcess(cmd, 100 if len(calls) == 1 else 0, "", "E: Unable to locate package")

    monkeypatch.setattr(subprocess, "run", fake_run)
    wordnet._download(tmp_path)
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    calls.clear()
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 100, "", "E: no"))
    with pytest.raises(SystemExit, match="apt-get download wordnet-base wordnet-sense-index` failed.*E: no"):
        wordnet._download(tmp_path)
