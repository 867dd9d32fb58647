"""Every divergence catalogue entry has exactly one kind (what it means to someone porting a model): derived
from its keys where they tell, declared where not, and a declared kind is checked like every other key."""
import pytest

from mhabench.conformance import catalogue

PLAIN = '[[divergence]]\nid = "a"\nadapters = ["numpy_oracle"]\nobserved = "o"\n'


def _load(tmp_path, body):
    (tmp_path / "x.toml").write_text(PLAIN + body)
    return catalogue.load(tmp_path)


def test_every_shipped_entry_has_exactly_one_known_kind():
    entries = catalogue.load()
    assert all(e.kind in catalogue.KINDS for e in entries), [e.id for e in entries if e.kind not in catalogue.KINDS]
    assert set(e.kind for e in entries) == set(catalogue.KINDS), "every kind has an entry"
    for entry in entries:  # declared only where the other keys do not tell (or tell the same)
        derived = catalogue.derived_kind({k: v for k, v in vars(entry).items() if v is not None and k != "kind"})
        assert derived is None or derived[0] == entry.kind, entry.id


@pytest.mark.parametrize("body, kind", [
    ('when = ["masked_nonfinite"]\nbehaviour = "nonfinite_input_poisons_batch"\n', "nonfinite"),
    ('when = ["empty_rows"]\nbehaviour = "jax_masked_logits_filled"\n', "empty_rows"),
    ('oracle_policy = "uniform"\n', "empty_rows"),
    ('precision = "float32"\ndtypes = ["float64"]\n', "precision"),
    ('max_error_ratio = 8.0\n', "precision"),
    ('backward_form = "flash"\n', "precision"),
    ('check = "introduces_nan"\nkind = "answer"\n', "answer"),
    ('when = ["unread_nonfinite_query"]\noracle_policy = "uniform_rounded"\ncheck = "introduces_nan"\n', "nonfinite"),
])
def test_kind_is_derived_from_the_keys_or_declared(tmp_path, body, kind):
    [entry] = _load(tmp_path, body)
    assert entry.kind == kind
    assert catalogue.export([entry], [])[0]["kind"] == kind  # travels to catalogue.json, for the report


def test_an_underivable_entry_without_a_kind_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"x.toml: divergence 'a': 'kind' is required"):
        _load(tmp_path, 'check = "introduces_nan"\n')


def test_an_unknown_kind_names_the_entry_and_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"divergence 'a': kind must be one of .*got 'wrong'"):
        _load(tmp_path, 'check = "introduces_nan"\nkind = "wrong"\n')


def test_a_declared_kind_may_not_contradict_the_derived_one(tmp_path):
    with pytest.raises(ValueError, match=r"divergence 'a': kind 'answer' contradicts the kind 'empty_rows'"):
        _load(tmp_path, 'oracle_policy = "uniform"\nkind = "answer"\n')
    [entry] = _load(tmp_path, 'oracle_policy = "uniform"\nkind = "empty_rows"\n')  # the same: harmless
    assert entry.kind == "empty_rows"
