"""Old public names keep working and warn: each points to the one place its objects now live."""
import importlib
import subprocess
import sys

import pytest

import carfast
import carfast.data
import carfast.graph

MOVED = {  # old module -> (new home, names)
    "carfast.groups": (carfast.graph, ["find_group", "CouplingGroup", "GroupMember", "members_of"]),
    "carfast.train_data": (carfast.data, ["cifar10_train", "decode_jpegs"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_warns_and_gives_the_same_objects(old):
    new, names = MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated.*{new.__name__}"):
        module = importlib.import_module(old)
    assert all(getattr(module, n) is getattr(new, n) for n in names)
    short = old.rpartition(".")[2]
    sys.modules.pop(old, None)
    delattr(carfast, short)                           # the import set it on the package
    with pytest.warns(DeprecationWarning):            # as an attribute of carfast, without an import
        assert getattr(carfast, short).__name__ == old


def test_import_carfast_does_not_warn():
    """Only the old names warn: a plain ``import carfast`` (in a fresh interpreter) is silent."""
    run = subprocess.run([sys.executable, "-W", "always", "-c", "import carfast"], capture_output=True, text=True)
    assert run.returncode == 0 and "is deprecated" not in run.stderr, run.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        carfast.nothing_here  # noqa: B018
