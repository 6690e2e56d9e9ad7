"""The ``carfast`` command."""
import json
import subprocess
import sys

from carfast.cli import main


def test_score_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["score", "--layer", "layer3.2.conv1", "--n", "40", "--top", "5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CAR scores of 'layer3.2.conv1': 64 filters on 40 images" in text
    d = json.loads(out.read_text())
    assert d["layers"][0]["layer"] == "layer3.2.conv1" and len(d["layers"][0]["car"]) == 64


def test_bad_layer_is_a_plain_error(capsys):
    assert main(["score", "--layer", "layer9.conv1", "--n", "10"]) == 2
    err = capsys.readouterr().err
    assert "carfast score: error:" in err and "not found" in err and "Traceback" not in err


def test_missing_data_file(capsys, tmp_path):
    assert main(["score", "--data", str(tmp_path / "nope.npz")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_version_lists_backends():
    r = subprocess.run([sys.executable, "-m", "carfast.cli", "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("carfast ") and "torch" in r.stdout
