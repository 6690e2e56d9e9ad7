"""``import carfast`` stays lean: the optional heavy dependencies load only when used."""
import subprocess
import sys


def test_import_loads_neither_triton_nor_matplotlib():
    code = ("import sys, carfast; "
            "print(sorted(m for m in ('triton', 'matplotlib', 'torch_pruning', 'PIL', 'captum') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
