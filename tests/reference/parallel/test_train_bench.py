import csv

from reference.parallel.bench import main


def test_train_bench_appends_rows_naming_backend_and_optimizer(tmp_path):
    out, path = tmp_path / "run", tmp_path / "train.csv"
    assert main(["--preset", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--warmup", "1",
                 "--out", str(out), "--csv", str(path)]) == 0
    rows = list(csv.DictReader(open(path)))
    assert {r["metric"] for r in rows} >= {"tokens_per_s", "first_loss", "final_loss"}
    cfg = rows[0]["config"]
    assert cfg.startswith("tiny L2 D64 E4 k2") and cfg.endswith("moe-torch adamw-default")
    assert float(next(r["value"] for r in rows if r["metric"] == "tokens_per_s")) > 0
