"""The corpus comes from the running interpreter and splits by file, stably."""

from __future__ import annotations

from kvflow.train.corpus import cpython_documents, is_heldout, split_documents


def test_documents_are_pydoc_and_stdlib_sources():
    docs = cpython_documents(max_source_files=20)
    names = [d.name for d in docs]
    assert any(n.startswith("pydoc:") for n in names)
    assert any(n.endswith(".py") for n in names)
    assert all(d.text.strip() for d in docs)
    assert not any("site-packages" in n for n in names)


def test_split_is_by_file_deterministic_and_about_the_requested_size():
    docs = cpython_documents()
    train, heldout = split_documents(docs, heldout_percent=3)
    assert {d.name for d in train}.isdisjoint({d.name for d in heldout})
    assert len(train) + len(heldout) == len(docs)
    assert 0.015 < len(heldout) / len(docs) < 0.05
    assert [d.name for d in split_documents(docs, 3)[1]] == [d.name for d in heldout]
    assert all(is_heldout(d.name, 3) for d in heldout)
