"""Invalid configurations fail before any state changes; the torch optimizer surface behaves."""
import copy
import warnings

import pytest
import torch

import sdebatch
from reference import flat, make_data, make_model, sample_loss_mean


class Lion(torch.optim.Optimizer):  # stand-in for an optimizer with no known rule
    def __init__(self, params, lr=1e-4):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        pass


@pytest.mark.parametrize("kwargs,needle", [
    ({"logical_batch_size": 0}, "logical_batch_size"),
    ({"logical_batch_size": 8, "physical_batch_size": -1}, "physical_batch_size"),
    ({"logical_batch_size": 8, "accumulation_steps": 0}, "accumulation_steps"),
    ({"logical_batch_size": 8, "rule": "lamb"}, "'auto', 'sgd', 'adam', 'none'"),
    ({"logical_batch_size": 8, "beta_form": "x"}, "beta_form"),
    ({"logical_batch_size": 8, "max_grad_norm": -1.0}, "max_grad_norm"),
    ({"logical_batch_size": 8, "gamma": 0.44}, "horizon"),
    ({"logical_batch_size": None}, "logical_batch_size must be a positive int, got None"),
    ({"logical_batch_size": 8, "noise_scale_every": 0}, "noise_scale_every must be an int >= 1"),
    ({"logical_batch_size": 8, "noise_scale_decay": 1.0}, "noise_scale_decay must be in [0, 1)"),
    ({"logical_batch_size": 8, "ema_rescale": 1}, "ema_rescale must be True, False or None"),
])
def test_invalid_configuration(kwargs, needle):
    model = make_model()
    inner = torch.optim.Adam(model.parameters())
    before = copy.deepcopy(inner.state_dict())
    with pytest.raises(ValueError) as e:
        sdebatch.LogicalBatchOptimizer(inner, **{"physical_batch_size": 8, **kwargs})
    assert needle in str(e.value)
    assert inner.state_dict() == before


def test_unknown_optimizer_with_auto_rule():
    model = make_model()
    with pytest.raises(ValueError, match="rule='none'"):
        sdebatch.LogicalBatchOptimizer(Lion(model.parameters()), 8, 8)
    sdebatch.LogicalBatchOptimizer(Lion(model.parameters()), 8, 8, rule="none")
    with pytest.warns(UserWarning, match="heuristic"):
        sdebatch.LogicalBatchOptimizer(Lion(model.parameters()), 8, 8, rule="adam")
    with pytest.raises(TypeError):
        sdebatch.LogicalBatchOptimizer(model, 8, 8)


def test_mixed_protocols_in_one_window_is_an_error():
    model = make_model()
    x, y, _ = make_data()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
    sample_loss_mean(model, x[:4], y[:4]).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="protocol"):
        opt.backward(sample_loss_mean(model, x[4:8], y[4:8]) * 4, num_items=4)


def test_bad_load_state_dict_changes_nothing():
    model = make_model()
    x, y, _ = make_data()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters()), 8, 8)
    sample_loss_mean(model, x[:8], y[:8]).backward()
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(good)
    del bad["sdebatch"]["clock"]["samples_seen"]
    with pytest.raises(ValueError, match="samples_seen"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="LogicalBatchOptimizer.state_dict"):
        opt.load_state_dict({"clock": good["sdebatch"]["clock"]})
    assert opt.clock.updates == 1 and opt.state_dict()["sdebatch"] == good["sdebatch"]
    # torch's keys alone (what torch.distributed.checkpoint hands back): the inner optimizer only, the clock stays
    opt.load_state_dict({k: v for k, v in good.items() if k != "sdebatch"})
    assert opt.clock.updates == 1 and opt.state_dict()["state"].keys() == good["state"].keys()


def test_batch_arithmetic_and_defaults():
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters()), 256, 96, reparameterize=True)
    assert opt.accumulation_steps == 3 and opt.window_batch_size == 288 and opt.window_kappa == pytest.approx(288 / 256)
    assert "96 per device x 3 accumulation x 1 device(s) = 288" in opt.describe()
    with pytest.raises(ValueError, match=r"1024 samples per update exceeds logical_batch_size=256\. Pass reparam"):
        sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters()), 256, 1024)
    with pytest.raises(ValueError, match="288 samples per update"):  # a remainder is a kappa > 1 too
        sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters()), 256, 96)
    big = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters()), 256, 1024, reparameterize=True)
    assert big.accumulation_steps == 1 and big.window_kappa == 4.0
    same = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters()), 256, 256)
    assert same.physical_batch_size == 256 and same.window_kappa == 1.0
    assert isinstance(same, torch.optim.Optimizer)


def test_batchnorm_warning():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match="BatchNorm"):
        sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 2, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 8, model=model)


def test_deepcopy_keeps_the_wrapper_state():
    model = make_model()
    x, y, _ = make_data()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters()), 8, 8)
    sample_loss_mean(model, x[:8], y[:8]).backward()
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.clock == opt.clock and clone.logical_batch_size == 8


def test_swa_avg_fn_uses_kappa():
    from torch.optim.swa_utils import AveragedModel
    model = make_model()
    x, y, _ = make_data()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 32, accumulation_steps=1,
                                         reparameterize=True)
    avg = AveragedModel(model, avg_fn=sdebatch.ema_avg_fn(0.9, opt))
    start = flat(avg.module).clone()
    sample_loss_mean(model, x[:32], y[:32]).backward()
    opt.step()
    avg.update_parameters(model)  # the first call copies
    first = flat(model).clone()
    opt.zero_grad()
    sample_loss_mean(model, x[32:64], y[32:64]).backward()
    opt.step()
    avg.update_parameters(model)
    d = 0.9 ** 4
    assert torch.allclose(flat(avg.module), d * first + (1 - d) * flat(model), atol=1e-14)
    assert not torch.equal(start, first)


def test_forgetting_num_items_inside_a_sum_window_is_an_error():
    model = make_model()
    x, y, _ = make_data()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
    opt.backward(sample_loss_mean(model, x[:4], y[:4]) * 4, num_items=4)
    opt.step()
    sample_loss_mean(model, x[4:8], y[4:8]).backward()
    with pytest.raises(RuntimeError, match="protocol"):
        opt.step()


def test_count_then_framework_backward_equals_backward():
    """opt.count(...) + a backward run elsewhere (as Lightning does) is the sum protocol."""
    x, y, mask = make_data()
    from reference import token_loss_sum
    models = [make_model(), make_model()]
    opts = [sdebatch.LogicalBatchOptimizer(torch.optim.Adam(m.parameters(), lr=0.01), 16, 4) for m in models]
    for i in range(0, 32, 4):
        s, n = token_loss_sum(models[0], x[i:i + 4], y[i:i + 4], mask[i:i + 4])
        opts[0].backward(s, num_items=n)
        opts[0].step()
        opts[0].zero_grad()
        s, n = token_loss_sum(models[1], x[i:i + 4], y[i:i + 4], mask[i:i + 4])
        opts[1].count(num_samples=4)
        opts[1].count(n)
        s.backward()
        opts[1].step()
        opts[1].zero_grad()
    assert torch.equal(flat(models[0]), flat(models[1]))


def test_torch_step_hooks_run_once_per_step_call():
    model = make_model()
    x, y, _ = make_data()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
    calls = []
    opt.register_step_pre_hook(lambda o, a, kw: calls.append(("pre", o.updates)))
    opt.register_step_post_hook(lambda o, a, kw: calls.append(("post", o.updates)))
    for i in (0, 4):
        sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
        opt.step()
    assert calls == [("pre", 0), ("post", 0), ("pre", 0), ("post", 1)]


def test_a_rule_error_leaves_every_group_at_its_reference():
    """Group 1's beta leaves (0, 1) under the linear form at kappa 16: nothing may stay rescaled in group 0."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    inner = torch.optim.Adam([{"params": [a], "betas": (0.99, 0.999)}, {"params": [b], "betas": (0.9, 0.999)}],
                             lr=0.1)
    opt = sdebatch.LogicalBatchOptimizer(inner, 8, 128, accumulation_steps=1, beta_form="linear", reparameterize=True)
    (a.sum() + b.sum()).backward()
    with pytest.raises(ValueError, match="betas"):
        opt.step()
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["betas"] == (0.99, 0.999)
    assert torch.equal(a.detach(), torch.ones(2))


@pytest.mark.parametrize("kwargs,needle", [
    ({"rule": "lamb"}, "'auto', 'sgd', 'adam', 'none'"),
    ({"beta_form": "x"}, "beta_form"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"gamma": 0.44}, "horizon"),
    ({"ema_rescale": "yes"}, "ema_rescale"),
])
def test_the_lightning_callback_checks_the_same_options_when_built(kwargs, needle):
    """sdebatch.lightning.LogicalBatch checks the wrapper's options with the wrapper's own checks, at construction
    (before any Trainer exists), with the same messages."""
    import sdebatch.lightning as sl

    with pytest.raises(ValueError) as cb:
        sl.LogicalBatch(8, **kwargs)
    with pytest.raises(ValueError) as opt:
        sdebatch.LogicalBatchOptimizer(torch.optim.Adam(make_model().parameters()), 8, 8, **kwargs)
    assert needle in str(cb.value) and str(cb.value) == str(opt.value)


def test_update_hooks_run_once_per_update_and_can_be_removed():
    """register_pre_update_hook sees each update's window (samples, kappa) before the step, register_post_update_hook
    the clock after it; both once per update (not per micro-step) until removed."""
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)  # 2 micro-steps
    pre, post = [], []
    h1 = opt.register_pre_update_hook(lambda o, w: pre.append((o.updates, w["samples"], w["kappa"])))
    h2 = opt.register_post_update_hook(lambda o: post.append(o.updates))
    for i in range(6):
        model(torch.ones(4, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert pre == [(0, 8.0, 1.0), (1, 8.0, 1.0), (2, 8.0, 1.0)] and post == [1, 2, 3]
    h1.remove()
    h2.remove()
    for i in range(2):
        model(torch.ones(4, 6)).sum().backward()
        opt.step()
    assert len(pre) == 3 and len(post) == 3 and opt.updates == 4
