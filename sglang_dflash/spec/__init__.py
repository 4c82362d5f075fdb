"""Speculation: the decode step (:mod:`.worker`), drafting (:mod:`.proposer`), the verify
tree (:mod:`.verify_tree`), logits steps (:mod:`.logits`; output-history penalties
:mod:`.penalties` over the worker's own :mod:`.history`), acceptance and rejection
sampling (:mod:`.accept`, :mod:`.sampling`) and the adaptive verify length
(:mod:`.adaptive`). SGLang-agnostic: the host layer feeds it typed views.
"""
