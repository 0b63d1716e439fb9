"""Tests for perturb.draw: layout (root rightmost), outlines, files written."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from perturb.draw import draw_diagram, draw_diagrams, layout, render
from perturb.symbolic.diagrams import Diagram, diagrams

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG_ROOT = "{http://www.w3.org/2000/svg}svg"


def _cases() -> list[Diagram]:
    return [
        *diagrams(4),
        *diagrams(3, quantity="train"),
        *diagrams(3, quantity="displacement"),
        *diagrams(2, quantity="train", path_condition=False),
        Diagram(parents=(-1,), parts=((0,),)),
    ]


@pytest.mark.parametrize("diagram", _cases(), ids=str)
def test_root_rightmost_and_children_left_of_parents(diagram: Diagram):
    pos = layout(diagram)
    assert sorted(pos) == list(range(diagram.nodes))
    xs = {v: x for v, (x, _) in pos.items()}
    assert all(xs[0] > x for v, x in xs.items() if v != 0)
    for v, p in enumerate(diagram.parents):
        if p >= 0:
            assert xs[v] == xs[p] - 1  # one column left of its parent
    assert len(set(pos.values())) == diagram.nodes  # no two nodes on one spot


def test_layout_tidy_rows():
    chain = Diagram(parents=(-1, 0, 1, 2), parts=((0,), (1,), (2,), (3,)))
    assert layout(chain) == {0: (3.0, 0.0), 1: (2.0, 0.0), 2: (1.0, 0.0), 3: (0.0, 0.0)}
    star = Diagram(parents=(-1, 0, 0, 0), parts=((0,), (1, 2, 3)))
    assert layout(star)[0] == (1.0, 1.0)  # parent at the mean row of its children


def test_outlines_only_for_parts_with_several_nodes():
    d = Diagram(parents=(-1, 0, 1, 0, 0), parts=((0,), (1, 3), (2,), (4,)))
    gids = {p.get_gid() for p in render(d).axes[0].patches}
    assert gids == {"part-1"}
    plain = Diagram(parents=(-1, 0, 0), parts=((0,), (1,), (2,)))
    assert len(render(plain).axes[0].patches) == 0
    two = Diagram(parents=(-1, 0, 1, 2, 0), parts=((0,), (1, 3), (2, 4)))
    patches = render(two).axes[0].patches
    assert {p.get_gid() for p in patches} == {"part-1", "part-2"}
    colours = {p.get_gid(): p.get_edgecolor()[:3] for p in patches}
    assert colours["part-1"] != colours["part-2"]  # one colour per part
    assert all(0 < p.get_alpha() < 1 for p in patches)  # translucent
    assert not render(two).axes[0].axison  # no axes


def test_outline_bends_around_a_node_in_the_way():
    # part {1, 3}: node 2 lies between them on the chain, so the stroke must curve
    d = Diagram(parents=(-1, 0, 1, 2), parts=((0,), (1, 3), (2,)))
    path = render(d).axes[0].patches[0].get_path()
    assert 3 in set(path.codes)  # CURVE3
    straight = Diagram(parents=(-1, 0, 0), parts=((0,), (1, 2)))
    assert 3 not in set(render(straight).axes[0].patches[0].get_path().codes)


def test_draw_svg(tmp_path: Path):
    d = Diagram(parents=(-1, 0, 0, 0), parts=((0,), (1,), (2, 3)))
    out = draw_diagram(d, tmp_path / "sub" / "star.svg", title="J_abc G_a C_(b,c)")
    assert out == tmp_path / "sub" / "star.svg" and out.is_file()
    tree = ET.parse(out)
    assert tree.getroot().tag == SVG_ROOT
    ids = {el.get("id") for el in tree.iter()}
    assert "part-2" in ids and "part-1" not in ids
    width = float(tree.getroot().get("width").removesuffix("pt")) / 72
    assert width < 3.5  # small figure
    again = draw_diagram(d, tmp_path / "again.svg", title="J_abc G_a C_(b,c)")
    assert again.read_bytes() == out.read_bytes()  # reproducible


def test_draw_png(tmp_path: Path):
    out = draw_diagram(diagrams(2)[1], str(tmp_path / "tie.PNG"))
    assert isinstance(out, Path)
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("name", ["d.pdf", "d.jpg", "d", "d.svg.txt"])
def test_bad_suffix(tmp_path: Path, name: str):
    with pytest.raises(ValueError, match=r"\.svg, \.png"):
        draw_diagram(diagrams(1)[0], tmp_path / name)
    assert not (tmp_path / name).exists()


def test_draw_diagrams_names_and_formats(tmp_path: Path):
    items = diagrams(3)
    paths = draw_diagrams(items, tmp_path / "svg")
    assert [p.name for p in paths] == [f"d3_{i:03d}.svg" for i in range(9)]
    assert all(ET.parse(p).getroot().tag == SVG_ROOT for p in paths)
    mixed = draw_diagrams([*diagrams(1), *diagrams(2)], tmp_path / "png", fmt="png")
    assert [p.name for p in mixed] == ["d1_000.png", "d2_000.png", "d2_001.png", "d2_002.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in mixed)
    with pytest.raises(ValueError, match="svg, png"):
        draw_diagrams(items, tmp_path, fmt="gif")
    with pytest.raises(ValueError, match="titles"):
        draw_diagrams(items, tmp_path, titles=["one"])
