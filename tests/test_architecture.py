"""The package's shape: SGLang is known only under ``host/``, and nothing imports in a circle.

Read from the source (AST), so a violation fails here before it fails on the next
SGLang release: outside ``host/`` (and the test/dev helpers in ``testing/`` and the
import stand-ins in ``standins/``) no module imports ``sglang`` or reads a field of
SGLang's batch, request, sampling or runner objects; and the intra-package import
graph -- module-level and function-level imports alike -- has no cycle (the
stand-ins are other packages' import surfaces, laid out as those packages are).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sglang_dflash"
HOST_ONLY = ("host", "testing", "standins")

# Fields of SGLang 0.5.23's ScheduleBatch / Req / SamplingBatchInfo / ForwardBatch /
# ModelRunner / LogitsProcessorOutput that only the host layer may read or write.
SGLANG_FIELDS = {
    "seq_lens_cpu", "seq_lens_sum", "req_pool_indices", "out_cache_loc", "spec_info", "forward_mode",
    "sampling_info", "req_to_token", "reqs", "sampling_params", "origin_input_ids", "output_ids",
    "decode_batch_idx", "kv_committed_len", "kv_allocated_len", "extend_lens", "logits_output",
    "next_token_logits", "next_token_ids", "token_to_kv_pool", "token_to_kv_pool_allocator",
    "req_to_token_pool", "model_runner", "tree_cache", "return_logprob", "custom_logit_processor",
    "temperatures", "top_ks", "top_ps", "min_ps", "penalizer_orchestrator", "vocab_mask", "grammars",
    "is_extend_in_batch", "can_run_cuda_graph", "customized_info", "capture_hidden_mode",
    "decode_cuda_graph_runner", "lora_ids", "grammar", "finished_reason",
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _subpackage(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imported(name: str, path: Path, tree: ast.AST) -> set[str]:
    """Absolute names of every module this file imports (any depth, any scope)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_sglang_is_imported_only_by_the_host_layer():
    offenders = []
    for name, path in modules().items():
        if _subpackage(name) in HOST_ONLY:
            continue
        for imported in _imported(name, path, ast.parse(path.read_text())):
            if imported == "sglang" or imported.startswith("sglang."):
                offenders.append(f"{name} imports {imported}")
    assert not offenders, offenders


def test_sglang_fields_are_read_only_by_the_host_layer():
    offenders = []
    for name, path in modules().items():
        if _subpackage(name) in HOST_ONLY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in SGLANG_FIELDS:
                offenders.append(f"{name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def test_no_import_cycles():
    mods = {name: path for name, path in modules().items() if _subpackage(name) != "standins"}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imported in _imported(name, path, ast.parse(path.read_text())):
            # "from pkg import mod" names the module itself; "from mod import func" its module
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported.startswith("sglang_dflash"):
                deps.add(imported)
        graph[name] = deps
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checks_see_violations(tmp_path):
    """The scanners themselves: an sglang import, a batch field and a two-module cycle are found."""
    tree = ast.parse("import torch\nfrom sglang.srt import x\ny = batch.seq_lens_cpu\n")
    assert "sglang.srt" in _imported("sglang_dflash.spec.fake", Path("fake.py"), tree)
    assert any(isinstance(n, ast.Attribute) and n.attr in SGLANG_FIELDS for n in ast.walk(tree))
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
