"""Everything that knows SGLang 0.5.23: the one folder to change for the next release.

* :mod:`.hooks` / :mod:`.entry` -- the plugin hooks and the functions they (and the
  source patch) call; :mod:`.version` -- the version gate and backend switch;
* :mod:`.server_args` -- DFLASH launch validation; :mod:`.requests` -- per-request
  refusals and statistics;
* :mod:`.worker` -- the speculative worker SGLang runs, translating between SGLang and
  :mod:`sglang_dflash.spec`; :mod:`.batch` -- the typed batch view; :mod:`.target` --
  the target model behind one port; :mod:`.spec_inputs` -- the spec inputs SGLang carries;
* :mod:`.features` -- request features per verify position: :mod:`.penalties`,
  :mod:`.grammar`, :mod:`.custom_processors`, :mod:`.logprobs`; :mod:`.lora` -- LoRA
  targets;
* :mod:`.parallel` -- tensor parallelism and DP attention on SGLang's process groups;
  :mod:`.disagg` -- prefill/decode disaggregation (the drafter KV SGLang transfers);
* :mod:`.torch_native_verify` and :mod:`.upstream` -- CPU-lane lifts;
  :mod:`.api` -- the SGLang internals used, resolved lazily.
"""
