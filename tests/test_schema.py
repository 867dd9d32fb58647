"""The contract between the rooms (mhabench.schema): names that are their text, row ids parsed one way, rows
read one way, refusals with a kind, comparisons with findings."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from mhabench import impls
from mhabench.conformance.compare import compare
from mhabench.schema import (FIELDS, Area, Comparison, FindingKind, Quantity, Refusal, RefusalKind, Row, RowId,
                             Status)


def _row(**kw) -> Row:
    return Row(**{"adapter": "a", "case": "c", "area": "shapes", "dtype": "float32", "quantity": "output",
                  "status": "pass", **kw})


def test_a_name_is_its_text_everywhere():
    assert Status.PASS == "pass" and hash(Status.PASS) == hash("pass") and {"pass": 1}[Status.PASS] == 1
    assert f"{Status.FAIL}" == str(Status.FAIL) == "fail" and json.dumps([Area.MODERN]) == '["modern"]'
    assert Quantity.gradient("Wq") is Quantity.GRAD_WQ and Quantity.GRAD_WQ.gradient_of == "Wq"
    assert not Quantity.SCORES.is_gradient and Status.ERROR.failing and Status.SKIP.not_run
    with pytest.raises(ValueError, match="unknown area 'serving'; expected one of shapes, masks"):
        Area.parse("serving")


@pytest.mark.parametrize("row_id, parts", [
    ("keras_mha@jax-self_T8-causal-float32-grad_Wq", ("keras_mha@jax", "self_T8-causal", "float32", "grad_Wq")),
    ("keras_mha-self_T8-causal-float32-output", ("keras_mha", "self_T8-causal", "float32", "output")),
    ("torch_sdpa+flash-tiles-cross_T63_S65-float16-scores", ("torch_sdpa+flash", "tiles-cross_T63_S65", "float16",
                                                             "scores")),
    ("my-plugin-x-bfloat16-raises", ("my-plugin", "x", "bfloat16", "raises")),
])
def test_row_ids_parse_back_to_their_parts_however_the_names_are_spelled(row_id, parts):
    adapters = ["keras_mha", "keras_mha@jax", "torch_sdpa", "torch_sdpa+flash", "my", "my-plugin"]
    parsed = RowId.parse(row_id, adapters)
    assert parsed == RowId(*parts) and parsed.format() == row_id
    task = RowId.parse(row_id.rpartition("-")[0], adapters, quantity=False)
    assert task == RowId(*parts[:3]) and str(task) == row_id.rpartition("-")[0]


@pytest.mark.parametrize("text", ["nobody-c-float32-output", "keras_mha-c-float8-output", "keras_mha-c-float32-outpt",
                                  "keras_mha--float32-output", "keras_mha"])
def test_what_is_no_row_id_parses_to_none(text):
    assert RowId.parse(text, ["keras_mha"]) is None


def test_a_row_is_typed_immutable_and_written_in_field_order():
    row = _row(max_abs_err=1e-3)
    assert row.row_id == "a-c-float32-output" and row.status is Status.PASS and row.task == ("a", "c", "float32")
    with pytest.raises(AttributeError):
        row.status = "fail"
    failed = row.replace(status="fail", message="off")
    assert failed.status is Status.FAIL and row.status is Status.PASS
    record = failed.to_dict()
    assert list(record) == list(FIELDS) and record["status"] == "fail" and type(record["status"]) is str
    assert Row.from_dict(json.loads(json.dumps(record))) == failed
    assert failed["status"] == "fail" and failed.get("nothing", 7) == 7 and {**failed}["message"] == "off"
    assert dict(failed.items()) == record and "divergence" in failed and "nothing" not in failed
    assert pickle.loads(pickle.dumps(failed)) == failed


@pytest.mark.parametrize("record, problem", [
    ([1], "not a JSON object"),
    ({"row_id": "a-c-float32-output", "adapter": "a"}, "missing fields case, area, dtype, quantity, status"),
    ({**_row().to_dict(), "status": "maybe"}, "unknown status 'maybe'"),
    ({**_row().to_dict(), "area": "nowhere"}, "unknown area 'nowhere'"),
    ({**_row().to_dict(), "row_id": "a-d-float32-output"}, "does not name its row"),
])
def test_what_is_not_a_row_says_why(record, problem):
    with pytest.raises(ValueError, match=problem):
        Row.from_dict(record)
    with pytest.raises(ValueError, match=problem):  # the reader of many rows refuses it the same way
        Row.record(record)


def test_a_record_read_without_making_the_row_is_the_rows_record():
    from pathlib import Path
    fixtures = Path(__file__).resolve().parent / "fixtures"
    records = [r for name in ("sample", "mixed")
               for r in json.loads((fixtures / name / "conformance" / "results.json").read_text())["rows"]]
    old = {k: v for k, v in records[0].items() if k not in ("kernel", "message")}  # written before kernels
    records += [{**old, "adapter": "torch_sdpa+flash", "row_id": "torch_sdpa+flash" + old["row_id"][len(old["adapter"]):],
                 "message": None, "from_a_newer_version": 1}]
    for record in records:
        assert Row.record(record) == Row.from_dict(record).to_dict()
    assert Row.record(records[-1])["kernel"] == "flash" and Row.record(records[-1])["message"] == ""


def test_an_adapter_refuses_with_a_kind_and_the_same_text_as_before():
    adapter = impls.get_adapter("torch_sdpa+cudnn")
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8)
    device = adapter.unsupported_reason(spec, w, device="cpu")
    assert device.kind is RefusalKind.DEVICE and device.subject == "cpu" and device.startswith("device cpu: ")
    scores = impls.get_adapter("torch_sdpa").unsupported_reason(spec, w, return_scores=True)
    assert scores.kind is RefusalKind.FEATURE and scores.subject == "scores"
    assert scores == f"returning the attention scores: {scores.reason}"
    ort = impls.get_adapter("ort_attention")
    assert ort.unsupported_reason(spec, w, mode="eager").kind is RefusalKind.MODE
    bf16 = impls.get_adapter("torch_mha@ort").unsupported_reason(spec, w, dtype="bfloat16", mode="compiled")
    assert bf16.kind is RefusalKind.DTYPE and bf16.startswith("dtype bfloat16: ")


def test_a_refusal_reads_as_the_string_older_code_expects():
    refusal = Refusal.dtype("float16", "no float16 kernel")
    assert refusal is not None and refusal and "float16 kernel" in refusal and refusal.endswith("kernel")
    assert f"[{refusal}]" == "[dtype float16: no float16 kernel]" and refusal == "dtype float16: no float16 kernel"
    assert json.dumps(refusal) == '"dtype float16: no float16 kernel"'
    again = pickle.loads(pickle.dumps(refusal))
    assert again.kind is RefusalKind.DTYPE and again == refusal and again.reason == "no float16 kernel"
    plain = Refusal.of("inputs must be [batch, length, features]")  # what an older adapter returns
    assert plain.kind is RefusalKind.CONSTRAINT and plain == "inputs must be [batch, length, features]"
    assert Refusal.of(None) is None and Refusal.of("") is None and Refusal.of(refusal) is refusal
    with pytest.raises(TypeError, match="a refusal must be"):
        Refusal.of(3)
    with pytest.raises(AttributeError):
        refusal.kind = RefusalKind.MODE


def test_a_comparison_says_what_it_found_as_data_and_in_words():
    golden = np.array([1.0, np.nan, np.inf, 4.0])
    found = compare(golden, golden, np.array([np.nan, 0.0, -np.inf, 4.5]), "float32", "output")
    assert [f.kind for f in found.findings] == [FindingKind.EXTRA_NAN, FindingKind.MISSING_NAN,
                                                FindingKind.INF_MISMATCH, FindingKind.TOLERANCE]
    assert found.nonfinite and not found.ok and found.findings[3].first == (3,)
    assert found.message.split("; ")[0] == "1/4 elements with NaN where the golden is not NaN (first at [0])"
    assert "max |golden - output| = 0.5 > tolerance" in found.message
    off = compare(np.ones(3), np.ones(3), np.ones(3) + 1, "float32", "output")
    assert not off.ok and not off.nonfinite and off.found(FindingKind.TOLERANCE)
    shape = compare(np.zeros(3), np.zeros(3), np.zeros(4), "float32", "output")
    assert shape.found(FindingKind.SHAPE) and shape.error_ratio is None and not shape.nonfinite
    assert isinstance(shape, Comparison) and compare(np.ones(2), np.ones(2), np.ones(2), "float32", "output").ok
