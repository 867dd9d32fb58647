"""`mhabench bench` names its skip log only when it wrote one."""
from mhabench import results
from mhabench.benchmarks.sweep import skips_note


def test_the_skip_log_is_named_only_when_it_exists(tmp_path):
    layout = results.Layout(tmp_path)
    assert "skips.jsonl" not in skips_note(layout) and "nothing skipped" in skips_note(layout)
    layout.skips.parent.mkdir(parents=True)
    layout.skips.write_text('{"benchmark": "b", "params": {}, "status": "skipped", "reason": "r"}\n')
    assert str(layout.skips) in skips_note(layout)
