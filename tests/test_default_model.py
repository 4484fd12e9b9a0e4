"""The real default model end to end (marked slow: ~1 minute; run with `pytest -m slow`)."""
import json

import pytest

from llmpalette.cli import main
from tests.conftest import REPO


@pytest.mark.slow
def test_default_4bit_recipe_end_to_end(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    text = (REPO / "recipes" / "smollm2-kmeans-4bit-g16.yaml").read_text()
    recipe.write_text(text.replace("evaluate: {windows: 16, seq_len: 512}", "evaluate: {windows: 2, seq_len: 256}"))
    assert main(["compress", str(recipe), "--job-dir", str(tmp_path / "job"), "--quiet"]) == 0
    report = json.loads((tmp_path / "job" / "report.json").read_text())
    assert len(report["layers"]) == 210  # 30 decoder layers x 7 linear; tied embedding / lm_head skipped
    assert all(layer["rel_sq_error"] < 0.03 for layer in report["layers"])
    ev = report["evaluation"]
    assert 1 < ev["perplexity_before"] < ev["perplexity_after"] < 10 * ev["perplexity_before"]
    assert 2.3 < report["size"]["compression_ratio_vs_float16"] < 2.6
