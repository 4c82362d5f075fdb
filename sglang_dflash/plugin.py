"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``dflash``).

SGLang calls :func:`register` in every process it starts, before the engine exists;
all it does is hand the hooks of :mod:`sglang_dflash.host.hooks` to SGLang's HookRegistry, so
``--speculative-algorithm DFLASH`` builds this package's worker. Set
``SGLANG_DFLASH_BACKEND=upstream`` for SGLang's built-in DFLASH, or
``SGLANG_PLUGINS`` without ``dflash`` to disable the plugin altogether.
"""


def register() -> None:
    from .host import hooks

    hooks.install()
