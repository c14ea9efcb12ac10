"""`sdebatch report` on hand-made sweep folders: the page is self-contained (parsed: no script, no link out, every
image an embedded PNG equal to the file beside it), its numbers are the paired statistics computed here by hand, and
bad folders are named. A slow test renders the page in headless Chromium with the network off."""
import base64
import json
import math
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sdebatch.cli import main

LB = 4
SEEDS = (0, 1, 2)


def _loss(rule: str, b: int, seed: int, lr: float = 2e-3) -> float:
    """A made-up final loss: the seed moves every run of that seed alike (common random numbers); no rescaling
    degrades with the batch; the square-root rule holds up to 16; lr has an optimum at 2e-3 (for the lr sweep)."""
    base = 5.0 + 0.1 * seed + 0.4 * math.log2(lr / 2e-3) ** 2
    if rule == "naive":
        base *= 1 + 0.02 * math.log2(b / LB) + 0.001 * seed
    elif rule == "sqrt_exact":
        base *= 1 + (0.0 if b <= 16 else 0.05) + 0.0005 * (seed - 1)
    return base


def _write_run(folder: Path, rule: str, b: int, seed: int, lr: float = 2e-3, diverged: bool = False) -> dict:
    rid = f"pb{b}_{rule}_lr{lr}_s{seed}"
    run = folder / rid
    run.mkdir(parents=True)
    config = {"sweep": folder.name, "workload": "w:f", "run_id": rid, "rule": rule, "logical_batch_size": LB,
              "physical_batch_size": b, "lr": lr, "seed": seed, "tokens": 1000}
    loss = _loss(rule, b, seed, lr)
    metrics = {"run_id": rid, "wall_clock_s": 10.0, "diverged": diverged, "final_loss": loss,
               "final_loss_se": 0.01, "tokens_seen": 1000, "tokens_per_s": 100.0 + b,
               "noise_probe": {"b_simple": 20.0 + seed}}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text(json.dumps(metrics))
    per = max(b, LB)
    (run / "curve.csv").write_text("tokens,samples,updates,loss\n" + "".join(
        f"{t * per * 10},{t * per},{t},{loss + 5.0 / t}\n" for t in range(1, 11)))
    return {**config, **metrics}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "handmade"
    rows = [_write_run(folder, "accumulate", LB, s) for s in SEEDS]
    rows += [_write_run(folder, rule, b, s) for rule in ("sqrt_exact", "naive") for b in (16, 64) for s in SEEDS]
    return folder, rows


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags, self.images, self.tables, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def test_report_is_self_contained_and_its_numbers_are_the_paired_statistics(sweep, tmp_path, capsys):
    folder, rows = sweep
    out = tmp_path / "rep"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    assert f"{len(rows)} runs -> {out / 'report.html'}" in capsys.readouterr().out
    page = _parse(out / "report.html")
    # nothing to fetch: no script, no stylesheet link, no frame, no URL in any attribute
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed")]
    for _, attrs in page.tags:
        for key, value in attrs.items():
            assert "http:" not in (value or "") and "https:" not in (value or ""), (key, value)
    # every image is an embedded PNG, byte for byte the figure written beside the page
    pngs = sorted(out.glob("*.png"))
    assert len(page.images) == len(pngs) >= 3
    for img in page.images:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        raw = base64.b64decode(data)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw == (out / f"{img['alt']}.png").read_bytes()
    for png in pngs:  # a PDF for every PNG
        assert png.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"
    # the run table: one row per run
    runs = page.tables[-1]
    assert runs[0][0] == "run_id" and len(runs) == 1 + len(rows)
    # the summary table: naive at 16, paired against the logical run of its own seed, by hand
    ref = {s: _loss("accumulate", LB, s) for s in SEEDS}
    d = [(_loss("naive", 16, s) - ref[s]) / ref[s] for s in SEEDS]
    m, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
    summary = page.tables[0]
    row = next(r for r in summary if r[0] == "no rescaling" and r[1] == "16")
    assert row[5].startswith(f"{100 * m:+.2f}% \u00b1 {100 * se:.2f}")
    c = [(_loss("naive", 16, s) - _loss("sqrt_exact", 16, s)) / ref[s] for s in SEEDS]
    assert row[6].startswith(f"{100 * statistics.fmean(c):+.2f}% \u00b1 {100 * statistics.stdev(c) / math.sqrt(3):.2f}")
    numbers = json.loads((out / "report.json").read_text())
    # the square-root rule holds at 16 and breaks at 64 (+5%); no rescaling is 4% worse already at 16
    assert numbers["batch"]["knee"] == {"accumulate": None, "sqrt_exact": 64, "naive": 16}
    assert numbers["batch"]["noise_scale"] == 21.0  # median of the logical runs' probes 20, 21, 22
    assert numbers["runs"] == len(rows) and "lr_transfer" not in numbers


def test_run_table_scrolls_in_its_own_box_and_every_rule_has_one_label(sweep, tmp_path):
    """The run table (15 columns) sits in a container that scrolls sideways, not the page; a rule is shown by its
    label everywhere (tables, headers, text), never by its preset name: run ids are the only place those appear."""
    import re

    from sdebatch.figures.batch_ablation import label

    folder, rows = sweep
    assert main(["report", str(folder), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.html").read_text()
    style = re.search(r"<style>(.*?)</style>", text, re.S).group(1)
    assert re.search(r"\.wide\{[^}]*overflow-x:\s*auto", style)
    page = _parse(tmp_path / "rep" / "report.html")
    opened = [(t, a) for t, a in page.tags if t in ("div", "table")]
    assert opened[-2:] == [("div", {"class": "wide"}), ("table", {})]  # the run table's own box
    labels = {"accumulate": "accumulate (exact)", "sqrt_exact": "square-root rule, \u03b2^\u03ba",
              "naive": "no rescaling"}
    assert {r: label(r, plain=True) for r in labels} == labels
    runs = page.tables[-1]
    col = runs[0].index("rule")
    assert sorted({r[col] for r in runs[1:]}) == sorted(labels.values())
    assert page.tables[0][0][-1] == "minus square-root rule, \u03b2^\u03ba (paired)"
    # the visible text without the run ids: no preset name, only labels
    visible = re.sub(r"<style>.*?</style>|<[^>]+>|data:image/png;base64,[A-Za-z0-9+/=]+", " ", text, flags=re.S)
    for rid in (r["run_id"] for r in rows):
        visible = visible.replace(rid, " ")
    assert not re.findall(r"sqrt_exact|sqrt_linear|\bnaive\b|accumulate(?! \(exact\))", visible)


def test_report_of_an_lr_sweep_has_the_transfer_section(tmp_path):
    folder = tmp_path / "lrs"
    for lr in (1e-3, 2e-3, 4e-3):
        for s in (0, 1):
            _write_run(folder, "accumulate", LB, s, lr)
            _write_run(folder, "sqrt_exact", 16, s, lr)
    _write_run(folder, "naive", 16, 0, 8e-3, diverged=True)
    assert main(["report", str(folder)]) == 0
    r = json.loads((folder / "report" / "report.json").read_text())
    opt = r["lr_transfer"]["accumulate@4"]
    assert abs(math.log2(opt["lr"] / 2e-3)) < 1e-9  # the parabola through an exact parabola: its vertex
    assert abs(r["lr_transfer"]["sqrt_exact@16"]["shift"]["octaves"]) < 1e-9
    page = _parse(folder / "report" / "report.html")
    lr_table = next(t for t in page.tables if "optimum lr" in t[0])
    assert [r[0] for r in lr_table[1:]] == ["accumulate (exact)", "no rescaling", "square-root rule, \u03b2^\u03ba"]
    assert "diverged" in (folder / "report" / "report.html").read_text()


def test_bad_runs_dir_is_named(tmp_path, capsys):
    code = None
    try:
        main(["report", str(tmp_path / "nope")])
    except SystemExit as e:
        code = e.code
    assert code == 2 and f"RUNS_DIR {tmp_path / 'nope'} is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    try:
        main(["report", str(tmp_path / "empty")])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "no finished runs in" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report").exists()


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (apt install chromium)")
def test_report_renders_in_headless_chromium_offline(sweep, tmp_path):
    import numpy as np
    from PIL import Image

    folder, _ = sweep
    assert main(["report", str(folder), "--out", str(tmp_path / "rep")]) == 0
    shot = tmp_path / "shot.png"
    # the proxy points nowhere: any request the page made would fail (it makes none)
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
                    "--window-size=1200,4000", f"--screenshot={shot}",
                    (tmp_path / "rep" / "report.html").as_uri()], check=True, timeout=120, capture_output=True)
    a = np.asarray(Image.open(shot).convert("L"), dtype=float)
    # the figures drew: many non-white pixels, and well beyond what the text alone covers
    assert (a < 250).mean() > 0.02 and a.std() > 10
