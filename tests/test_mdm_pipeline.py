"""The tri-modal workload end to end at micro scale: data prepare (idempotent), the Lightning trainer through
sdebatch, and a miniature of the demo sweep with kill-and-resume."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdebatch import sweep
from sdebatch.mdm.data.dataset import TriModalDataset
from sdebatch.mdm.data.prepare import prepare
from sdebatch.mdm.vocab import decode_pair


def test_prepare_makes_every_modality_and_is_idempotent(micro_data, capsys):
    out, index = micro_data
    for split in ("train", "val"):
        for m in ("text", "image", "audio"):
            assert index["counts"][split][m]["samples"] > 0, (split, m)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    again = prepare(out, preset="micro", progress=False)
    assert again["counts"] == index["counts"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")} == stamp  # nothing was redone
    ds = TriModalDataset(out, "val")
    item = ds.pair("image", 0, "t2i")
    task, text, codes = decode_pair(ds.vocab, item["tokens"])
    assert task == "t2i" and len(codes) == np.load(out / "image_val_codes.npy").shape[1]
    assert int(item["target"].sum()) == len(codes) + 2  # the codes and their [BOI] [EOI]


def test_bad_preset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="preset must be one of"):
        prepare(tmp_path, preset="huge")


def _mini_sweep(tmp_path, data):
    path = tmp_path / "mini.toml"
    path.write_text(f'''
name = "mini_demo"
workload = "{Path(__file__).resolve().parents[1] / 'experiments' / 'workloads.py'}:mdm"
[base]
data = "{data}"
model = "tiny"
model_overrides = {{d_model = 32, n_layers = 1, n_heads = 2, base_width = 32, base_depth = 1}}
logical_batch_size = 8
tokens = 1500
lr = 0.003
val_sequences = 8
noise_scale = false
seed = 0
[[runs]]
physical_batch_size = 8
rule = "accumulate"
[[runs]]
physical_batch_size = 2
rule = "sqrt_exact"
[[runs]]
physical_batch_size = 16
rule = "naive"
''')
    return path


def test_miniature_demo_sweep_with_kill_and_resume(micro_data, tmp_path):
    out, _ = micro_data
    path = _mini_sweep(tmp_path, out)
    sweep.run_sweep(path, tmp_path / "runs", max_runs=1, progress=False)  # killed after the first run
    folder = tmp_path / "runs" / "mini_demo"
    assert len(list(folder.glob("*/metrics.json"))) == 1
    done = next(folder.glob("*/metrics.json"))
    mtime = done.stat().st_mtime_ns
    sweep.run_sweep(path, tmp_path / "runs", progress=False)
    rows = sweep.collect(folder, tmp_path / "table.csv")
    assert len(rows) == 3 and done.stat().st_mtime_ns == mtime  # the finished run was not redone
    for r in rows:
        assert np.isfinite(r["final_loss"]) and r["tokens_seen"] >= 1500 and r["diverged"] is False
        curve = (folder / r["run_id"] / "curve.csv").read_text().splitlines()
        assert curve[0].startswith("tokens") and len(curve) > 2
        assert r["weights"] == "model.pt" and (folder / r["run_id"] / "model.pt").exists()  # each run its own
        assert r["noise_probe.groups"] == 8 and r["noise_probe.big_batch"] == 64  # the end-of-run B_simple probe
    by = {(r["rule"], r["physical_batch_size"]): r for r in rows}
    assert by[("sqrt_exact", 2)]["updates"] > by[("accumulate", 8)]["updates"] > by[("naive", 16)]["updates"]
    cfg = json.loads((folder / rows[0]["run_id"] / "config.json").read_text())
    assert cfg["sweep"] == "mini_demo"
    # every held-out number comes with its estimator's error, and the demo's summary pairs runs by seed with it
    from experiments.main_demo import report
    from sdebatch.figures.batch_ablation import summarise

    for r in rows:
        assert r["final_loss_se"] > 0 and (folder / r["run_id"] / "val_rows.json").exists()
    s = summarise(rows, folder=folder)
    assert s["paired_estimator_se"][("sqrt_exact", 2)] > 0 and s["paired"][("naive", 16)][2] == 1
    report("mini", s)


def test_trainer_resume_equals_uninterrupted(micro_data, tmp_path):
    """sdebatch train with a checkpoint mid-window (micro-step 3 of windows of 2), resumed: the same weights and EMA
    as the run that was never stopped (the masking draws, the data position and the optimizer state all resume)."""
    from sdebatch.mdm.train import load_config, train

    out, _ = micro_data
    config = load_config(None, data=str(out), model="tiny", logical_batch_size=4, physical_batch_size=2,
                         model_overrides={"d_model": 32, "n_layers": 1, "n_heads": 2, "base_width": 32,
                                          "base_depth": 1},
                         tokens=2500, lr=3e-3, ema=0.9, val_sequences=0, estimate_noise_scale=False)
    full = train({**config, "out": str(tmp_path / "full")}, progress=False)
    train({**config, "out": str(tmp_path / "first"), "checkpoint_every": 3}, progress=False)
    resumed = train({**config, "out": str(tmp_path / "resumed")}, progress=False,
                    ckpt_path=str(tmp_path / "first" / "checkpoints" / "step=3.ckpt"))
    assert resumed["tokens_seen"] == full["tokens_seen"] and resumed["updates"] == full["updates"] > 3
    a, b = torch.load(full["weights"]), torch.load(resumed["weights"])  # EMA weights, as saved
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for p, q in zip(full["module"].model.parameters(), resumed["module"].model.parameters()):
        assert torch.equal(p, q)


def test_trainer_accumulation_equals_one_big_batch(micro_data, tmp_path):
    """sdebatch train in float64 at logical batch 8: 4 micro-batches of 2 give the weights of one batch of 8 (each
    sample's masking draws depend on its stream position, not on the batch it lands in), to round-off."""
    from sdebatch.mdm.train import build, load_config, train

    out, _ = micro_data
    config = load_config(None, data=str(out), model="tiny", logical_batch_size=8, rule="accumulate",
                         model_overrides={"d_model": 32, "n_layers": 1, "n_heads": 2, "base_width": 32,
                                          "base_depth": 1},
                         tokens=3000, lr=3e-3, val_sequences=0, estimate_noise_scale=False, precision="64-true", out="")
    big = train({**config, "physical_batch_size": 8}, progress=False)["module"].model
    small = train({**config, "physical_batch_size": 2}, progress=False)
    assert small["updates"] >= 3
    torch.manual_seed(config["seed"])  # what train() does before building the model
    init = build({**config, "physical_batch_size": 8})[0].model.double()
    for (name, p), q in zip(small["module"].model.named_parameters(), big.parameters()):
        assert p.dtype == torch.float64
        assert torch.allclose(p, q, rtol=0, atol=1e-10), name
    moved = max(float((p - q).abs().max()) for p, q in zip(big.parameters(), init.parameters()))
    assert moved > 1e-3  # the runs did train


def test_shipped_train_configs_load():
    """Every config file in experiments/configs/ names only known keys and valid values (load_config checks)."""
    from pathlib import Path

    from sdebatch.mdm.train import load_config

    files = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.toml"))
    assert files
    for f in files:
        config = load_config(f)
        assert config["tokens"] > 0 and sum(config["mix"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("key,value,needle", [
    ("noise_probe", 10, "noise_probe must be 0 .off. or an int >= 64"),
    ("noise_probe", 1.5, "noise_probe must be 0"),
    ("rule", "sqrt", "rule"),
])
def test_bad_train_config_names_the_key(key, value, needle):
    from sdebatch.mdm.train import load_config

    with pytest.raises(ValueError, match=needle):
        load_config(None, **{key: value})


def test_held_out_set_is_independent_of_the_training_seeds(micro_data):
    """The held-out sequences (and each pair's task direction) depend on the data folder alone: runs of any seed are
    scored on the same set, while the training stream follows data_seed (and seed when data_seed is unset)."""
    from sdebatch.mdm.train import MDMDataModule, load_config

    out, _ = micro_data

    def held_out(**kw):
        batches = list(MDMDataModule(load_config(None, data=str(out), val_sequences=64, **kw)).val_dataloader())
        return torch.cat([b["tokens"] for b in batches]), torch.cat([b["target"] for b in batches])

    def stream(**kw):
        data = MDMDataModule(load_config(None, data=str(out), **kw))
        keys = data.train_sampler().stream(0, 64)
        return [data.train_set[k]["tokens"].tolist() for k in keys]

    ref = held_out(seed=0)
    for kw in ({"seed": 1}, {"seed": 7, "data_seed": 3}, {"data_seed": 5}):
        other = held_out(**kw)
        assert torch.equal(ref[0], other[0]) and torch.equal(ref[1], other[1]), kw
    # the training side does move with the seed (else the test above proves nothing)
    assert stream(seed=0) != stream(seed=1)
    assert stream(seed=0, data_seed=4) == stream(seed=9, data_seed=4) != stream(seed=0)
    # the held-out set mixes both directions of a pair source (so a seed-dependent direction would show)
    ds = MDMDataModule(load_config(None, data=str(out))).val_set
    directions = {ds._direction("image", i) for i in range(ds.sizes["image"])}
    assert directions == {"t2i", "i2t"}


def test_seeds_of_each_source_apart(micro_data):
    """init_seed, data_seed and draw_seed each move one source and default to seed."""
    from sdebatch.mdm.train import MDMModule, build, load_config, seed_of

    out, _ = micro_data
    config = load_config(None, data=str(out), seed=2, draw_seed=5)
    assert (seed_of(config, "init"), seed_of(config, "data"), seed_of(config, "draw")) == (2, 2, 5)
    module = build(config)[0]
    data = build(config)[1]
    batch = torch.utils.data.default_collate([data.train_set[(*k, p)] for p, k in
                                              enumerate(data.train_sampler().stream(0, 4))])
    batch["position"] = torch.arange(4)
    a = module.loss(batch)["t"]
    b = MDMModule({**config, "draw_seed": 6}, data.vocab.size).loss(batch)["t"]
    c = MDMModule({**config, "draw_seed": None, "seed": 5}, data.vocab.size).loss(batch)["t"]
    assert not torch.equal(a, b) and torch.equal(a, c)  # draw_seed 5 = seed 5 with no draw_seed


@pytest.mark.parametrize("key,value", [("init_seed", True), ("data_seed", -1), ("draw_seed", 1.5), ("seed", None)])
def test_bad_seed_names_the_key(key, value):
    from sdebatch.mdm.train import load_config

    with pytest.raises(ValueError, match=key):
        load_config(None, **{key: value})


def test_max_grad_norm_is_checked():
    from sdebatch.mdm.train import load_config

    with pytest.raises(ValueError, match="max_grad_norm"):
        load_config(None, max_grad_norm=-1.0)
    assert load_config(None, max_grad_norm=1)["max_grad_norm"] == 1


def test_shipped_mdm_sweeps_are_valid_configs():
    """Every run of every shipped MDM sweep file passes load_config (names, types, values), so a GPU sweep does not
    fail hours in."""
    from pathlib import Path

    from sdebatch.mdm.train import load_config

    files = sorted((Path(__file__).resolve().parents[1] / "experiments" / "sweeps").glob("*.toml"))
    checked = 0
    for f in files:
        spec = sweep.load_sweep(f)
        if spec["workload"] != "../workloads.py:mdm":
            continue
        for config in sweep.expand(spec):
            load_config(None, **config)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("item,needle", [
    ("physical_batch_size=true", "physical_batch_size must be an int"),
    ("physical_batch_size=eight", "--set physical_batch_size: 'eight' is not a TOML value"),
    ("lr=\"fast\"", "lr must be a number"),
    ("estimate_noise_scale=1", "estimate_noise_scale must be a bool"),
    ("mix=3", "mix must be a table"),
    ("tokens=1e6", "tokens must be an int"),
    ("lr", "--set takes KEY=VALUE"),
])
def test_train_set_is_type_checked_naming_the_key(capsys, item, needle):
    """`sdebatch train --set`: every value has its default's type, every error names the key, before any work."""
    from sdebatch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--set", item])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_train_config_is_one_typed_dataclass_with_a_docstring_per_field():
    import ast
    import dataclasses
    import inspect

    from sdebatch.mdm import config as cfg
    from sdebatch.mdm.train import DEFAULTS, load_config

    assert DEFAULTS is cfg.DEFAULTS and DEFAULTS == dataclasses.asdict(cfg.TrainConfig())
    body = ast.parse(inspect.getsource(cfg.TrainConfig)).body[0].body
    documented = {a.target.id for a, d in zip(body, body[1:]) if isinstance(a, ast.AnnAssign)
                  and isinstance(d, ast.Expr) and isinstance(d.value, ast.Constant) and isinstance(d.value.value, str)}
    assert documented == set(DEFAULTS)
    with pytest.raises(ValueError, match="tokens must be an int"):
        cfg.TrainConfig(tokens=True)
    with pytest.raises(ValueError, match="init_seed must be an int or None"):
        load_config(None, init_seed="1")
    assert load_config(None, lr=1)["lr"] == 1 and load_config(None, schedule={"text": "cosine"})["schedule"]


def test_mdm_batch_ramp_config_and_its_three_ways(micro_data):
    import sdebatch
    from sdebatch.mdm.train import build, load_config

    with pytest.raises(ValueError, match="needs rule = 'accumulate'"):
        load_config(None, batch_schedule="0:4, 100:8", rule="sqrt_exact")
    with pytest.raises(ValueError, match="ramp must be 'rules', 'lr_only' or 'none'"):
        load_config(None, ramp="half")
    with pytest.raises(ValueError, match="entry 2"):
        load_config(None, batch_schedule="0:4, 100:0")
    for bad in (dict(batch_schedule="0:4, 100:8", ramp="lr_only"), dict(rule="naive")):
        with pytest.raises(ValueError, match="second_moment_rescale needs the square-root rule"):
            load_config(None, second_moment_rescale=True, **bad)
    base = dict(data=str(micro_data[0]), model="micro", logical_batch_size=4, physical_batch_size=2, tokens=4000,
                batch_schedule="0:4, 1K:8")
    cosine = sdebatch.warmup_cosine(total=4000, warmup=0.05 * 4000, final=0.1)
    for ramp, rule in (("rules", "auto"), ("lr_only", "none"), ("none", "none")):
        _, _, cb = build(load_config(None, ramp=ramp, **base))
        assert cb.optimizer_options["rule"] == rule and cb.optimizer_options["batch_schedule"].points == [(0, 4),
                                                                                                       (1000, 8)]
        assert cb.optimizer_options["second_moment_rescale"] is False
        for t in (0.0, 500.0, 1500.0):  # the clock's schedule; lr_only's factor is the update's own (below)
            assert cb.lr_schedule(t) == pytest.approx(cosine(t), rel=1e-12)
    _, _, cb = build(load_config(None, second_moment_rescale=True, **base))
    assert cb.optimizer_options["second_moment_rescale"] is True
    from sdebatch.batch_schedules import seesaw

    _, _, cb = build(load_config(None, **{**base, "batch_schedule": "seesaw", "max_batch_size": 16}))
    assert cb.optimizer_options["batch_schedule"].points == seesaw(cosine, 4, 16, 4000, unit="tokens").points
    assert [b for _, b in cb.optimizer_options["batch_schedule"].points] == [4, 8, 16]


def test_mdm_lr_only_ramp_scales_each_update_by_its_own_batch(micro_data):
    """The lr-only arm of a batch ramp ("0:4, 1K:8" tokens, logical 4): every update's lr is the cosine at the clock
    after its window times sqrt(that window's batch / 4), the batch being the ramp's at the clock before the window,
    also at the update whose window crosses 1K tokens (where the ramp at the clock after it already says 8)."""
    import math

    import lightning.pytorch as pl

    import sdebatch
    import sdebatch.lightning as sl
    from sdebatch.mdm.model import build_model, param_groups, train_model_config
    from sdebatch.mdm.train import MDMDataModule, load_config, train

    config = load_config(None, data=str(micro_data[0]), model="tiny", logical_batch_size=4, physical_batch_size=2,
                         rule="accumulate", batch_schedule="0:4, 1K:8", ramp="lr_only",
                         model_overrides={"d_model": 32, "n_layers": 1, "n_heads": 2, "base_width": 32,
                                          "base_depth": 1},
                         tokens=2500, lr=3e-3, val_sequences=0, estimate_noise_scale=False, out="")

    class Record(pl.Callback):
        def __init__(self):
            self.rows = []  # (tokens before the window, tokens after, samples, lr of each group) per update

        def on_fit_start(self, trainer, module):
            opt = sl.find_optimizer(module)
            self.before = 0

            def after(o):
                self.rows.append((self.before, o.tokens_seen, o.last_batch_size,
                                  [g["lr"] for g in o.effective_hyperparameters()]))
                self.before = o.tokens_seen
            opt.register_post_update_hook(after)

    rec = Record()
    train(config, progress=False, callbacks=[rec])
    vocab = MDMDataModule(config).vocab.size
    base = [g["lr"] for g in param_groups(build_model(train_model_config(config, vocab)), config["lr"],
                                          config["weight_decay"])]
    cosine = sdebatch.warmup_cosine(total=2500, warmup=0.05 * 2500, final=0.1)
    crossing = [i for i, (t0, t1, _, _) in enumerate(rec.rows) if t0 < 1000 <= t1]
    assert len(crossing) == 1 and rec.rows[crossing[0]][1] > 1000 and len(rec.rows) > crossing[0] + 2
    for t0, t1, batch, lrs in rec.rows:
        assert batch == (4 if t0 < 1000 else 8)
        for lr, b in zip(lrs, base):
            assert lr == pytest.approx(b * cosine(t1) * math.sqrt(batch / 4), rel=1e-12)


def test_compile_and_strategy_config(micro_data):
    """compile=True trains through a torch.compile'd denoiser that shares the model's parameters (state_dict keys
    unchanged); strategy is named; the GPU paths are off by default."""
    import torch

    from sdebatch.mdm.train import MDMDataModule, MDMModule, load_config

    base = dict(data=str(micro_data[0]), model="micro")
    vocab = MDMDataModule(load_config(None, **base)).vocab.size
    plain = load_config(None, **base)
    assert plain["compile"] is False and plain["strategy"] == "auto" and plain["precision"] == "32-true"
    module = MDMModule(load_config(None, compile=True, **base), vocab)
    compiled = module._train_model[0]
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is module.model
    assert list(module.state_dict()) == list(MDMModule(plain, vocab).state_dict())
    with pytest.raises(ValueError, match="strategy must be 'auto', 'ddp' or 'fsdp'"):
        load_config(None, strategy="deepspeed", **base)


def test_trainer_reads_the_window_elbo_once_per_update(micro_data, monkeypatch):
    """The MDM module keeps each micro-batch's ELBO and per-modality sums on the device and reads them in one
    transfer at the update: the window's values (each micro-batch's ELBO, the ELBO per modality over the window) and
    the run's last training ELBO equal those of the objective's outputs recorded here, and the module reads the
    device at most once per update (and once at the end, for the last micro-batch's ELBO)."""
    import math

    import lightning.pytorch as pl

    from sdebatch.lightning import find_optimizer
    from sdebatch.mdm import train as mdm_train
    from test_syncs import counted_reads

    out, _ = micro_data
    records, windows = [], []
    real = mdm_train.mdm_loss
    monkeypatch.setattr(mdm_train, "mdm_loss", lambda *a, **k: records.append(real(*a, **k)) or records[-1])

    class Grab(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if find_optimizer(module).did_update:
                windows.append((list(module.window_micro_elbo_bits), dict(module.window_elbo_bits)))

    config = mdm_train.load_config(None, data=str(out), model="tiny", logical_batch_size=8, physical_batch_size=2,
                                   model_overrides={"d_model": 32, "n_layers": 1, "n_heads": 2, "base_width": 32,
                                                    "base_depth": 1},
                                   tokens=3000, val_sequences=0, estimate_noise_scale=False, noise_probe=0, out="")
    with counted_reads() as calls:
        result = mdm_train.train(config, progress=False, callbacks=[Grab()])
    assert result["updates"] == len(windows) >= 3 and len(records) == 4 * len(windows)
    for i, (micro, per_modality) in enumerate(windows):
        outs = records[4 * i:4 * i + 4]
        assert micro == [float(o["elbo_bits"]) for o in outs]
        for m in ("text", "image", "audio"):
            c = sum(int(o[f"count/{m}"]) for o in outs)
            if c:
                total = sum(float(o[f"sum/{m}"]) for o in outs)
                assert per_modality[m] == pytest.approx(total / c / math.log(2), rel=1e-12)
            else:
                assert m not in per_modality
    assert result["train_elbo_bits"] == float(records[-1]["elbo_bits"])
    module_reads = [c for c in calls if "train.py" in c]
    assert len(module_reads) <= result["updates"] + 1, module_reads
