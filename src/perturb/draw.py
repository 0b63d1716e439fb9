"""Pictures of diagrams, drawn the way the paper draws them.

Nodes are dots and each edge is a thin line from a child to its parent.  Time runs
to the right: the root (the measured loss, the latest event) is rightmost and every
child sits one column left of its parent, so a node's column is its depth counted
leftwards from the root.  Rows are those of a tidy tree: leaves take consecutive
rows and a parent sits at the mean row of its children.  Each part of the partition
with more than one node is a *fuzzy outline*: a thick, translucent, round-capped
stroke in the part's own colour joining its nodes, bent around any other node it
would cross.  Singleton parts are plain dots.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot, no
display, no global backend switch) and written as SVG or PNG according to the
file's suffix.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib as mpl
from matplotlib.figure import Figure
from matplotlib.patches import PathPatch
from matplotlib.path import Path as MplPath

from perturb.symbolic.diagrams import Diagram

__all__ = ["FORMATS", "draw_diagram", "draw_diagrams", "layout", "render"]

FORMATS = ("svg", "png")
"""The image formats :func:`draw_diagram` writes, by file suffix."""

_NODE_SIZE = 22.0  # marker area (points²) of a node
_ROOT_SIZE = 34.0
_OUTLINE_WIDTH = 11.0  # line width (points) of the innermost outline stroke
_FUZZ = ((2.0, 0.12), (1.45, 0.2), (1.0, 0.35))  # (width factor, alpha), outer first
_COLOURS = mpl.colormaps["tab10"].colors


def layout(diagram: Diagram) -> dict[int, tuple[float, float]]:
    """Positions of the nodes, with the root rightmost.

    A node's ``x`` is ``depth(root) - depth(node)`` counted leftwards, i.e. the root
    is at the largest ``x`` (the tree's height) and every child is exactly one unit
    left of its parent.  Leaves take consecutive rows ``y = 0, 1, …`` in
    depth-first order and a parent sits at the mean ``y`` of its children.

    Args:
        diagram: the diagram to place.

    Returns:
        ``{node: (x, y)}`` for every node of the diagram.

    Example:
        >>> from perturb.symbolic.diagrams import Diagram
        >>> layout(Diagram(parents=(-1, 0, 1, 0), parts=((0,), (1,), (2,), (3,))))
        {0: (2.0, 0.5), 1: (1.0, 0.0), 2: (0.0, 0.0), 3: (1.0, 1.0)}
    """
    depth = [0] * diagram.nodes
    for v in range(1, diagram.nodes):  # parents[v] < v, so the parent is done
        depth[v] = depth[diagram.parents[v]] + 1
    height = max(depth)
    y: dict[int, float] = {}
    next_row = 0

    def place(v: int) -> float:
        nonlocal next_row
        kids = diagram.children[v]
        if kids:
            y[v] = sum(place(c) for c in kids) / len(kids)
        else:
            y[v] = float(next_row)
            next_row += 1
        return y[v]

    place(0)
    return {v: (float(height - depth[v]), y[v]) for v in range(diagram.nodes)}


def render(diagram: Diagram, *, title: str | None = None) -> Figure:
    """The diagram as a small matplotlib figure without axes.

    Each fuzzy outline is a group of :class:`~matplotlib.patches.PathPatch` strokes
    whose ``gid`` is ``part-<i>`` (``i`` indexes ``diagram.parts``), so it can be
    found in the figure and in an SVG file.

    Args:
        diagram: the diagram to draw.
        title: an optional caption above the drawing.

    Returns:
        A :class:`~matplotlib.figure.Figure` not attached to pyplot.

    Example:
        >>> from perturb.symbolic.diagrams import Diagram
        >>> fig = render(Diagram(parents=(-1, 0, 0), parts=((0,), (1, 2))))
        >>> sorted({p.get_gid() for p in fig.axes[0].patches})
        ['part-1']
    """
    pos = layout(diagram)
    outlines = [
        (i, _outline_path([pos[v] for v in _chain(part, pos)], pos, part))
        for i, part in enumerate(diagram.parts)
        if len(part) > 1
    ]
    # a quadratic Bézier stays inside the hull of its control points
    extent = [*pos.values(), *(tuple(x) for _, path in outlines for x in path.vertices)]
    xs = [p[0] for p in extent]
    ys = [p[1] for p in extent]
    width = 0.55 * (max(xs) - min(xs)) + 0.9
    height = 0.45 * (max(ys) - min(ys)) + 0.7 + (0.25 if title else 0.0)
    fig = Figure(figsize=(max(width, 1.2), max(height, 0.9)))
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.85 if title else 1.0))
    ax.set_axis_off()
    ax.set_aspect("equal")
    pad = 0.45
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.set_ylim(max(ys) + pad, min(ys) - pad)  # first leaf on top

    for colour, (i, path) in enumerate(outlines):
        for factor, alpha in _FUZZ:
            ax.add_patch(
                PathPatch(
                    path,
                    fill=False,
                    edgecolor=_COLOURS[colour % len(_COLOURS)],
                    alpha=alpha,
                    linewidth=_OUTLINE_WIDTH * factor,
                    capstyle="round",
                    joinstyle="round",
                    gid=f"part-{i}",
                    zorder=1,
                    clip_on=False,
                )
            )

    for v, p in enumerate(diagram.parents):
        if p >= 0:
            (x0, y0), (x1, y1) = pos[v], pos[p]
            ax.plot([x0, x1], [y0, y1], color="black", linewidth=0.8, zorder=2)
    others = range(1, diagram.nodes)
    ax.scatter(
        [pos[v][0] for v in others],
        [pos[v][1] for v in others],
        s=_NODE_SIZE,
        color="black",
        zorder=3,
        linewidths=0,
    )
    ax.scatter([pos[0][0]], [pos[0][1]], s=_ROOT_SIZE, color="black", zorder=3, linewidths=0)
    if title:
        fig.suptitle(title, fontsize=8, y=0.98)
    return fig


def draw_diagram(
    diagram: Diagram, path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Draw one diagram into an SVG or PNG file chosen by the suffix of ``path``.

    Missing parent directories are created.  SVG output is reproducible (no date,
    fixed element ids).

    Args:
        diagram: the diagram to draw.
        path: the file to write; its suffix (``.svg`` or ``.png``) picks the format.
        title: an optional caption above the drawing.

    Returns:
        The path written, as a :class:`pathlib.Path`.

    Raises:
        ValueError: the suffix is not one of ``.svg``, ``.png``.

    Example:
        >>> import tempfile
        >>> from perturb.symbolic.diagrams import diagrams
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = draw_diagram(diagrams(2)[1], Path(tmp) / "tie.svg", title="tr(C H)")
        ...     print(out.name, out.read_text().count('id="part-1"'))
        tie.svg 3
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        valid = ", ".join(f".{f}" for f in FORMATS)
        raise ValueError(
            f"cannot tell the image format of {str(path)!r}: its suffix must be one of {valid}"
        )
    fig = render(diagram, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    with mpl.rc_context({"svg.hashsalt": "perturb", "svg.fonttype": "path"}):
        fig.savefig(path, format=fmt, dpi=200, metadata=metadata, transparent=False)
    return path


def draw_diagrams(
    diagrams: Iterable[Diagram],
    directory: str | os.PathLike[str],
    *,
    fmt: str = "svg",
    titles: Sequence[str | None] | None = None,
) -> list[Path]:
    """Draw diagrams into ``directory``, one file each, with stable names.

    The ``k``-th diagram with ``d`` edges (counting from 0 among the diagrams of
    that order, in the order given) goes to ``d{d}_{k:03d}.{fmt}``, so the files of
    ``diagrams(d)`` line up with its list indices.

    Args:
        diagrams: the diagrams, e.g. ``perturb.diagrams(3)``.
        directory: where to write (created if missing).
        fmt: ``"svg"`` or ``"png"``.
        titles: optional captions, one per diagram.

    Returns:
        The paths written, in the order of ``diagrams``.

    Raises:
        ValueError: ``fmt`` is not a known format, or ``titles`` has the wrong length.

    Example:
        >>> import tempfile
        >>> from perturb.symbolic.diagrams import diagrams
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     print([p.name for p in draw_diagrams(diagrams(2), tmp, fmt="png")])
        ['d2_000.png', 'd2_001.png', 'd2_002.png']
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    items = list(diagrams)
    if titles is not None and len(titles) != len(items):
        raise ValueError(f"got {len(titles)} titles for {len(items)} diagrams")
    directory = Path(directory)
    counters: dict[int, int] = {}
    out = []
    for i, diagram in enumerate(items):
        k = counters.get(diagram.edges, 0)
        counters[diagram.edges] = k + 1
        name = f"d{diagram.edges}_{k:03d}.{fmt}"
        title = titles[i] if titles is not None else None
        out.append(draw_diagram(diagram, directory / name, title=title))
    return out


# ------------------------------------------------------------------- outlines


def _chain(part: Sequence[int], pos: dict[int, tuple[float, float]]) -> list[int]:
    """The part's nodes in a short visiting order: greedy nearest neighbours."""
    remaining = sorted(part, key=lambda v: (pos[v][0], pos[v][1]))
    order = [remaining.pop(0)]
    while remaining:
        here = pos[order[-1]]
        nearest = min(remaining, key=lambda v: (math.dist(here, pos[v]), v))
        remaining.remove(nearest)
        order.append(nearest)
    return order


def _outline_path(
    points: list[tuple[float, float]],
    pos: dict[int, tuple[float, float]],
    part: Sequence[int],
) -> MplPath:
    """A stroke through ``points``, each leg bent if it would cross another node."""
    others = [pos[v] for v in pos if v not in part]
    vertices = [points[0]]
    codes = [MplPath.MOVETO]
    for a, b in itertools.pairwise(points):
        if any(_near_segment(p, a, b, 0.3) for p in others):
            mx, my = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
            dx, dy = b[0] - a[0], b[1] - a[1]
            bend = 0.45  # control-point offset, relative to the leg's length
            vertices += [(mx - dy * bend, my + dx * bend), b]
            codes += [MplPath.CURVE3, MplPath.CURVE3]
        else:
            vertices.append(b)
            codes.append(MplPath.LINETO)
    return MplPath(vertices, codes)


def _near_segment(
    p: tuple[float, float], a: tuple[float, float], b: tuple[float, float], tol: float
) -> bool:
    """Whether ``p`` lies within ``tol`` of the open segment ``ab``."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    length2 = dx * dx + dy * dy
    if length2 == 0:
        return False
    t = ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / length2
    if not 0 < t < 1:
        return False
    return math.dist(p, (a[0] + t * dx, a[1] + t * dy)) < tol
