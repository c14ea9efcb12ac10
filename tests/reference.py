"""Plain references the tests compare the library against: data, a tiny model, and big-batch training."""
import math

import torch

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.05}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "adam": (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.01}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "betas": (0.8, 0.95)}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}),
    "nadam": (torch.optim.NAdam, {"lr": 0.01}),
    "radam": (torch.optim.RAdam, {"lr": 0.01}),
}


def make_data(n=96, d_in=6, seq=5, seed=0):
    """Inputs (n, seq, d_in), targets (n, seq), and a per-sample count of valid (loss-bearing) tokens in 1..seq."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq, d_in, generator=g)
    y = torch.randn(n, seq, generator=g)
    valid = torch.randint(1, seq + 1, (n,), generator=g)
    mask = torch.arange(seq)[None, :] < valid[:, None]
    return x, y, mask


def make_model(d_in=6, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def token_loss_sum(model, x, y, mask):
    """Sum of squared errors over valid tokens, and their count."""
    err = (model(x).squeeze(-1) - y) ** 2
    return (err * mask).sum(), mask.sum()


def sample_loss_mean(model, x, y):
    return ((model(x).squeeze(-1) - y) ** 2).mean()


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def big_batch_run(opt_name, data, logical, *, token_weighted, epochs=2, seed=1, max_grad_norm=None):
    """The oracle: the plain torch optimizer, one step per logical batch, loss averaged over the whole batch
    (over its valid tokens when token_weighted), its gradient clipped to ``max_grad_norm`` if given. A last short
    batch is one step on what it holds."""
    x, y, mask = data
    model = make_model(x.shape[-1], seed)
    cls, kw = OPTIMIZERS[opt_name]
    opt = cls(model.parameters(), **kw)
    for _ in range(epochs):
        for i in range(0, len(x), logical):
            sl = slice(i, i + logical)
            if token_weighted:
                s, n = token_loss_sum(model, x[sl], y[sl], mask[sl])
                loss = s / n
            else:
                loss = sample_loss_mean(model, x[sl], y[sl])
            opt.zero_grad()
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
    return model


def reference_adam(params, grads_per_step, kappas, *, lr, betas, eps, wd, decoupled):
    """Adam/AdamW written plainly, with beta_s = beta**kappa_s and bias correction 1 - prod_s beta_s."""
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    prod1 = prod2 = 1.0
    for grads, k in zip(grads_per_step, kappas):
        lr_s, b1_s, b2_s, eps_s = lr * math.sqrt(k), b1 ** k, b2 ** k, eps / math.sqrt(k)
        prod1, prod2 = prod1 * b1_s, prod2 * b2_s
        for i, p in enumerate(params):
            g = grads[i]
            if decoupled:
                wd_s = (1 - (1 - lr * wd) ** k) / lr_s
                p.mul_(1 - lr_s * wd_s)
            else:
                g = g + wd * p
            m[i] = b1_s * m[i] + (1 - b1_s) * g
            v[i] = b2_s * v[i] + (1 - b2_s) * g * g
            p.sub_(lr_s * (m[i] / (1 - prod1)) / ((v[i] / (1 - prod2)).sqrt() + eps_s))
    return params
