"""The per-token block-position record and its per-request summaries."""

from sglang_dflash.host.requests import record_step
from sglang_dflash.telemetry.request_stats import complete_positions, summarize


class FakeReq:
    def __init__(self, prompt_tokens_out: int):
        self.output_ids = [7] * prompt_tokens_out
        self.customized_info = None
        self.is_retracted = False

    def finished(self):
        return False


def test_record_and_summarize():
    req = FakeReq(1)  # one token from prefill
    for emitted in ([5, 6, 9], [4], [1, 2, 3, 8]):  # 2 accepted, 0, 3 accepted
        record_step([req], [emitted])
        req.output_ids += emitted
    positions = req.customized_info["spec_dflash_positions"]
    assert positions == [0, 1, 2, 0, 0, 1, 2, 3, 0]
    assert len(positions) == len(req.output_ids)
    summary = summarize(positions)
    assert summary["spec_dflash_accepted_per_step"] == [2, 0, 3]
    assert summary["spec_dflash_accepted_by_position"] == [2, 2, 1]


def test_truncated_final_step_and_stream_gap():
    # A stop string cut the last step after two accepted drafts; the stream lost the prefill entry.
    visible = [1, 0, 1, 2]
    positions = complete_positions([None] + visible, completion_tokens=5)
    assert positions == [0, 1, 0, 1, 2]
    assert summarize(positions)["spec_dflash_accepted_per_step"] == [1, 2]
