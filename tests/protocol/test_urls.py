"""The command registry: decorators, duplicates, reserved ids, seed-style handlers, app loading."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from geventtcp import BaseHandler, Registry, RegistryError, Request
from geventtcp.urls import load_registry


def request(params: Any = None) -> Request:
    return Request(("127.0.0.1", 1), b"{}", 1, params or {}, 0)


def test_class_handler_returning_a_value() -> None:
    reg = Registry()

    @reg.handler(1)
    class Echo(BaseHandler):
        """Echo back."""

        def process(self, request: Request) -> Any:
            return request.params

    assert reg.get(1)(request({"a": 1})) == {"a": 1}  # type: ignore[misc]
    info = reg.info(1)
    assert info.doc == "Echo back." and info.name.endswith("Echo") and not info.idempotent


def test_seed_style_handler_setting_res() -> None:
    reg = Registry()

    @reg.handler(2)
    class Seed(BaseHandler):
        def process(self, request: Request) -> None:
            self.res = {"ok": True}

    assert reg.get(2)(request()) == {"ok": True}  # type: ignore[misc]


def test_handler_instances_are_fresh_per_request() -> None:
    reg = Registry()

    @reg.handler(3)
    class Counter(BaseHandler):
        def process(self, request: Request) -> Any:
            self.count = getattr(self, "count", 0) + 1
            return self.count

    call = reg.get(3)
    assert call is not None and call(request()) == 1 and call(request()) == 1


def test_plain_function_and_idempotent_flag() -> None:
    reg = Registry()
    reg.add(4, lambda r: "fn", idempotent=True)
    assert reg.get(4)(request()) == "fn"  # type: ignore[misc]
    assert reg.info(4).idempotent


def test_duplicate_cmdid_is_an_error() -> None:
    reg = Registry()
    reg.add(1, lambda r: 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add(1, lambda r: 2)


@pytest.mark.parametrize("bad", [-1, "1", 1.0, True])
def test_invalid_and_reserved_cmdids(bad: Any) -> None:
    with pytest.raises(RegistryError):
        Registry().add(bad, lambda r: 1)


def test_non_handler_class_is_rejected() -> None:
    with pytest.raises(RegistryError):
        Registry().add(1, dict)
    with pytest.raises(RegistryError):
        Registry().add(1, 42)


def test_base_handler_process_must_be_implemented() -> None:
    reg = Registry()
    reg.add(1, BaseHandler)
    with pytest.raises(NotImplementedError):
        reg.get(1)(request())  # type: ignore[misc]


def test_iteration_is_sorted_by_cmdid() -> None:
    reg = Registry()
    for cmdid in (30, 10, 20):
        reg.add(cmdid, lambda r: None)
    assert [i.cmdid for i in reg] == [10, 20, 30] and len(reg) == 3 and 10 in reg


def test_load_registry_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "app_attr.py").write_text(
        "from geventtcp import Registry\n"
        "registry = Registry()\nregistry.add(1, lambda r: 'module-registry')\n"
        "other = Registry()\nother.add(2, lambda r: 'attr')\n"
        "def build():\n    reg = Registry()\n    reg.add(3, lambda r: 'factory')\n    return reg\n"
        "not_a_registry = 5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert 1 in load_registry("app_attr")
    assert 2 in load_registry("app_attr:other")
    assert 3 in load_registry("app_attr:build")
    with pytest.raises(RegistryError):
        load_registry("app_attr:not_a_registry")
    with pytest.raises(ImportError):
        load_registry("no_such_module_here")
    sys.modules.pop("app_attr", None)


def test_example_application_registers_its_handlers() -> None:
    import handlers  # noqa: F401
    from geventtcp.urls import default_registry
    from handlers.cmdids import CmdId

    assert {int(c) for c in CmdId} <= {i.cmdid for i in default_registry}
    assert default_registry.get(CmdId.ECHO)(request({"e": 1})) == {"e": 1}  # type: ignore[misc]
