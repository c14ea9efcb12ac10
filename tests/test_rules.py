"""The rule formulas against closed forms written out here, and every invalid input."""
import math

import pytest

import sdebatch
from sdebatch import rules
from sdebatch.cli import main as cli_main, rules_table


def test_kappa_closed_form():
    assert sdebatch.kappa(64, 256) == 0.25
    assert sdebatch.kappa(1024, 256) == 4.0
    k = sdebatch.kappa(512, 256, horizon=4e9, reference_horizon=1e9, gamma=0.44)
    assert k == pytest.approx(2.0 * 0.25 ** 0.44, rel=1e-15)
    assert sdebatch.kappa(512, 256, horizon=4e9, reference_horizon=1e9, gamma=0.0) == 2.0


@pytest.mark.parametrize("k", [0.125, 0.5, 2.0, 8.0])
def test_adam_rule_closed_form(k):
    ref = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": ["untouched"]}
    out = sdebatch.rescale("adam", ref, k)
    assert out["lr"] == pytest.approx(3e-4 * math.sqrt(k), rel=1e-15)
    assert out["betas"] == pytest.approx((0.9 ** k, 0.95 ** k), rel=1e-15)
    assert out["eps"] == pytest.approx(1e-8 / math.sqrt(k), rel=1e-15)
    # per-sample decay is kept: (1 - lr' wd') = (1 - lr wd)**kappa
    assert 1 - out["lr"] * out["weight_decay"] == pytest.approx((1 - 3e-4 * 0.1) ** k, rel=1e-15)
    assert out["params"] is ref["params"]
    assert ref == {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": ["untouched"]}


def test_adam_first_order_forms():
    out = sdebatch.rescale("adam", {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.1}, 4.0, beta_form="linear")
    assert out["betas"] == pytest.approx((1 - 4 * 0.1, 1 - 4 * 0.001), rel=1e-14)
    assert out["weight_decay"] == pytest.approx(2 * 0.1, rel=1e-14)  # sqrt(kappa) wd
    ind = sdebatch.rescale("adam", {"lr": 1e-3, "weight_decay": 0.01}, 4.0, weight_decay_form="independent")
    assert ind["weight_decay"] == pytest.approx(1 - 0.99 ** 4, rel=1e-14)
    ind1 = sdebatch.rescale("adam", {"lr": 1e-3, "weight_decay": 0.01}, 4.0, weight_decay_form="independent",
                            beta_form="linear")
    assert ind1["weight_decay"] == pytest.approx(0.04, rel=1e-14)
    l2 = sdebatch.rescale("adam", {"lr": 1e-3, "weight_decay": 0.01}, 4.0, weight_decay_form="l2")
    assert l2["weight_decay"] == 0.01


@pytest.mark.parametrize("beta", [0.9, 0.99, 0.999])
@pytest.mark.parametrize("k", [0.5, 1.1, 2.0, 4.0])
def test_exact_and_linear_agree_to_second_order(beta, k):
    """With beta = 1 - e: beta**kappa - (1 - kappa e) = kappa (kappa - 1) e**2 / 2 + O((kappa e)**3)."""
    e = 1 - beta
    exact = sdebatch.rescale("adam", {"lr": 1.0, "betas": (beta, beta)}, k)["betas"][0]
    lin = sdebatch.rescale("adam", {"lr": 1.0, "betas": (beta, beta)}, k, beta_form="linear")["betas"][0]
    assert exact - lin == pytest.approx(k * (k - 1) / 2 * e ** 2, rel=2 * k * e)
    assert abs(exact - lin) <= (k * e) ** 2


def test_sgd_rules():
    assert sdebatch.rescale("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, 4.0) == \
        {"lr": pytest.approx(0.4), "momentum": 0.9, "weight_decay": 5e-4}
    ts = sdebatch.rescale("sgd", {"lr": 0.1, "momentum": 0.9}, 4.0, momentum_mode="timescale")
    assert ts["momentum"] == pytest.approx(0.9 ** 4, rel=1e-15)
    # the effective lr, lr / (1 - mu), follows the linear rule
    assert ts["lr"] / (1 - ts["momentum"]) == pytest.approx(4 * 0.1 / (1 - 0.9), rel=1e-14)
    assert sdebatch.rescale("none", {"lr": 0.1, "momentum": 0.9}, 4.0) == {"lr": 0.1, "momentum": 0.9}


def test_rmsprop_and_nadam_keys():
    out = sdebatch.rescale("adam", {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "momentum_decay": 4e-3}, 0.25)
    assert out["alpha"] == pytest.approx(0.99 ** 0.25)
    assert out["momentum_decay"] == pytest.approx(1e-3)
    assert out["lr"] == pytest.approx(0.005)


def test_ema_decay():
    assert sdebatch.ema_decay(0.999, 4) == pytest.approx(0.999 ** 4, rel=1e-15)
    # half-life in samples is kept: rho**(n/kappa updates of kappa) = rho**n
    rho, k = 0.99, 0.25
    assert sdebatch.ema_decay(rho, k) ** (100 / k) == pytest.approx(rho ** 100, rel=1e-12)


@pytest.mark.parametrize("call,needle", [
    (lambda: sdebatch.kappa(0, 256), "batch_per_update"),
    (lambda: sdebatch.kappa(64, float("nan")), "logical_batch_size"),
    (lambda: sdebatch.kappa(64, 256, gamma=0.44), "horizon"),
    (lambda: sdebatch.kappa(64, 256, horizon=-1, reference_horizon=1, gamma=0.5), "horizon"),
    (lambda: sdebatch.rescale("lion", {"lr": 1}, 1.0), "'sgd', 'adam', 'none'"),
    (lambda: sdebatch.rescale("adam", {"betas": (0.9, 0.99)}, 2.0), "'lr'"),
    (lambda: sdebatch.rescale("adam", {"lr": 1e-3}, 0.0), "kappa"),
    (lambda: sdebatch.rescale("adam", {"lr": 1e-3}, float("inf")), "kappa"),
    (lambda: sdebatch.rescale("adam", {"lr": 1e-3, "betas": (0.9, 0.99)}, 20.0, beta_form="linear"), "betas[0]"),
    (lambda: sdebatch.rescale("adam", {"lr": 1e-3}, 2.0, beta_form="cubic"), "beta_form"),
    (lambda: sdebatch.rescale("sgd", {"lr": 1e-3}, 2.0, momentum_mode="x"), "momentum_mode"),
    (lambda: sdebatch.rescale("sgd", {"lr": 1e-3}, 2.0, weight_decay_form="x"), "weight_decay_form"),
    (lambda: sdebatch.rescale("adam", {"lr": 1e-3, "betas": (1.2, 0.9)}, 2.0), "betas[0]"),
    (lambda: sdebatch.ema_decay(1.0, 2.0), "rho"),
    (lambda: sdebatch.ema_decay(0.9, -1), "kappa"),
])
def test_invalid_inputs_name_the_argument(call, needle):
    with pytest.raises(ValueError, match=None) as e:
        call()
    assert needle in str(e.value)


def test_rules_table_and_cli(capsys):
    text = rules_table("adamw", {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}, 256, [64, 256, 1024],
                       ema=0.999)
    rows = [line.split() for line in text.splitlines()[2:]]
    assert [r[0] for r in rows] == ["64", "256", "1024"]
    assert float(rows[2][2]) == pytest.approx(6e-4, rel=1e-5)
    assert cli_main(["rules", "--optimizer", "sgd", "--lr", "0.1", "--logical", "128", "--batch", "32", "512"]) == 0
    out = capsys.readouterr().out
    assert "0.025" in out and "0.4" in out
    with pytest.raises(SystemExit):
        cli_main(["rules", "--optimizer", "sgd", "--betas", "0.9", "0.99", "--logical", "8", "--batch", "8"])
    assert "sgd has no betas" in capsys.readouterr().err
    assert rules.FAMILIES == ("sgd", "adam", "none")


def test_linear_form_fails_at_the_boundary_despite_rounding():
    with pytest.raises(ValueError, match="betas"):
        sdebatch.rescale("adam", {"lr": 1.0, "betas": (0.9, 0.99)}, 10.0, beta_form="linear")


@pytest.mark.parametrize("args,needle", [
    (["--betas", "1.5", "0.9"], "--betas must be in"),
    (["--lr=-1"], "--lr must be a finite number > 0"),
    (["--eps=-1e-8"], "--eps must be"),
    (["--weight-decay=-0.1"], "--weight-decay must be"),
    (["--ema", "1.0"], "--ema must be in"),
    (["--batch", "0"], "--batch must be positive"),
])
def test_rules_cli_rejects_invalid_reference_values_once(capsys, args, needle):
    """An invalid reference value fails once, naming the argument, with exit code 2 (not a table of invalid rows)."""
    base = ["rules", "--optimizer", "adamw", "--logical", "8"]
    if "--batch" not in args:
        base += ["--batch", "8", "16"]
    with pytest.raises(SystemExit) as e:
        cli_main(base + args)
    out = capsys.readouterr()
    assert e.value.code == 2 and needle in out.err and "invalid" not in out.out


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "nadam", "radam"])
def test_rules_table_is_what_the_wrapper_sets_for_every_family(name, capsys):
    """`sdebatch rules --optimizer NAME` prints, for kappa 4, the values LogicalBatchOptimizer puts into the inner
    optimizer's param group at the first update (the reference): every key the wrapper changes, none left out."""
    import torch

    from sdebatch.cli import OPTIMIZERS

    cls = {c.__name__.lower(): c for c in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
                                            torch.optim.NAdam, torch.optim.RAdam)}[name]
    assert OPTIMIZERS[name][2] == {k: v for k, v in cls([torch.zeros(1)]).defaults.items() if k in OPTIMIZERS[name][2]}
    hp = {"weight_decay": 0.01} if name != "sgd" else {"weight_decay": 0.01, "momentum": 0.9}
    assert cli_main(["rules", "--optimizer", name, "--logical", "4", "--batch", "16"]
                    + [x for k, v in hp.items() for x in (f"--{k.replace('_', '-')}", str(v))]) == 0
    header, row = capsys.readouterr().out.splitlines()[1:3]
    model = torch.nn.Linear(2, 1)
    opt = sdebatch.LogicalBatchOptimizer(cls(model.parameters(), **hp), 4, 16, accumulation_steps=1,
                                         reparameterize=True)
    model(torch.ones(16, 2)).sum().backward()
    opt.step()
    used = opt.effective_hyperparameters()[0]
    changed = {k for k in OPTIMIZERS[name][2] if used[k] != cls(model.parameters(), **hp).defaults[k]}
    keys = header.split()[2:]
    assert changed <= set(keys)  # every value the wrapper moved is in the table (NAdam's momentum_decay too)
    for key, text in zip(keys, _split_cells(row, len(keys) + 2)[2:]):
        expect = used[key]
        got = tuple(float(x) for x in text.strip("()").split(",")) if key == "betas" else float(text)
        assert got == pytest.approx(tuple(expect) if key == "betas" else expect, rel=1e-5), key


def _split_cells(row: str, n: int) -> list[str]:
    """Cells of a table row whose columns are separated by two or more spaces (betas hold one space)."""
    import re

    cells = [c for c in re.split(r"\s{2,}", row.strip()) if c]
    assert len(cells) == n, cells
    return cells
