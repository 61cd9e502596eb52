"""Typed params (the toolkit issue): ``urls.handler(cmdid, params=Schema)`` over real sockets.

The handler gets the validated object (dataclass instance, TypedDict dict, pydantic model) and never
runs on bad params; a 400's ``details`` lists every bad field with its path and reason; ``list``
shows each command's params as JSON Schema; an annotation the validator cannot check is refused
when the command is registered, naming the field.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from typing import Annotated, Any, Literal, NotRequired, Optional, Required, TypedDict

import pydantic
import pytest

from geventtcp import BaseHandler, Registry
from geventtcp.client import Client
from geventtcp.errors import BadRequest, RegistryError
from geventtcp.schema import MAX_DETAILS, compile_params
from tests.support.servers import addr


class Status(enum.Enum):
    NEW = "new"
    PAID = "paid"


@dataclasses.dataclass
class Item:
    sku: str
    qty: int = 1


@dataclasses.dataclass
class Order:
    """An order to place."""

    customer: int
    items: list[Item]
    status: Status = Status.NEW
    note: str | None = None
    price: float = 0.0
    mode: Literal["fast", "slow"] = "fast"
    tags: dict[str, int] = dataclasses.field(default_factory=dict)
    pair: tuple[int, str] | None = None
    extra: Annotated[Optional[bool], "metadata is ignored"] = None  # noqa: UP045 - Optional is supported too


class ItemDict(TypedDict):
    sku: str
    qty: NotRequired[int]


class OrderDict(TypedDict, total=False):
    customer: Required[int]
    items: Required[list[ItemDict]]
    note: str


class Tree(TypedDict):
    name: str
    children: NotRequired[list[Tree]]


@dataclasses.dataclass
class Range:
    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low must not exceed high")


@dataclasses.dataclass
class Window:
    ranges: list[Range]


@dataclasses.dataclass
class Paging:
    page: int = 1
    size: int = 20


@dataclasses.dataclass
class Numbers:
    values: list[int]


class ItemModel(pydantic.BaseModel):
    sku: str
    qty: pydantic.StrictInt = 1


class OrderModel(pydantic.BaseModel):
    customer: pydantic.StrictInt
    items: list[ItemModel]
    status: Status = Status.NEW


@dataclasses.dataclass
class WithDatetime:
    when: datetime.datetime


@dataclasses.dataclass
class Outer:
    inner: list[WithDatetime]


@dataclasses.dataclass
class IntKeys:
    counts: dict[int, int]


@dataclasses.dataclass
class Unresolvable:
    thing: NoSuchClass  # type: ignore[name-defined]  # noqa: F821 - the point of the test


GOOD_ORDER = {"customer": 7, "items": [{"sku": "a"}, {"sku": "b", "qty": 3}], "status": "paid", "price": 2,
              "tags": {"x": 1}, "pair": [1, "one"], "unknown": "ignored"}


def _serve_one(serve: Any, schema: Any, seen: list[Any] | None = None, cmdid: int = 10) -> Client:
    """A server with one command whose handler records ``request.params``; a Client to it."""
    reg = Registry()

    def handler(request: Any) -> Any:
        if seen is not None:
            seen.append(request.params)
        return "ran"

    reg.add(cmdid, handler, params=schema)
    return Client(addr(serve(reg)), timeout=5)


def _details(client: Client, params: Any, cmdid: int = 10) -> list[dict[str, str]]:
    with pytest.raises(BadRequest) as info:
        client.call(cmdid, params)
    assert info.value.code == 400
    details: Any = info.value.details
    assert isinstance(details, list)
    return details


def test_good_params_reach_the_handler_as_the_dataclass(serve: Any) -> None:
    seen: list[Any] = []
    with _serve_one(serve, Order, seen) as client:
        assert client.call(10, GOOD_ORDER) == "ran"
    assert seen == [Order(customer=7, items=[Item("a"), Item("b", 3)], status=Status.PAID, price=2.0,
                          tags={"x": 1}, pair=(1, "one"))]
    order = seen[0]
    assert type(order.price) is float and order.status is Status.PAID and type(order.items[0]) is Item


def test_every_bad_field_is_listed_with_its_path_and_reason_and_the_handler_does_not_run(serve: Any) -> None:
    seen: list[Any] = []
    bad = {"customer": True, "items": [{"sku": "a"}, {"qty": "3"}, {"sku": "c", "qty": 1.5}], "status": "gone",
           "note": 5, "price": "2", "mode": "x", "tags": {"a": None}, "pair": [1], "extra": 0}
    with _serve_one(serve, Order, seen) as client:
        details = _details(client, bad)
    assert details == [
        {"path": "customer", "reason": "expected an integer, got boolean"},
        {"path": "items[1].sku", "reason": "field required"},
        {"path": "items[1].qty", "reason": "expected an integer, got string"},
        {"path": "items[2].qty", "reason": "expected an integer, got number"},
        {"path": "status", "reason": 'expected one of "new", "paid", got "gone"'},
        {"path": "note", "reason": "expected a string, got integer"},
        {"path": "price", "reason": "expected a number, got string"},
        {"path": "mode", "reason": 'expected one of "fast", "slow", got "x"'},
        {"path": "tags.a", "reason": "expected an integer, got null"},
        {"path": "pair", "reason": "expected an array of 2 items, got array of 1"},
        {"path": "extra", "reason": "expected a boolean, got integer"},
    ]
    assert seen == []


def test_the_message_names_the_first_error_and_counts_the_rest(serve: Any) -> None:
    with _serve_one(serve, Order) as client, pytest.raises(BadRequest) as info:
        client.call(10, {"customer": "7"})
    assert info.value.msg == "invalid params: customer: expected an integer, got string (and 1 more)"
    details: Any = info.value.details
    assert details[1] == {"path": "items", "reason": "field required"}


@dataclasses.dataclass
class Ints:
    plain: int = 0
    maybe: int | None = None
    many: list[int] = dataclasses.field(default_factory=list)
    table: dict[str, int] = dataclasses.field(default_factory=dict)
    one: Literal[1] = 1


@pytest.mark.parametrize(("params", "path"), [
    ({"plain": True}, "plain"), ({"plain": False}, "plain"), ({"maybe": True}, "maybe"),
    ({"many": [1, True]}, "many[1]"), ({"table": {"k": False}}, "table.k"), ({"one": True}, "one"),
])
def test_a_boolean_is_never_an_integer(serve: Any, params: dict[str, Any], path: str) -> None:
    with _serve_one(serve, Ints) as client:
        [detail] = _details(client, params)
    assert detail["path"] == path and ("got boolean" in detail["reason"] or detail["reason"].endswith("got true"))


def test_float_fields_take_integers_as_floats_but_not_booleans() -> None:
    schema = compile_params(Order)
    assert schema.validate({"customer": 1, "items": [], "price": 3}).price == 3.0
    with pytest.raises(Exception) as info:
        schema.validate({"customer": 1, "items": [], "price": True})
    assert getattr(info.value, "details", None) == [{"path": "price", "reason": "expected a number, got boolean"}]


def test_a_typeddict_gives_a_plain_dict_of_its_own_keys(serve: Any) -> None:
    seen: list[Any] = []
    with _serve_one(serve, OrderDict, seen) as client:
        assert client.call(10, {"customer": 1, "items": [{"sku": "a"}, {"sku": "b", "qty": 2, "x": 0}],
                                "other": True}) == "ran"
        details = _details(client, {"items": [{"qty": False}], "note": None})
    assert seen == [{"customer": 1, "items": [{"sku": "a"}, {"sku": "b", "qty": 2}]}]  # unknown keys dropped
    assert details == [
        {"path": "customer", "reason": "field required"},
        {"path": "items[0].sku", "reason": "field required"},
        {"path": "items[0].qty", "reason": "expected an integer, got boolean"},
        {"path": "note", "reason": "expected a string, got null"},
    ]


def test_a_recursive_typeddict_reports_deep_paths(serve: Any) -> None:
    seen: list[Any] = []
    tree = {"name": "root", "children": [{"name": "a"}, {"name": "b", "children": [{"name": 3}]}]}
    with _serve_one(serve, Tree, seen) as client:
        assert _details(client, tree) == [{"path": "children[1].children[0].name",
                                           "reason": "expected a string, got integer"}]
        tree["children"][1]["children"][0]["name"] = "c"  # type: ignore[index]
        assert client.call(10, tree) == "ran"
    assert seen == [tree]


def test_a_dataclass_post_init_refusal_is_reported_at_its_object(serve: Any) -> None:
    with _serve_one(serve, Window) as client:
        assert _details(client, {"ranges": [{"low": 1, "high": 2}, {"low": 5, "high": 1}]}) == [
            {"path": "ranges[1]", "reason": "low must not exceed high"}]


def test_a_missing_params_object_is_empty_params(serve: Any) -> None:
    seen: list[Any] = []
    reg = Registry()
    reg.add(10, lambda request: seen.append(request.params), params=Paging)
    reg.add(11, lambda request: seen.append(request.params), params=Order)
    with Client(addr(serve(reg)), timeout=5) as client:
        client.call(10)
        assert _details(client, None, cmdid=11) == [{"path": "customer", "reason": "field required"},
                                                   {"path": "items", "reason": "field required"}]
    assert seen == [Paging()]


def test_details_are_capped_and_the_message_says_so(serve: Any) -> None:
    with _serve_one(serve, Numbers) as client, pytest.raises(BadRequest) as info:
        client.call(10, {"values": [True] * 100_000})
    details: Any = info.value.details
    assert len(details) == MAX_DETAILS and details[-1]["path"] == f"values[{MAX_DETAILS - 1}]"
    assert info.value.msg.endswith(f"(and more: the first {MAX_DETAILS} are listed)")


@dataclasses.dataclass
class Ones:
    values: list[Literal[1]]


class Tripwire:
    """An item validation must never reach: it stops at MAX_DETAILS errors."""

    def __hash__(self) -> int:
        raise AssertionError("validation went on past MAX_DETAILS errors")


def test_validation_stops_at_max_details_errors() -> None:
    schema = compile_params(Ones)
    with pytest.raises(Exception) as info:
        schema.validate({"values": [2] * MAX_DETAILS + [Tripwire()]})
    assert len(getattr(info.value, "details", [])) == MAX_DETAILS
    with pytest.raises(AssertionError):  # the tripwire works: one error fewer and it is reached
        schema.validate({"values": [2] * (MAX_DETAILS - 1) + [Tripwire()]})


def test_a_long_dict_key_is_shortened_in_the_path() -> None:
    schema = compile_params(Ints)
    with pytest.raises(Exception) as info:
        schema.validate({"table": {"k" * 1000: "x"}})
    assert getattr(info.value, "details", None) == [{"path": "table." + "k" * 61 + "...",
                                                    "reason": "expected an integer, got string"}]


def test_a_handler_class_gets_the_typed_params(serve: Any) -> None:
    reg = Registry()

    @reg.handler(10, params=Order)
    class Place(BaseHandler):
        def process(self, request: Any) -> Any:
            order: Order = request.params
            return {"customer": order.customer, "qty": sum(item.qty for item in order.items)}

    with Client(addr(serve(reg)), timeout=5) as client:
        assert client.call(10, GOOD_ORDER) == {"customer": 7, "qty": 4}


def test_a_pydantic_model_validates_and_reaches_the_handler(serve: Any) -> None:
    seen: list[Any] = []
    with _serve_one(serve, OrderModel, seen) as client:
        assert client.call(10, {"customer": 1, "items": [{"sku": "a", "qty": 2}], "status": "paid"}) == "ran"
        details = _details(client, {"customer": True, "items": [{"sku": "a"}, {"sku": "b"}, {"qty": False}]})
    assert seen == [OrderModel(customer=1, items=[ItemModel(sku="a", qty=2)], status=Status.PAID)]
    assert [d["path"] for d in details] == ["customer", "items[2].sku", "items[2].qty"]
    assert all(d["reason"] for d in details) and set(details[0]) == {"path", "reason"}


def test_list_shows_each_command_params_as_json_schema(serve: Any) -> None:
    reg = Registry()
    reg.add(10, lambda request: None, params=Order)
    reg.add(11, lambda request: None, params=OrderModel)
    reg.add(12, lambda request: None)
    with Client(addr(serve(reg)), timeout=5) as client:
        listed = {item["cmdid"]: item for item in client.list()}
    assert listed[11]["params"] == OrderModel.model_json_schema()
    assert "params" not in listed[12]
    schema = listed[10]["params"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert (schema["type"], schema["title"], schema["description"]) == ("object", "Order", "An order to place.")
    assert schema["required"] == ["customer", "items"]
    props = schema["properties"]
    assert props["customer"] == {"type": "integer"}
    assert props["items"] == {"type": "array", "items": {"$ref": "#/$defs/Item"}}
    assert props["status"] == {"$ref": "#/$defs/Status", "default": "new"}
    assert props["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
    assert props["mode"] == {"enum": ["fast", "slow"], "default": "fast"}
    assert props["tags"] == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert schema["$defs"]["Item"] == {"type": "object", "title": "Item", "required": ["sku"],
                                       "properties": {"sku": {"type": "string"},
                                                      "qty": {"type": "integer", "default": 1}}}
    assert schema["$defs"]["Status"] == {"title": "Status", "enum": ["new", "paid"]}


def test_a_recursive_schema_refers_to_its_root() -> None:
    assert compile_params(Tree).json_schema["properties"]["children"] == {"type": "array", "items": {"$ref": "#"}}


@pytest.mark.parametrize(("schema", "names"), [
    (WithDatetime, ["WithDatetime.when", "datetime"]),
    (Outer, ["WithDatetime.when"]),
    (IntKeys, ["IntKeys.counts", "dict[str"]),
    (Unresolvable, ["Unresolvable", "NoSuchClass"]),
    (dict, ["dataclass, a TypedDict or a pydantic model"]),
    (Item(sku="an instance"), ["dataclass, a TypedDict or a pydantic model"]),
])
def test_an_unsupported_schema_is_refused_at_registration_naming_the_field(schema: Any, names: list[str]) -> None:
    reg = Registry()
    with pytest.raises(RegistryError) as info:
        reg.add(10, lambda request: None, params=schema)
    assert all(name in str(info.value) for name in names), str(info.value)
    assert 10 not in reg  # nothing half-registered
    reg.add(10, lambda request: None)


def test_a_command_without_params_keeps_its_call_unwrapped() -> None:
    reg = Registry()

    def handler(request: Any) -> Any:
        return None

    reg.add(10, handler)
    assert reg.get(10) is handler and reg.info(10).params is None


class NumbersModel(pydantic.BaseModel):
    values: list[pydantic.StrictInt]


def test_pydantic_details_are_capped_too() -> None:
    with pytest.raises(Exception) as info:
        compile_params(NumbersModel).validate({"values": [True] * 500})
    details: Any = getattr(info.value, "details", None)
    assert len(details) == MAX_DETAILS
    assert details[0] == {"path": "values[0]", "reason": "Input should be a valid integer"}
    assert str(info.value).endswith(f"(and more: the first {MAX_DETAILS} are listed)")


def test_an_integer_too_large_for_a_float_field_is_a_400(serve: Any) -> None:
    with _serve_one(serve, Order) as client:
        assert _details(client, {"customer": 1, "items": [], "price": 10**400}) == [
            {"path": "price", "reason": "number out of range for a float"}]
