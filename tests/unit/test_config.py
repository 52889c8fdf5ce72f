"""Typed config: params.yaml is the source of truth, overrides are typed, mistakes fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.core.config import (
    Config,
    ConfigError,
    apply_overrides,
    build_config,
    load_config,
    parse_override,
)

ROOT = Path(__file__).resolve().parents[2]


def test_params_yaml_equals_typed_defaults() -> None:
    # The committed params.yaml and the pydantic defaults (the only ones; the loops' dataclasses have none).
    assert load_config(ROOT / "params.yaml") == Config()


def test_overrides_are_yaml_typed() -> None:
    cfg = load_config(
        ROOT / "params.yaml",
        ["seed=7", "eval.ks=[5, 50]", "eval.primary=recall@50", "model.name=bpr", "data.path=null"],
    )
    assert cfg.seed == 7
    assert cfg.eval.ks == [5, 50]
    assert cfg.model.name == "bpr"
    assert cfg.data.path is None


def test_override_does_not_mutate_input() -> None:
    tree = {"model": {"name": "pop"}}
    assert apply_overrides(tree, ["model.name=bpr"]) == {"model": {"name": "bpr"}}
    assert tree == {"model": {"name": "pop"}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.name=nope", "model.name"),
        ("seed=abc", "seed"),
        ("split.train_ratio=1.5", "split.train_ratio"),
        ("split.valid_ratio=0.3", "train_ratio + split.valid_ratio"),
        ("eval.ks=[]", "eval.ks"),
        ("modle.name=pop", "modle"),  # a typo is rejected, not ignored
        ("split.valid_start=5", "given together"),
        ("eval.primary=ndcg@30", "eval.primary"),  # 30 is not among eval.ks
        ("eval.primary=auc@10", "eval.primary"),
        ("mine.max_length=0", "mine.max_length"),
        ("mine.weighting=hetesim", "mine.weighting"),
    ],
)
def test_bad_values_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace(".", r"\.")):
        load_config(ROOT / "params.yaml", [override])


@pytest.mark.parametrize("text", ["noequals", "=value", "a..b=1", "seed=[unclosed"])
def test_malformed_override(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_override(text)


def test_override_into_scalar_is_rejected() -> None:
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_flat_has_every_leaf() -> None:
    flat = Config().flat()
    assert flat["model.bpr.dim"] == 64
    assert flat["split.protocol"] == "user_temporal"
    assert flat["kg.user_fields.age"] == "age_bucket"
    assert flat["kg.type_names"] == {}


def test_build_config_rejects_non_mapping(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="invalid configuration"):
        build_config({"seed": "x"})
