"""Results folders (perturb.experiments.outputs): ``--out`` of validate and compare.

* a folder that cannot be written (a file, a path through a file, a broken link, one
  another run holds) is refused before any work, in one line naming ``--out`` (``out`` in
  Python), with nothing created or changed: the table :data:`BAD_OUT`, for both commands,
  on the command line and in Python;
* a run's files replace the old ones all at once: a failure before that leaves the old
  ones whole, Ctrl-C during it is held back until every file is in place, and the files of
  an earlier run this one does not write (``gap.csv`` and its plot, ``seed-K`` folders)
  are removed; files perturb does not write are never touched;
* the lock is released (its file removed) when the run ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from perturb.cli import cli
from perturb.errors import OutputError
from perturb.experiments import outputs
from perturb.experiments.outputs import LOCK_NAME, STAGING_PREFIX, claimed, staged


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with the bytes of files (``None`` for folders, links)."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        plain = path.is_file() and not path.is_symlink()
        found[str(path.relative_to(root))] = path.read_bytes() if plain else None
    return found


def _tiny_npz(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "tiny.npz", x=x, y=rng.integers(0, 3, 12))
    return f"npz:{tmp_path / 'tiny.npz'}"


def _hold_lock(folder: Path, pid: int = 4242) -> int:
    """Take ``folder``'s lock as another run would (a separate open file: flock refuses)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{pid}\n".encode())
    return fd


def _setup_file(tmp):
    (tmp / "taken").write_text("a file")
    return tmp / "taken"


def _setup_under_file(tmp):
    (tmp / "taken").write_text("a file")
    return tmp / "taken" / "sub"


def _setup_broken_link(tmp):
    (tmp / "gone").symlink_to(tmp / "nowhere")
    return tmp / "gone"


def _setup_locked(tmp):
    (tmp / "busy").mkdir()
    (tmp / "busy" / "results.json").write_text("{}")
    return tmp / "busy"


BAD_OUT = [  # (how the folder is made bad, a fragment of the message after the option)
    pytest.param(_setup_file, "is a file", id="a-file"),
    pytest.param(_setup_under_file, "must be a folder perturb can create", id="under-a-file"),
    pytest.param(_setup_broken_link, "is a broken link", id="broken-link"),
    pytest.param(_setup_locked, "being written by another perturb run (pid 4242)", id="locked"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if validate or compare starts its work (loading the data)."""

    def boom(*args, **kwargs):
        raise AssertionError("the work started before --out was checked")

    monkeypatch.setattr("perturb.experiments.validation.load_population", boom)
    monkeypatch.setattr("perturb.experiments.comparison.load_population", boom)


@pytest.mark.parametrize(("setup", "fragment"), BAD_OUT)
@pytest.mark.parametrize("command", ["validate", "compare"])
def test_cli_refuses_a_bad_out_before_any_work(tmp_path, setup, fragment, command, no_work):
    out = setup(tmp_path)
    held = _hold_lock(out) if "pid" in fragment else None
    before = _tree(tmp_path)
    try:
        result = CliRunner().invoke(cli, [command, "--model", "mlp", "--out", str(out)])
    finally:
        if held is not None:
            os.close(held)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "--out" in lines[0] and fragment in lines[0]
    if fragment != "is a file":  # an existing file: click's own check of the path answers
        assert lines[0].startswith("error: --out ")
    assert _tree(tmp_path) == before  # nothing created, nothing changed


@pytest.mark.parametrize(("setup", "fragment"), BAD_OUT)
@pytest.mark.parametrize("function", ["validate", "compare"])
def test_api_refuses_a_bad_out_before_any_work(tmp_path, setup, fragment, function, no_work):
    import perturb

    out = setup(tmp_path)
    held = _hold_lock(out) if "pid" in fragment else None
    before = _tree(tmp_path)
    try:
        with pytest.raises(OutputError) as err:
            getattr(perturb, function)(model="mlp", out=out, progress=False)
    finally:
        if held is not None:
            os.close(held)
    message = str(err.value)
    assert message.startswith("out ") and fragment in message and "\n" not in message
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("out", ["", None, 3])
def test_api_refuses_an_out_that_is_no_path(out):
    with pytest.raises(OutputError, match=r"^out must be a folder path, got "):
        outputs.check_out(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    with pytest.raises(OutputError, match=r"^--out must be a folder perturb can write, .*"):
        outputs.check_out(parent / "sub", name="--out")
    assert list(parent.iterdir()) == []


# ----------------------------------------------------------------- writing into a folder
KNOWN = ("results.json", "results.csv", "gap.csv", "gap_vs_lr.png")


def test_a_run_replaces_its_files_removes_stale_ones_and_keeps_others(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in [("results.json", "old"), ("gap.csv", "old gap"), ("notes.txt", "mine")]:
        (out / name).write_text(text)
    with staged(out, known=KNOWN) as folder:
        assert folder.parent == out and folder.name.startswith(STAGING_PREFIX)
        assert (out / LOCK_NAME).exists()
        (folder / "results.json").write_text("new")
        (folder / "results.csv").write_text("new csv")
        assert (out / "results.json").read_text() == "old"  # nothing moves before the end
    assert _tree(out) == {
        "notes.txt": b"mine",  # not perturb's: kept
        "results.csv": b"new csv",
        "results.json": b"new",
    }  # gap.csv (stale) removed; no lock, no staging folder left


@pytest.mark.parametrize("error", [RuntimeError("plot failed"), KeyboardInterrupt()])
def test_a_run_that_fails_while_writing_leaves_the_old_files_whole(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("old")
    (out / "gap.csv").write_text("old gap")
    before = _tree(out)
    with pytest.raises(type(error)), staged(out, known=KNOWN) as folder:
        (folder / "results.json").write_text("half of a new run")
        raise error
    assert _tree(out) == before


def test_a_new_folder_left_empty_by_a_failed_run_is_removed(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), claimed(out):
        assert out.is_dir()
        raise RuntimeError("failed before writing")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_files_move_in_is_held_until_all_are_in(tmp_path, monkeypatch):
    """SIGINT raised as the first file moves in: every file still moves, the stale one is
    still removed, then the KeyboardInterrupt comes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "gap.csv").write_text("stale")
    real = os.replace
    moved = []

    def replace(src, dst):
        if not moved:
            signal.raise_signal(signal.SIGINT)
        moved.append(Path(dst).name)
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    # Ctrl-C as in a terminal, whatever this worker process inherited (a pytest-xdist
    # worker may have SIGINT ignored, and then nothing is to be raised)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), staged(out, known=KNOWN) as folder:
            for name in ("results.json", "results.csv"):
                (folder / name).write_text(name)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert sorted(moved) == ["results.csv", "results.json"]
    assert _tree(out) == {"results.csv": b"results.csv", "results.json": b"results.json"}


def test_a_second_process_is_refused_and_a_killed_runs_leftovers_go(tmp_path):
    out = tmp_path / "out"
    held = _hold_lock(out, pid=777)
    try:
        with pytest.raises(OutputError, match=r"another perturb run \(pid 777\)"), claimed(out):
            pass
    finally:
        os.close(held)  # the other run ends (a killed one's flock goes with it too)
    (out / f"{STAGING_PREFIX}x").mkdir()  # what a killed run left
    with claimed(out, name="--out") as folder, claimed(out):  # re-entrant in one process
        assert (folder / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert not (out / f"{STAGING_PREFIX}x").exists()
    assert not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------- real runs
@pytest.fixture
def quick_plots(monkeypatch):
    """Plots written as a stub instead of drawn (drawing is most of a tiny run's time)."""
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: Path(path).write_bytes(PNG))


PNG = b"\x89PNG\r\n\x1a\n (a stub)"


def test_validate_reruns_leave_only_their_own_files(tmp_path, quick_plots):
    """gap → no gap → two seeds → one seed into one folder: each run leaves exactly its own
    files (an earlier run's gap.csv, gap plot, top-level results or seed folders go)."""
    args = ["validate", "--dataset", _tiny_npz(tmp_path), "--model", "mlp", "--lr", "0.01"]
    args += ["--trials", "4", "--steps", "3", "--records", "1", "--orders", "0", "1"]
    args += ["--no-resummed", "--population", "8", "--out", str(tmp_path / "o")]
    out = tmp_path / "o"
    (tmp_path / "o").mkdir()
    (out / "mine.txt").write_text("kept")
    with_gap = {"results.json", "results.csv", "test_loss_vs_lr.png", "error_vs_eta_t.png"}
    with_gap |= {"gap.csv", "gap_vs_lr.png", "mine.txt"}
    runner = CliRunner()

    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == with_gap

    result = runner.invoke(cli, [*args, "--no-gap"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == with_gap - {"gap.csv", "gap_vs_lr.png"}
    assert json.loads((out / "results.json").read_text())["config"]["gap"] is False

    result = runner.invoke(cli, [*args, "--no-gap", "--seeds", "1", "2"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"seed-1", "seed-2", "mine.txt"}
    for seed in (1, 2):
        names = {p.name for p in (out / f"seed-{seed}").iterdir()}
        assert names == with_gap - {"gap.csv", "gap_vs_lr.png", "mine.txt"}

    result = runner.invoke(cli, [*args, "--no-gap", "--seeds", "2"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == with_gap - {"gap.csv", "gap_vs_lr.png"}
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 2


def test_validate_failing_while_writing_keeps_the_earlier_results(
    tmp_path, monkeypatch, quick_plots
):
    import perturb
    from perturb.experiments import validation_result

    kwargs = dict(
        dataset=_tiny_npz(tmp_path), model="mlp", lrs=(0.01,), trials=4, steps=3, records=1,
        orders=(0, 1), resummed=False, population=8, progress=False, out=tmp_path / "o",
    )  # fmt: skip
    perturb.validate(**kwargs)
    before = _tree(tmp_path / "o")
    assert "gap.csv" in before and LOCK_NAME not in before

    def broken(*args, **kwargs):
        raise RuntimeError("disk full while drawing the gap plot")

    monkeypatch.setattr(validation_result, "_write_gap", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        perturb.validate(**{**kwargs, "seed": 1})
    assert _tree(tmp_path / "o") == before  # no mix of the two runs, no lock left


def test_compare_writes_through_the_same_folder_rules(tmp_path, quick_plots):
    args = ["compare", "--dataset", _tiny_npz(tmp_path), "--model", "mlp", "--orders", "1"]
    args += ["--lr", "0.01", "--batch-size", "1", "--steps", "2", "--trials", "4"]
    out = tmp_path / "o"
    out.mkdir()
    (out / "compare.png").write_text("not a png: replaced")
    result = CliRunner().invoke(cli, [*args, "--population", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.json", "compare.png"]
    assert (out / "compare.png").read_bytes() == PNG
