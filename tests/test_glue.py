"""Version pin, backend selection and hook registration of the host layer."""

from __future__ import annotations

import pytest

from sglang_dflash import SGLANG_VERSION
from sglang_dflash.host import api, hooks, version


def test_pinned_version_is_installed():
    assert version.installed_sglang_version() == SGLANG_VERSION
    version.check_version()


def test_other_version_refused(monkeypatch):
    monkeypatch.setattr(version, "installed_sglang_version", lambda: "0.5.24")
    with pytest.raises(version.SGLangVersionError, match="supports SGLang 0.5.23 only, found 0.5.24"):
        version.check_version()


def test_other_version_makes_dflash_fail_loudly(monkeypatch):
    """On a foreign SGLang the plugin installs nothing but a refusal for DFLASH."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    registered = []
    monkeypatch.setattr(version, "installed_sglang_version", lambda: "0.6.0")
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, target, hook, kind: registered.append((target, hook))))
    hooks.install()
    targets = {t.rsplit(".", 1)[-1] for t, _ in registered}
    assert targets == {"handle_server_args", "create_worker"}

    class FakeAlgo:
        def is_dflash(self):
            return True

    _, refuse = registered[0]
    with pytest.raises(version.SGLangVersionError, match="found 0.6.0"):
        refuse(lambda *a: None, FakeAlgo(), object())


@pytest.mark.parametrize("value, expected", [("", "sglang-dflash"), ("upstream", "upstream"), ("OURS", "sglang-dflash")])
def test_backend_selection(monkeypatch, value, expected):
    monkeypatch.setenv(version.BACKEND_ENV, value)
    assert version.selected_backend() == expected


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv(version.BACKEND_ENV, "eagle")
    with pytest.raises(ValueError, match="is not one of"):
        version.selected_backend()


def test_every_hook_target_exists():
    """Fail fast on host drift: every dotted path the hooks name resolves in this SGLang."""
    import pkgutil

    from sglang.srt.plugins.hook_registry import HookRegistry

    registered = []
    original = HookRegistry.register
    try:
        HookRegistry.register = classmethod(lambda cls, target, hook, kind: registered.append(target))
        for backend in ("sglang-dflash", "upstream"):
            import os

            os.environ[version.BACKEND_ENV] = backend
            os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
            hooks.install()
    finally:
        HookRegistry.register = original
        os.environ.pop(version.BACKEND_ENV, None)
    assert len(registered) >= 8
    for target in registered:
        owner, attr = target.rsplit(".", 1)
        assert hasattr(pkgutil.resolve_name(owner), attr), target
    for name in api._EXPORTS:
        assert getattr(api, name) is not None
