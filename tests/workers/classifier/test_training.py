"""train + evaluate on the small data set: metrics in [0, 1], the JSON keys, the PNG."""

from __future__ import annotations

import json

from workers.classifier.training import evaluate


def _fractions(report: dict) -> list[float]:
    """Every metric value (not counts) of the report's metric sections."""
    out = []

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, float) and key not in ("n",):
            out.append(node)

    for section in ("clean_vs_adversarial", "target_model", "target_model_mean", "per_attack", "failed_attacks",
                    "successful_attacks"):
        walk(report[section])
    walk({"accuracy": report["attack_type"]["accuracy"]})
    return out


def test_evaluate_writes_json_and_png(trained, small_state, tmp_path):
    json_path, png_path = tmp_path / "eval.json", tmp_path / "confusion.png"
    report = evaluate(small_state, json_path=json_path, png_path=png_path, print_tables=False)
    data = json.loads(json_path.read_text())
    assert set(data["clean_vs_adversarial"]) >= {"map", "recall", "f1"}
    assert set(data["target_model"]) == {"cnn", "mlp"}
    for row in data["target_model"].values():
        assert set(row) >= {"map", "recall", "f1"}
    assert set(data["attack_type"]) >= {"accuracy", "confusion"}
    assert {"n_test", "per_attack", "failed_attacks"} <= set(data)
    assert set(data["per_attack"]) == {"clean", "fgsm", "pgd"}
    n = len(data["attack_type"]["labels"])
    confusion = data["attack_type"]["confusion"]
    assert len(confusion) == n and sum(map(sum, confusion)) == data["n_test"]
    values = _fractions(report)
    assert values and all(0.0 <= v <= 1.0 for v in values)
    assert report["clean_vs_adversarial"]["map"] > 0.5  # better than chance even on this tiny set
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_prints_tables(trained, small_state, tmp_path, capsys):
    evaluate(small_state, png_path=tmp_path / "c.png")
    out = capsys.readouterr().out
    assert "clean vs adversarial" in out and "target model" in out and "confusion" in out
