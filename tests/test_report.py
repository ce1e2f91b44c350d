"""report.html as a person sees it: rendered by headless Chromium, self-contained; and the
`edgeft report` command on hand-made run folders (no model is run)."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft import report, runs
from edgeft.cli import main
from edgeft.config import RunConfig

SIGN_OFF = "Steep slow, sip kind! ~Fernhollow"


def make_run(folder, steps=20, rank=8, lr=5e-4):
    folder.mkdir(parents=True)
    cfg = RunConfig()
    cfg.data.train = "chats.jsonl"
    cfg.train.steps, cfg.lora.rank, cfg.train.learning_rate = steps, rank, lr
    (folder / runs.CONFIG).write_text(json.dumps(cfg.to_dict()))
    lines = [{"kind": "valid", "step": 0, "val_loss": 3.2}]
    for s in range(1, steps + 1):
        lines.append({"kind": "train", "step": s, "loss": 3.0 * 0.95 ** s})
        if s % 10 == 0:
            lines.append({"kind": "valid", "step": s, "val_loss": 3.2 * 0.96 ** s})
    (folder / runs.METRICS).write_text("".join(json.dumps(r) + "\n" for r in lines))
    ans = lambda text, hit=False: {"text": text, "tokens": len(text.split()), "hit_limit": hit}  # noqa: E731
    ev = {
        "engine": "MLX (test)", "prompts_from": "the validation split", "training_answers": 54, "seconds": 1.0,
        "settings": {"max_tokens": 64, "temperature": 0.0, "seed": 0, "repeat_penalty": 1.0, "repeat_last_n": 64},
        "phrases": [{"text": SIGN_OFF, "where": "sign-off", "share": 1.0, "n_words": 5}],
        "prompts": [
            {"source": "chats.jsonl:3", "messages": [{"role": "user", "content": "Do you ship to Canada?"}],
             "reference": f"We do, in 5 to 8 days. {SIGN_OFF}",
             "base": ans("Sports, Sports, Sports, Sports, Sports, Sports", True),
             "tuned": ans(f"Yes, we ship to Canada. {SIGN_OFF}")},
            {"source": "chats.jsonl:9", "messages": [{"role": "user", "content": "Is <b>Moonpetal</b> decaf?"}],
             "reference": f"Yes, it is caffeine-free. {SIGN_OFF}",
             "base": ans("Moonpetal is a tea."), "tuned": ans(f"Yes! {SIGN_OFF}")},
        ],
        "knowledge": [
            {"question": "What is the capital of France?", "accepted": ["Paris"], "base": "Paris.", "tuned": "Paris!"},
            {"question": "How many legs does a spider have?", "accepted": ["eight", "8"],
             "base": "Eight legs.", "tuned": "Six legs."},
        ],
    }
    (folder / runs.EVAL).write_text(json.dumps(ev))
    return folder


def test_report_rows_and_markdown(tmp_path):
    run = make_run(tmp_path / "runs" / "brand")
    r = CliRunner().invoke(main, ["report", str(run)])
    assert r.exit_code == 0, r.output
    md = (run / runs.REPORT_MD).read_text()
    row = next(line for line in md.splitlines() if SIGN_OFF.replace("|", "\\|") in line and "sign-off" in line)
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["0%", "100%", "100%"]
    assert re.search(r"\| answers caught in a loop \| 50% \| 0% \| 0% \|", md)
    assert "Lost: How many legs does a spider have?" in md
    assert "validation loss | 3.200 |" in md


def test_report_html_is_self_contained(tmp_path):
    run = make_run(tmp_path / "brand")
    page = report.build(run, log=lambda s: None).read_text()
    assert 'id="scores"' in page and 'id="curves"' in page
    assert not re.search(r"(?:src|href)\s*=\s*[\"'](?!data:|#)", page), "an external reference"
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    assert "&lt;b&gt;Moonpetal&lt;/b&gt;" in page  # text from the data is escaped


def test_compare_two_runs(tmp_path):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", steps=30, rank=16)
    r = CliRunner().invoke(main, ["report", str(a), str(b)])
    assert r.exit_code == 0, r.output
    md = (a / "compare-b.md").read_text()
    assert "| lora.rank | 8 | 16 |" in md and "| train.steps | 20 | 30 |" in md
    assert "learning_rate" not in md
    assert 'id="curves"' in (a / "compare-b.html").read_text()


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium (Debian: apt-get install chromium)")
def test_report_renders_in_chromium(tmp_path):
    from PIL import Image

    run = make_run(tmp_path / "brand")
    page = report.build(run, log=lambda s: None)
    shot = tmp_path / "shot.png"
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400"]
    subprocess.run([*base, f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert '<table id="scores">' in dom and "answers caught in a loop" in dom
    assert re.search(r'<img id="curves"[^>]*src="data:image/png;base64,', dom)

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert img.std() > 10, "the screenshot is blank"
    # the loss curves were drawn: matplotlib's first two line colours (C0 blue, C1 orange) are on screen
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        near = (np.abs(img - np.array(rgb)).sum(axis=-1) < 30).sum()
        assert near > 200, f"no loss curve in colour {rgb} on the page"


def test_the_validation_loss_reported_is_that_of_the_adapters_the_run_kept():
    from edgeft.evaluate import score_rows

    metrics = [{"kind": "valid", "step": 0, "val_loss": 4.0}, {"kind": "valid", "step": 20, "val_loss": 2.0},
               {"kind": "valid", "step": 60, "val_loss": 3.0}]
    assert score_rows(None, metrics)[0] == ("validation loss", 4.0, 3.0, None)  # no record: the last
    kept = [*metrics, {"kind": "adapters", "step": 20, "val_loss": 2.0}]
    assert score_rows(None, kept)[0] == ("validation loss", 4.0, 2.0, None)
