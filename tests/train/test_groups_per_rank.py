"""A rank whose share of prompt groups the rollout filter would empty fails at start-up, not mid-step."""

import pytest

from spear_engine.config_loading import ConfigError, load_config
from spear_engine.train.trainer import check_groups_per_rank


def test_one_group_per_rank_under_a_filter_ratio_is_refused_with_the_fix() -> None:
    config = load_config("spear", ["data.train_batch_size=2", "rollout.rollout_filter_ratio=0.75"])
    check_groups_per_rank(config, 1)  # 2 groups on one rank: int(0.75 x 2) = 1 kept
    with pytest.raises(ConfigError) as err:
        check_groups_per_rank(config, 2)  # 1 group per rank: int(0.75 x 1) = 0
    text = str(err.value)
    assert "1 group(s) per rank" in text and "keeps int(0.75 x 1) = 0" in text
    assert "data.train_batch_size >= 4" in text and "rollout.rollout_filter_ratio=1.0" in text


def test_every_rank_needs_a_group() -> None:
    config = load_config("spear", ["data.train_batch_size=2", "rollout.rollout_filter_ratio=1.0"])
    check_groups_per_rank(config, 2)
    with pytest.raises(ConfigError, match="0 group"):
        check_groups_per_rank(config, 3)
