"""Version pin, backend selection and hook registration of the SGLang glue."""

from __future__ import annotations

import pytest

from sglang_dflash import SGLANG_VERSION, sglang_compat


def test_pinned_version_is_installed():
    assert sglang_compat.installed_sglang_version() == SGLANG_VERSION
    sglang_compat.check_version()


def test_other_version_refused(monkeypatch):
    monkeypatch.setattr(sglang_compat, "installed_sglang_version", lambda: "0.5.24")
    with pytest.raises(sglang_compat.SGLangVersionError, match="supports SGLang 0.5.23 only, found 0.5.24"):
        sglang_compat.check_version()


def test_other_version_makes_dflash_fail_loudly(monkeypatch):
    """On a foreign SGLang the plugin installs nothing but a refusal for DFLASH."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    registered = []
    monkeypatch.setattr(sglang_compat, "installed_sglang_version", lambda: "0.6.0")
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, target, hook, kind: registered.append((target, hook))))
    sglang_compat.install()
    targets = {t.rsplit(".", 1)[-1] for t, _ in registered}
    assert targets == {"handle_server_args", "create_worker"}

    class FakeAlgo:
        def is_dflash(self):
            return True

    _, refuse = registered[0]
    with pytest.raises(sglang_compat.SGLangVersionError, match="found 0.6.0"):
        refuse(lambda *a: None, FakeAlgo(), object())


@pytest.mark.parametrize("value, expected", [("", "sglang-dflash"), ("upstream", "upstream"), ("OURS", "sglang-dflash")])
def test_backend_selection(monkeypatch, value, expected):
    monkeypatch.setenv(sglang_compat.BACKEND_ENV, value)
    assert sglang_compat.selected_backend() == expected


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv(sglang_compat.BACKEND_ENV, "eagle")
    with pytest.raises(ValueError, match="is not one of"):
        sglang_compat.selected_backend()


def test_every_hook_target_exists():
    """Fail fast on host drift: every dotted path the glue hooks resolves in this SGLang."""
    import pkgutil

    from sglang.srt.plugins.hook_registry import HookRegistry

    registered = []
    original = HookRegistry.register
    try:
        HookRegistry.register = classmethod(lambda cls, target, hook, kind: registered.append(target))
        for backend in ("sglang-dflash", "upstream"):
            import os

            os.environ[sglang_compat.BACKEND_ENV] = backend
            os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
            sglang_compat.install()
    finally:
        HookRegistry.register = original
        os.environ.pop(sglang_compat.BACKEND_ENV, None)
    assert len(registered) >= 8
    for target in registered:
        owner, attr = target.rsplit(".", 1)
        assert hasattr(pkgutil.resolve_name(owner), attr), target
    for name in sglang_compat._EXPORTS:
        assert getattr(sglang_compat, name) is not None
