"""The report of the real SmolLM2 brand-voice run (the shared tune of conftest.py, which
evaluates at its end by default): the brand's sign-off is mined from the training answers,
not told, and the tuned column shows it adopted while the base's does not."""

import json

import pytest

from edgeft import runs

pytestmark = pytest.mark.real

MARKER = "Steep slow, sip kind"


def test_report_shows_the_mined_sign_off_adopted_by_the_tuned_model_only(tuned_smollm2):
    ev = json.loads((tuned_smollm2 / runs.EVAL).read_text())
    assert ev["prompts"] and ev["prompts_from"] == "the validation split"
    mined = [p for p in ev["phrases"] if p["where"] == "sign-off" and MARKER in p["text"]]
    assert mined, ev["phrases"]
    assert mined[0]["share"] > 0.9

    md = (tuned_smollm2 / runs.REPORT_MD).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| sign-off") and MARKER in line)
    base, tuned, reference = [c.strip() for c in row.strip().strip("|").split("|")][1:]
    assert base == "0%", row
    assert int(tuned.rstrip("%")) >= 50, row
    assert reference == "100%", row
    html = (tuned_smollm2 / runs.REPORT_HTML).read_text()
    assert 'id="scores"' in html and "data:image/png;base64," in html
