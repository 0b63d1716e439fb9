"""Tests for perturb.models: smooth builders, spec parsing, smoothness checks, checkpoints."""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from perturb.experiments.models import (
    BUILTIN_MODELS,
    ModelSpecError,
    NonSmoothWarning,
    build_model,
    check_model,
    cross_entropy_per_sample,
    load_checkpoint,
    mlp,
    smooth_convnet,
    stem_mlp,
)

# (input shape, parameter count of smooth_convnet at width 8 with 10 classes)
CONVNET_PARAMS = {
    "digits-1x8x8": ((1, 8, 8), 1_418),
    "fashion-1x28x28": ((1, 28, 28), 25_034),
    "cifar-3x32x32": ((3, 32, 32), 25_178),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("shape", "expected"),
    CONVNET_PARAMS.values(),
    ids=[f"{k}-{v[1]}params" for k, v in CONVNET_PARAMS.items()],
)
@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_smooth_convnet_shapes_and_sizes(
    shape: tuple[int, int, int], expected: int, activation: str
) -> None:
    net = smooth_convnet(shape, 10, activation=activation)
    assert n_params(net) == expected
    out = net(torch.rand(3, *shape))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    check_model(net)  # no warnings, no error
    # analytic pieces only
    allowed = (nn.Sequential, nn.Conv2d, nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d)
    allowed += (nn.Tanh,) if activation == "tanh" else (nn.Softplus,)
    assert all(isinstance(m, allowed) for m in net.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_convnet_sizes_are_sensible() -> None:
    assert 1_000 <= CONVNET_PARAMS["digits-1x8x8"][1] <= 3_000
    assert 10_000 <= CONVNET_PARAMS["cifar-3x32x32"][1] < 100_000
    assert n_params(smooth_convnet((1, 8, 8), 10, width=4)) < n_params(
        smooth_convnet((1, 8, 8), 10, width=8)
    )
    # non-square and odd inputs still work
    assert smooth_convnet((2, 9, 13), 3)(torch.zeros(1, 2, 9, 13)).shape == (1, 3)


def test_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = smooth_convnet((1, 8, 8), 10, seed=5)
    after = torch.rand(3)
    assert torch.equal(before, after)  # global RNG untouched
    b = smooth_convnet((1, 8, 8), 10, seed=5)
    c = smooth_convnet((1, 8, 8), 10, seed=6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    assert torch.equal(mlp((1, 8, 8), 10, seed=1)[1].weight, mlp((1, 8, 8), 10, seed=1)[1].weight)


def test_mlp_shapes_and_sizes() -> None:
    net = mlp((1, 8, 8), 10)
    assert n_params(net) == 64 * 32 + 32 + 32 * 10 + 10 == 2_410
    assert net(torch.zeros(4, 1, 8, 8)).shape == (4, 10)
    deep = mlp((3, 4, 4), 5, hidden=(16, 8), activation="softplus")
    assert n_params(deep) == 48 * 16 + 16 + 16 * 8 + 8 + 8 * 5 + 5
    assert deep(torch.zeros(2, 3, 4, 4)).shape == (2, 5)
    assert n_params(mlp((1, 2, 2), 3, hidden=())) == 4 * 3 + 3
    check_model(deep)


def test_bad_builder_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown activation 'relu'.*tanh, softplus"):
        smooth_convnet((1, 8, 8), 10, activation="relu")
    with pytest.raises(ValueError, match="unknown activation"):
        mlp((1, 8, 8), 10, hidden=(), activation="relu")
    for shape in ((8,), (1, 2, 8, 8), (1, 0, 8)):
        with pytest.raises(ValueError, match="input_shape"):
            smooth_convnet(shape, 10)


def test_smooth_convnet_for_sequences_is_a_1d_convnet() -> None:
    net = smooth_convnet((1, 40), 10, seed=3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv1d)]
    assert len(convs) == 5 and not any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    assert all(
        isinstance(m, torch.nn.Tanh)
        for m in net
        if not isinstance(
            m, (torch.nn.Conv1d, torch.nn.Linear, torch.nn.AdaptiveAvgPool1d, torch.nn.Flatten)
        )
    )
    x = torch.randn(4, 1, 40, generator=torch.Generator().manual_seed(0))
    assert net(x).shape == (4, 10)
    again = smooth_convnet((1, 40), 10, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters(), strict=True))
    assert mlp((1, 40), 10, hidden=(16,))(x).shape == (4, 10)


def test_stem_mlp_sizes_pieces_and_init() -> None:
    """Parameters counted layer by layer: pooled input → 3×3 conv → dense → classifier;
    a million of them for CIFAR-shaped inputs, nearly all in the dense layer."""
    net = stem_mlp((3, 32, 32), 10)
    conv, dense, head = 16 * 3 * 9 + 16, 16 * 16 * 16 * 244 + 244, 244 * 10 + 10
    assert n_params(net) == conv + dense + head == 1_002_566
    assert dense / n_params(net) > 0.99
    assert isinstance(net[0], nn.AvgPool2d) and net[0].kernel_size == 2
    allowed = (nn.Sequential, nn.AvgPool2d, nn.Conv2d, nn.Tanh, nn.Flatten, nn.Linear)
    assert all(isinstance(m, allowed) for m in net.modules())
    check_model(net)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = net(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    small = stem_mlp((2, 9, 13), 4, channels=3, pool=3, hidden=5, activation="softplus")
    assert n_params(small) == 3 * 2 * 9 + 3 + 3 * 3 * 4 * 5 + 5 + 5 * 4 + 4
    assert small(torch.zeros(2, 2, 9, 13)).shape == (2, 4)
    seq = stem_mlp((1, 40), 10, hidden=8, seed=3)
    assert isinstance(seq[1], nn.Conv1d) and n_params(seq) == 16 * 3 + 16 + 16 * 20 * 8 + 8 + 90
    assert seq(torch.zeros(2, 1, 40)).shape == (2, 10)
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    a, b = stem_mlp((1, 8, 8), 3, seed=5), stem_mlp((1, 8, 8), 3, seed=5)
    assert torch.equal(before, torch.rand(3))  # global RNG untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a[4].weight, stem_mlp((1, 8, 8), 3, seed=6)[4].weight)


def test_stem_mlp_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"pool in 1\.\.8, got channels=16, hidden=244.*pool=9"):
        stem_mlp((1, 8, 8), 10, pool=9)
    for kwargs in ({"channels": 0}, {"hidden": 0}, {"pool": 0}):
        with pytest.raises(ValueError, match="must be >= 1 and pool in"):
            stem_mlp((1, 8, 8), 10, **kwargs)
    with pytest.raises(ValueError, match=r"must be >= 1 and pool in.*num_classes=0"):
        stem_mlp((1, 8, 8), 0)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        stem_mlp((1, 8, 8), 10, activation="relu")
    with pytest.raises(ValueError, match="input_shape"):
        stem_mlp((8,), 10)


# --------------------------------------------------------------------------- build_model


def test_build_model_builtins() -> None:
    assert n_params(build_model("smooth-convnet", (1, 8, 8), 10)) == 1_418
    assert n_params(build_model("smooth_convnet", (3, 32, 32), 10, seed=2)) == 25_178
    assert isinstance(build_model("mlp", (1, 8, 8), 10), nn.Sequential)


def _write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, src: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_build_model_factory_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(
        tmp_path,
        monkeypatch,
        "my_factories",
        """
        import torch
        from torch import nn

        calls = []

        def full(input_shape, num_classes, seed=0):
            calls.append((input_shape, num_classes, seed))
            torch.manual_seed(seed)
            c, h, w = input_shape
            return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))

        def bare():
            return nn.Linear(2, 2)

        def kwargs_only(**kw):
            calls.append(kw)
            return nn.Tanh()

        def not_a_model(input_shape, num_classes, seed=0):
            return "nope"

        class Holder:
            @staticmethod
            def make(seed):
                return nn.Linear(1, 1)

        NOT_CALLABLE = 3
        """,
    )
    model = build_model("my_factories:full", (1, 8, 8), 10, seed=4)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    import my_factories  # type: ignore[import-not-found]

    assert my_factories.calls[-1] == ((1, 8, 8), 10, 4)
    assert isinstance(build_model("my_factories:bare", (1, 8, 8), 10, check=False), nn.Linear)
    assert isinstance(
        build_model("my_factories:kwargs_only", (1, 8, 8), 10, seed=1, check=False), nn.Tanh
    )
    assert my_factories.calls[-1] == {"input_shape": (1, 8, 8), "num_classes": 10, "seed": 1}
    assert isinstance(
        build_model("my_factories:Holder.make", (1, 8, 8), 10, check=False), nn.Linear
    )
    with pytest.raises(ModelSpecError, match=r"returned str, expected a torch.nn.Module"):
        build_model("my_factories:not_a_model", (1, 8, 8), 10)
    with pytest.raises(ModelSpecError, match="not callable"):
        build_model("my_factories:NOT_CALLABLE", (1, 8, 8), 10)
    with pytest.raises(ModelSpecError, match="has no attribute 'missing'"):
        build_model("my_factories:missing", (1, 8, 8), 10)


def test_build_model_refuses_models_sgd_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BatchNorm, dropout, no parameters, or the wrong number of logits: a typed error now."""
    _write_module(
        tmp_path,
        monkeypatch,
        "bad_factories",
        """
        from torch import nn

        def head(input_shape, num_classes, extra=()):
            c, h, w = input_shape
            return [nn.Flatten(), *extra, nn.Linear(c * h * w, num_classes)]

        def batchnorm(input_shape, num_classes):
            return nn.Sequential(nn.BatchNorm2d(input_shape[0]), *head(input_shape, num_classes))

        def batchnorm_eval(input_shape, num_classes):
            return batchnorm(input_shape, num_classes).eval()

        def dropout(input_shape, num_classes):
            return nn.Sequential(*head(input_shape, num_classes, (nn.Dropout(0.5),)))

        def dropout_off(input_shape, num_classes):
            return nn.Sequential(*head(input_shape, num_classes, (nn.Dropout(0.0),)))

        def no_parameters():
            return nn.Flatten()

        def five_classes(input_shape):
            return nn.Sequential(*head(input_shape, 5))

        def wrong_input(num_classes):
            return nn.Linear(3, num_classes)

        def tuple_out(input_shape, num_classes):
            class Two(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.net = nn.Sequential(*head(input_shape, num_classes))

                def forward(self, x):
                    return self.net(x), x

            return Two()
        """,
    )
    shape = (1, 8, 8)
    with pytest.raises(ModelSpecError, match=r"submodule '0' \(BatchNorm2d\) is a BatchNorm"):
        build_model("bad_factories:batchnorm", shape, 10)
    assert isinstance(build_model("bad_factories:batchnorm_eval", shape, 10), nn.Sequential)
    with pytest.raises(ModelSpecError, match=r"\(Dropout\) is dropout in training mode"):
        build_model("bad_factories:dropout", shape, 10)
    assert isinstance(build_model("bad_factories:dropout_off", shape, 10), nn.Sequential)
    with pytest.raises(ModelSpecError, match="has no parameters"):
        build_model("bad_factories:no_parameters", shape, 10)
    with pytest.raises(
        ModelSpecError, match=r"to shape \(2, 5\): expected logits of shape \(2, 10\)"
    ) as info:
        build_model("bad_factories:five_classes", shape, 10)
    assert "num_classes=10" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ModelSpecError, match=r"fails on a zero input of shape \(2, 1, 8, 8\)"):
        build_model("bad_factories:wrong_input", shape, 10)
    with pytest.raises(ModelSpecError, match="to a tuple: expected logits"):
        build_model("bad_factories:tuple_out", shape, 10)
    # check=False builds it anyway
    assert isinstance(build_model("bad_factories:dropout", shape, 10, check=False), nn.Sequential)


def test_build_model_finds_a_module_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model pkg:factory`` finds ./pkg.py as ``python -m`` would, and sys.path is restored."""
    (tmp_path / "cwd_factory.py").write_text(
        "from torch import nn\n\ndef make(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cwd_factory", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    model = build_model("cwd_factory:make", (1, 8, 8), 10)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert sys.path == before


def test_build_model_bad_specs() -> None:
    with pytest.raises(ModelSpecError, match="unknown model spec 'resnet18'") as info:
        build_model("resnet18", (1, 8, 8), 10)
    for name in BUILTIN_MODELS:
        assert name in str(info.value)
    assert "pkg.module:factory" in str(info.value)
    with pytest.raises(ModelSpecError, match=r"cannot import module 'no_such_pkg_xyz\.models'"):
        build_model("no_such_pkg_xyz.models:make", (1, 8, 8), 10)
    with pytest.raises(ModelSpecError, match="malformed"):
        build_model(":make", (1, 8, 8), 10)
    with pytest.raises(ModelSpecError, match="malformed"):
        build_model("torch.nn:", (1, 8, 8), 10)
    with pytest.raises(ModelSpecError, match="non-empty"):
        build_model("", (1, 8, 8), 10)
    assert issubclass(ModelSpecError, ValueError)


# --------------------------------------------------------------------------- check_model


def _record(model: nn.Module) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_model(model)
    assert all(issubclass(w.category, NonSmoothWarning) for w in caught)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "layer",
    [
        nn.ReLU(),
        nn.LeakyReLU(),
        nn.ReLU6(),
        nn.ELU(),
        nn.Hardtanh(),
        nn.MaxPool2d(2),
        nn.AdaptiveMaxPool2d(1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_check_model_warns_on_non_analytic(layer: nn.Module) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), layer)
    messages = _record(model)
    kind = type(layer).__name__
    assert messages == [
        f"submodule '2' ({kind}): the perturbative expansion assumes a smooth loss; "
        f"{kind} is not analytic"
    ]
    with pytest.warns(NonSmoothWarning, match=f"{kind} is not analytic"):
        check_model(model)


def test_check_model_names_nested_submodules_and_root() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Tanh(), nn.ReLU()))
    assert _record(model)[0].startswith("submodule '1.1' (ReLU)")
    assert _record(nn.ReLU())[0].startswith("the model (ReLU)")


def test_check_model_dropout_only_in_training() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    (msg,) = _record(model)
    assert "Dropout is random in training mode" in msg
    assert _record(model.eval()) == []
    assert _record(nn.Sequential(nn.Dropout(0.0))) == []


def test_check_model_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh())
    with pytest.raises(ValueError, match=r"couples the samples in a batch; call model.eval"):
        check_model(model)
    for bn in (nn.BatchNorm1d(2), nn.SyncBatchNorm(2)):
        with pytest.raises(ValueError, match=type(bn).__name__):
            check_model(nn.Sequential(bn))
    model.eval()
    assert _record(model) == []
    assert _record(nn.Sequential(nn.GroupNorm(1, 2), nn.LayerNorm(2), nn.Softplus())) == []


def test_cross_entropy_per_sample() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    loss = cross_entropy_per_sample(logits, y)
    assert loss.shape == (2,)
    expected = -torch.log_softmax(logits, dim=1)[torch.arange(2), y]
    assert torch.allclose(loss, expected)
    assert torch.allclose(loss.mean(), nn.functional.cross_entropy(logits, y))
    loss.sum().backward()
    assert logits.grad is not None


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "module-prefix"])
def test_load_checkpoint_round_trip(tmp_path: Path, wrapper: str | None) -> None:
    src = smooth_convnet((1, 8, 8), 10, seed=1)
    state = src.state_dict()
    if wrapper == "module-prefix":
        payload: object = {f"module.{k}": v for k, v in state.items()}
    elif wrapper:
        payload = {wrapper: state, "epoch": 3}
    else:
        payload = state
    torch.save(payload, tmp_path / "ckpt.pt")
    dst = smooth_convnet((1, 8, 8), 10, seed=2)
    assert load_checkpoint(dst, tmp_path / "ckpt.pt") is dst
    for p, q in zip(src.parameters(), dst.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_checkpoint_mismatches(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(smooth_convnet((1, 8, 8), 10, width=4).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatches") as info:
        load_checkpoint(smooth_convnet((1, 8, 8), 10, width=8), path)
    assert "0.weight: expected (8, 1, 3, 3), found (4, 1, 3, 3)" in str(info.value)

    torch.save(mlp((1, 8, 8), 10, hidden=(32, 16)).state_dict(), path)
    with pytest.raises(ValueError, match=r"unexpected keys: 5\.weight, 5\.bias") as info:
        load_checkpoint(mlp((1, 8, 8), 10, hidden=(32,)), path)
    assert "shape mismatches: 3.weight: expected (10, 32), found (16, 32)" in str(info.value)

    torch.save({"0.weight": torch.zeros(3, 4)}, path)
    with pytest.raises(ValueError, match=r"missing keys: 1\.weight, 1\.bias"):
        load_checkpoint(mlp((1, 2, 2), 3, hidden=()), path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_checkpoint_refuses_non_finite_weights(tmp_path: Path, bad: float) -> None:
    model = mlp((1, 2, 2), 3, hidden=(4,))
    state = model.state_dict()
    state["1.bias"][2] = bad
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    fresh = mlp((1, 2, 2), 3, hidden=(4,), seed=1)
    before = [p.clone() for p in fresh.parameters()]
    with pytest.raises(ModelSpecError, match=r"has non-finite weights in 1\.bias \(1 of 4"):
        load_checkpoint(fresh, path)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), before, strict=True))


def test_load_checkpoint_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(mlp((1, 2, 2), 3), tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(mlp((1, 2, 2), 3), tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_checkpoint(mlp((1, 2, 2), 3), tmp_path / "list.pt")
    torch.save({"net": mlp((1, 2, 2), 3)}, tmp_path / "pickled_module.pt")  # needs full unpickle
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(mlp((1, 2, 2), 3), tmp_path / "pickled_module.pt")
