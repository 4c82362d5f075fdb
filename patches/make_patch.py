"""Regenerate (or check) ``sglang-0.5.23-dflash.patch`` from the installed SGLang.

The patch is the source-level equivalent of the plugin's hooks, for users who prefer
patching SGLang to installing an entry-point plugin: each edit inserts a call to the
same ``sglang_dflash.host.entry`` entry point the corresponding hook calls, so the
two ways of enabling the package cannot drift apart. Apply it from SGLang's
site-packages folder with ``patch -p1 < sglang-0.5.23-dflash.patch``.

    python patches/make_patch.py           # rewrite the patch
    python patches/make_patch.py --check   # exit 1 if the committed patch is stale
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

PATCH = Path(__file__).with_name("sglang-0.5.23-dflash.patch")

# (file under site-packages, anchor that must occur exactly once, text inserted after it)
EDITS = [
    (
        "sglang/srt/speculative/spec_info.py",
        "        platform_worker_cls = self.get_platform_worker_cls()\n"
        "        if platform_worker_cls is not None:\n"
        "            return platform_worker_cls\n",
        "\n"
        "        if self.is_dflash():\n"
        "            from sglang_dflash.host.entry import dflash_worker_class\n"
        "\n"
        "            dflash_worker = dflash_worker_class()\n"
        "            if dflash_worker is not None:\n"
        "                return dflash_worker\n",
    ),
    (
        "sglang/srt/speculative/spec_info.py",
        "        future_map: FutureMap,\n"
        "    ) -> Optional[SpecInput]:\n",
        "        if self.is_dflash():\n"
        "            from sglang_dflash.host.entry import dflash_disagg_draft_input\n"
        "\n"
        "            state = dflash_disagg_draft_input(batch, last_tokens_tensor, future_map)\n"
        "            if state is not None:\n"
        "                return state\n",
    ),
    (
        "sglang/srt/arg_groups/speculative_hook.py",
        "def _handle_dflash(server_args: ServerArgs) -> None:\n",
        "    from sglang_dflash.host.entry import handle_dflash_server_args\n"
        "\n"
        "    if handle_dflash_server_args(server_args):\n"
        "        return\n",
    ),
    (
        "sglang/srt/model_executor/model_runner_components/spec_aux_hidden_state.py",
        "    spec_algorithm: SpeculativeAlgorithm,\n"
        "    is_draft_worker: bool,\n"
        ") -> None:\n"
        "    if spec_algorithm.is_dflash_family() and not is_draft_worker:\n"
        "        from sglang.srt.speculative.dflash_utils import parse_dflash_draft_config\n",
        "        from sglang_dflash.host.entry import resolve_dflash_aux_hidden_state\n"
        "\n"
        "        if resolve_dflash_aux_hidden_state(\n"
        "            config=config,\n"
        "            server_args=server_args,\n"
        "            model_config=model_config,\n"
        "            spec_algorithm=spec_algorithm,\n"
        "            is_draft_worker=is_draft_worker,\n"
        "        ):\n"
        "            return\n",
    ),
    (
        "sglang/srt/model_executor/model_runner_components/attention_backend_setup.py",
        "    Must be called before CUDA graph capture so the captured graphs\n"
        "    include aux hidden state output paths.\n"
        '    """\n',
        "    from sglang_dflash.host.entry import configure_dflash_capture\n"
        "\n"
        "    if (\n"
        "        dflash_use_aux_hidden_state\n"
        "        and not is_dspark\n"
        "        and configure_dflash_capture(model, dflash_target_layer_ids)\n"
        "    ):\n"
        "        dflash_use_aux_hidden_state = False\n",
    ),
    (
        "sglang/srt/speculative/dflash_utils.py",
        "def validate_dflash_request(req: Req, enable_overlap: bool) -> Optional[str]:\n",
        "    from sglang_dflash.host.entry import OURS, dflash_request_refusal, selected_backend\n"
        "\n"
        "    if selected_backend() == OURS:\n"
        "        return dflash_request_refusal(req)\n",
    ),
    (
        "sglang/srt/layers/attention/torch_native_backend.py",
        "        forward_batch: ForwardBatch,\n"
        "        save_kv_cache=True,\n"
        "    ):\n"
        "        if layer.qk_head_dim != layer.v_head_dim:\n"
        "            o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))\n"
        "        else:\n"
        "            o = torch.empty_like(q)\n"
        "\n"
        "        if layer.is_cross_attention:\n"
        "            cache_loc = forward_batch.encoder_out_cache_loc\n",
        None,  # replaced below: insert before the anchor's body instead
    ),
    (
        "sglang/srt/model_executor/runner/decode_cuda_graph_runner.py",
        "    def can_run_graph(self, forward_batch: ForwardBatch):\n",
        "        from sglang_dflash.host.entry import verify_needs_eager\n"
        "\n"
        "        if verify_needs_eager(forward_batch):\n"
        "            return False\n",
    ),
    (
        "sglang/srt/managers/scheduler_components/internal_state.py",
        "    def _add_speculative(self, state: Dict[str, Any]) -> None:\n"
        "        scheduler = self.scheduler\n",
        "        from sglang_dflash.host.entry import add_dflash_state\n"
        "\n"
        "        add_dflash_state(self, state)\n",
    ),
]

# The torch_native edit goes at the top of forward_extend's body.
TORCH_NATIVE_ANCHOR = (
    "        forward_batch: ForwardBatch,\n"
    "        save_kv_cache=True,\n"
    "    ):\n"
    "        if layer.qk_head_dim != layer.v_head_dim:\n"
)
TORCH_NATIVE_INSERT = (
    "        forward_batch: ForwardBatch,\n"
    "        save_kv_cache=True,\n"
    "    ):\n"
    "        if forward_batch.forward_mode.is_target_verify():\n"
    "            from sglang_dflash.host.entry import torch_native_verify\n"
    "\n"
    "            return torch_native_verify(self, q, k, v, layer, forward_batch, save_kv_cache)\n"
    "\n"
    "        if layer.qk_head_dim != layer.v_head_dim:\n"
)


def site_packages() -> Path:
    import sglang

    return Path(sglang.__file__).resolve().parents[1]


def patched(relpath: str, text: str, anchor: str, insert) -> str:
    if text.count(anchor) != 1:
        raise SystemExit(f"{relpath}: anchor found {text.count(anchor)} times, expected once")
    if insert is None:
        if text.count(TORCH_NATIVE_ANCHOR) != 1:
            raise SystemExit(f"{relpath}: forward_extend anchor not unique")
        return text.replace(TORCH_NATIVE_ANCHOR, TORCH_NATIVE_INSERT)
    return text.replace(anchor, anchor + insert)


def build_patch(root: Path) -> str:
    chunks = []
    for relpath, anchor, insert in EDITS:
        original = (root / relpath).read_text()
        new = patched(relpath, original, anchor, insert)
        chunks.append(
            "".join(
                difflib.unified_diff(
                    original.splitlines(keepends=True),
                    new.splitlines(keepends=True),
                    fromfile=f"a/{relpath}",
                    tofile=f"b/{relpath}",
                )
            )
        )
    return "".join(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed patch differs")
    args = parser.parse_args()
    text = build_patch(site_packages())
    if args.check:
        if PATCH.read_text() != text:
            sys.exit(f"{PATCH.name} is stale: run python patches/make_patch.py")
        print(f"{PATCH.name} is up to date")
        return
    PATCH.write_text(text)
    print(f"wrote {PATCH}")


if __name__ == "__main__":
    main()
