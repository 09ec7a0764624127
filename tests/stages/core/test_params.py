"""stages.core.params: params.yaml, dotted overrides, validation."""
from __future__ import annotations


import pytest

from stages.core.errors import StageError
from stages.core.params import apply_overrides, load_params, parse_override


def test_apply_overrides_sets_dotted_keys_and_leaves_the_input_untouched(repo_params):
    out = apply_overrides(repo_params, {"cluster.k": 7, "model.sobel": False})
    assert out.cluster.k == 7 and out.model.sobel is False
    assert repo_params.cluster.k != 7  # a new Params, not an in-place edit
    raw = repo_params.model_dump()  # as read from a file: the dict is left as it was
    assert apply_overrides(raw, {"cluster.k": 7}) == out.model_copy(update={"model": repo_params.model})
    assert raw == repo_params.model_dump()


@pytest.mark.parametrize("key", ["cluster.kk", "clusterr.k", "cluster.k.x"])
def test_apply_overrides_refuses_unknown_keys(repo_params, key):
    with pytest.raises(StageError, match="unknown parameter"):
        apply_overrides(repo_params, {key: 1})


def test_parse_override_reads_yaml_scalars():
    assert parse_override("cluster.k=50") == ("cluster.k", 50)
    assert parse_override("model.sobel=false") == ("model.sobel", False)
    assert parse_override("train.samples_per_epoch=null") == ("train.samples_per_epoch", None)
    with pytest.raises(StageError, match="section.key=value"):
        parse_override("cluster.k")


def test_load_params_missing_file_names_it(tmp_path):
    with pytest.raises(StageError, match=str(tmp_path / "nope.yaml")):
        load_params(tmp_path / "nope.yaml")


