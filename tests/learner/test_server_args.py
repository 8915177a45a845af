"""`tether learner --trainer`: TrainerConfig overrides from the command line."""
import pytest

from learner.server import trainer_overrides
from learner.trainer_config import TrainerConfig


def test_plain_fields_are_replaced_and_checked():
    base = TrainerConfig(seed=3)
    got = trainer_overrides(base, '{"imitation_steps": 0, "lr": 1e-5}')
    assert (got.imitation_steps, got.lr, got.seed) == (0, 1e-5, 3)
    assert trainer_overrides(base, "{}") == base
    assert trainer_overrides(base, '{"frozen": ["encoders"]}').frozen == ("encoders",)


@pytest.mark.parametrize("text,match", [
    ("{imitation_steps: 0}", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"imitation_stepz": 0}', "no field 'imitation_stepz'"),
    ('{"verifier": {"every": 0}}', "not a plain field"),
    ('{"lr": [1e-5]}', "not a plain field"),
    ('{"frozen": [1]}', "not a plain field"),
])
def test_bad_overrides_name_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        trainer_overrides(TrainerConfig(), text)


def test_a_negative_keep_versions_is_refused_before_anything_opens(tmp_path, capsys):
    from learner.server import main
    assert main(["--data", str(tmp_path / "data"), "--keep-versions", "-1", "--insecure"]) == 2
    assert "--keep-versions must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "data" / "experience").exists()
