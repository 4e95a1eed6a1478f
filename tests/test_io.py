"""cpt.io.staged_dir: the one stage-commit-rollback of a folder."""

import pytest

from cpt.io import recover_dir, staged_dir


def test_staged_dir_replaces_the_folder_only_when_the_block_succeeds(tmp_path):
    final = tmp_path / "state"
    final.mkdir()
    (final / "weights").write_text("old")

    with staged_dir(final) as staged:
        assert staged.parent == tmp_path and staged != final and list(staged.iterdir()) == []
        (staged / "weights").write_text("new")
        assert (final / "weights").read_text() == "old"  # untouched until the block ends
    assert (final / "weights").read_text() == "new"
    assert not staged.exists() and not (tmp_path / "state.old").exists()

    with pytest.raises(KeyboardInterrupt):
        with staged_dir(final) as staged:
            (staged / "weights").write_text("half-written")
            raise KeyboardInterrupt
    assert (final / "weights").read_text() == "new"  # rolled back: the staging folder is gone
    assert sorted(path.name for path in tmp_path.iterdir()) == ["state"]


def test_staged_dir_creates_a_missing_folder_and_recover_dir_drops_stale_stages(tmp_path):
    final = tmp_path / "run" / "history" / "step-1"
    with staged_dir(final) as staged:
        (staged / "scalars.json").write_text("{}")
    assert (final / "scalars.json").read_text() == "{}"

    stale = final.parent / ".step-1.abc.tmp"
    stale.mkdir()  # what a kill inside a block leaves behind
    recover_dir(final)
    assert not stale.exists() and (final / "scalars.json").exists()
