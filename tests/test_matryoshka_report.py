"""tools/matryoshka_report.py on a small trained checkpoint: the JSON grid, the PNG, and
the errors for grid points outside the trained sets."""

import json
import os

import jax
import numpy as np
import pytest
from tool_helpers import load_tool

from mlembed_jax import encode as enc
from mlembed_jax.eval import retrieval as rev

pytestmark = pytest.mark.integration  # reports on a trained run

def test_report_writes_json_grid_and_png(names_run, tmp_path):
    work, _ = names_run
    tool = load_tool("matryoshka_report")
    out = tmp_path / "report"
    png = tmp_path / "docs" / "m.png"
    assert tool.main([f"--model={work}", "--heldout", f"--output_dir={out}", f"--png={png}",
                      "--max_queries=150", "--quiet"]) == 0
    r = json.load(open(out / "matryoshka.json"))
    # The small model's trained grid: ranks {8, 16, 32}, exits {1, 2}, dims {8, ..., 64}.
    assert (r["ranks"], r["exits"], r["dims"]) == ([8, 16, 32], [1, 2], [8, 16, 32, 64])
    assert len(r["grid"]) == 3 * 2 * 4
    assert r["sets"][0]["name"] == "cldr_names_heldout"
    for row in r["grid"]:
        assert 0 <= row["ndcg@10"] <= 1 and 0 <= row["recall@100"] <= 1
        assert row["embedding_bytes"] == 4 * row["dim"]
    # Parameter counts: MEL factors at rank r (4096 r + 64 r), plus the layers and the norm.
    model = enc.load(work)
    layer = sum(int(np.prod(x.shape[1:]))
                for x in jax.tree_util.tree_leaves(model.params["layers"]))
    row = next(x for x in r["grid"] if (x["rank"], x["exit"]) == (16, 1))
    assert row["params"] == 4096 * 16 + 16 * 64 + layer + 64
    # A grid point equals the single-point evaluation (same queries, same search).
    [s] = rev.heldout_sets(model.train_config)

    want = rev.evaluate(model, rev.cap_queries(s, 150, 0), rank=16, exit=1, dim=32)
    got = next(x for x in r["grid"] if (x["rank"], x["exit"], x["dim"]) == (16, 1, 32))
    assert got["ndcg@10"] == pytest.approx(want["ndcg@10"], abs=1e-6)
    for path in (out / "matryoshka.png", png):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 20_000  # a real figure, not an empty canvas


def test_report_rejects_untrained_grid_points(names_run, tmp_path, capsys):
    work, _ = names_run
    tool = load_tool("matryoshka_report")
    # --out_dir: the old name of --output_dir, still accepted
    args = [f"--model={work}", "--heldout", f"--out_dir={tmp_path}", "--quiet"]
    assert tool.main(args + ["--ranks=8,12"]) == 2
    assert "rank=12 is not a trained MEL rank (8, 16, 32)" in capsys.readouterr().err
    assert tool.main(args + ["--dims=8,100"]) == 2
    assert "dim=100 is not one of the trained MRL dims" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "matryoshka.json")
    # --allow_untrained opens them (exit 2 of 2 is the whole small model).
    assert tool.main(args + ["--ranks=12", "--exits=2", "--dims=40",
                             "--allow_untrained", "--max_queries=50"]) == 0
    [row] = json.load(open(tmp_path / "matryoshka.json"))["grid"]
    assert (row["rank"], row["exit"], row["dim"]) == (12, 2, 40)
