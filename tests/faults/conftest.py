"""Every test under tests/faults carries the ``faults`` marker (``pytest -m faults`` runs just
them; ``make faults`` runs them at the full sizes of tests/faults/report.py)."""
import pathlib

import pytest

HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in pathlib.Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """A small signed ReferenceVLA artifact (version 1) for the sawyer_metaworld robot."""
    pytest.importorskip("torch")
    from tests.doubles import export_tiny_artifact
    out = tmp_path_factory.mktemp("faults-artifact") / "v1"
    export_tiny_artifact(out, version=1)
    return out
