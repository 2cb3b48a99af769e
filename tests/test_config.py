"""RuntimeConfig: defaults, TOML, environment, keyword overrides, validation, drivers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hive_orchestration import (
    ConfigError,
    FeatureFlags,
    InvalidInputError,
    Runtime,
    RuntimeConfig,
)
from hive_orchestration.config import ENV_PREFIX

TOML = """
synchronous = "NORMAL"
mailbox_size = 64
ask_timeout = 2.5
subscriber_overflow = "drop"

[features]
enable_dual_write = true
"""


@pytest.fixture
def toml_path(tmp_path: Path) -> Path:
    path = tmp_path / "hive.toml"
    path.write_text(TOML)
    return path


# -- defaults ---------------------------------------------------------------------------


def test_defaults() -> None:
    config = RuntimeConfig()
    assert config.synchronous == "FULL"
    assert config.storage_driver == "auto"
    assert config.busy_timeout == 5.0
    assert config.mailbox_size == 4096
    assert config.max_batch == 1024
    assert config.ask_timeout == 30.0
    assert config.shutdown_timeout == 10.0
    assert config.max_restarts == 5
    assert config.restart_window == 10.0
    assert config.subscriber_buffer == 1000
    assert config.subscriber_overflow == "error"
    assert config.max_payload_bytes == 1024 * 1024
    assert config.max_payload_depth == 32
    assert config.features == FeatureFlags(
        enable_unified_events=False, enable_dual_write=False, enable_agent_adapters=False
    )


def test_load_with_nothing_gives_the_defaults() -> None:
    assert RuntimeConfig.load(env={}) == RuntimeConfig()
    assert RuntimeConfig.from_mapping({}) == RuntimeConfig()


def test_config_is_frozen_and_keyword_only() -> None:
    config = RuntimeConfig()
    with pytest.raises(AttributeError):
        config.mailbox_size = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.features.enable_dual_write = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        RuntimeConfig("NORMAL")  # type: ignore[misc]


# -- sources and precedence -------------------------------------------------------------


def test_load_reads_toml_with_features(toml_path: Path) -> None:
    config = RuntimeConfig.load(toml_path, env={})
    assert config.synchronous == "NORMAL"
    assert config.mailbox_size == 64
    assert config.ask_timeout == 2.5
    assert config.subscriber_overflow == "drop"
    assert config.features == FeatureFlags(enable_dual_write=True)
    # Fields the file does not mention keep their defaults.
    assert config.max_batch == RuntimeConfig().max_batch
    assert RuntimeConfig.load(str(toml_path), env={}) == config


def test_environment_overrides_toml(toml_path: Path) -> None:
    env = {
        f"{ENV_PREFIX}MAILBOX_SIZE": "10",
        f"{ENV_PREFIX}FEATURES__ENABLE_UNIFIED_EVENTS": "true",
    }
    config = RuntimeConfig.load(toml_path, env=env)
    assert config.mailbox_size == 10
    assert config.features.enable_unified_events is True
    # The flag from the environment joins the TOML's [features]; it does not replace them.
    assert config.features.enable_dual_write is True
    # What the environment does not mention still comes from the file.
    assert config.synchronous == "NORMAL"
    assert config.ask_timeout == 2.5


def test_keyword_overrides_win_over_environment_and_toml(toml_path: Path) -> None:
    env = {f"{ENV_PREFIX}MAILBOX_SIZE": "10", f"{ENV_PREFIX}ASK_TIMEOUT": "7"}
    config = RuntimeConfig.load(toml_path, env=env, mailbox_size=3, synchronous="FULL")
    assert config.mailbox_size == 3
    assert config.synchronous == "FULL"
    assert config.ask_timeout == 7.0


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}MAX_BATCH", "12")
    monkeypatch.setenv(f"{ENV_PREFIX}FEATURES__ENABLE_AGENT_ADAPTERS", "1")
    config = RuntimeConfig.load()
    assert config.max_batch == 12
    assert config.features.enable_agent_adapters is True
    # env={} ignores the process environment entirely.
    assert RuntimeConfig.load(env={}) == RuntimeConfig()


def test_unrelated_environment_variables_are_ignored() -> None:
    env = {
        "MAILBOX_SIZE": "1",
        "HIVE_MAILBOX_SIZE": "1",
        "HIVE_ORCHESTRATIONMAILBOX_SIZE": "1",
        "PATH": "/usr/bin",
    }
    assert RuntimeConfig.load(env=env) == RuntimeConfig()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("True", True), ("1", True), ("false", False), ("0", False)],
)
def test_environment_booleans(text: str, expected: bool) -> None:
    env = {f"{ENV_PREFIX}FEATURES__ENABLE_UNIFIED_EVENTS": text}
    assert RuntimeConfig.load(env=env).features.enable_unified_events is expected


def test_environment_strings_are_converted() -> None:
    env = {
        f"{ENV_PREFIX}BUSY_TIMEOUT": "0.25",
        f"{ENV_PREFIX}MAX_RESTARTS": "0",
        f"{ENV_PREFIX}SYNCHRONOUS": "NORMAL",
        f"{ENV_PREFIX}STORAGE_DRIVER": "thread",
    }
    config = RuntimeConfig.load(env=env)
    assert config.busy_timeout == 0.25
    assert config.max_restarts == 0
    assert config.synchronous == "NORMAL"
    assert config.storage_driver == "thread"


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mailbox_size": 0}, "mailbox_size"),
        ({"mailbox_size": -5}, "mailbox_size"),
        ({"mailbox_size": 1.5}, "mailbox_size"),
        ({"mailbox_size": True}, "mailbox_size"),
        ({"max_batch": 0}, "max_batch"),
        ({"synchronous": "OFF"}, "synchronous"),
        ({"synchronous": "EXTRA"}, "synchronous"),
        ({"storage_driver": "sqlite3"}, "storage_driver"),
        ({"ask_timeout": "soon"}, "ask_timeout"),
        ({"ask_timeout": 0}, "ask_timeout"),
        ({"shutdown_timeout": -1.0}, "shutdown_timeout"),
        ({"busy_timeout": math.nan}, "busy_timeout"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"subscriber_overflow": "block"}, "subscriber_overflow"),
        ({"max_payload_bytes": "big"}, "max_payload_bytes"),
        ({"features": "all"}, "features"),
        ({"features": {"enable_unified_events": "yes"}}, "features.enable_unified_events"),
    ],
)
def test_invalid_value_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig.load(env={}, **overrides)
    assert caught.value.field == field
    assert field in str(caught.value)
    assert caught.value.reason
    # The same check applies to a mapping, and the error is an InvalidInputError.
    with pytest.raises(InvalidInputError):
        RuntimeConfig.from_mapping(overrides)


def test_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="mailbox_sise") as caught:
        RuntimeConfig.load(env={}, mailbox_sise=10)
    assert caught.value.field == "mailbox_sise"


def test_unknown_feature_flag_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="enable_time_travel") as caught:
        RuntimeConfig.load(env={}, features={"enable_time_travel": True})
    assert caught.value.field == "features.enable_time_travel"


def test_invalid_environment_value_names_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig.load(env={f"{ENV_PREFIX}MAILBOX_SIZE": "ten"})
    assert caught.value.field == "mailbox_size"
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig.load(env={f"{ENV_PREFIX}FEATURES__ENABLE_DUAL_WRITE": "maybe"})
    assert caught.value.field == "features.enable_dual_write"


def test_unknown_environment_names_are_refused() -> None:
    # A typo in a variable with the prefix is an error, not silently ignored.
    with pytest.raises(ConfigError, match="mailbox_sise"):
        RuntimeConfig.load(env={f"{ENV_PREFIX}MAILBOX_SISE": "10"})
    with pytest.raises(ConfigError, match="enable_time_travel") as caught:
        RuntimeConfig.load(env={f"{ENV_PREFIX}FEATURES__ENABLE_TIME_TRAVEL": "1"})
    assert caught.value.field == "features.enable_time_travel"


def test_invalid_toml_value_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('mailbox_size = "lots"\n')
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig.load(path, env={})
    assert caught.value.field == "mailbox_size"


def test_features_that_are_not_a_table_with_a_flag_from_the_environment(
    tmp_path: Path,
) -> None:
    # A TOML `features` that is not a table must be refused as a config error, also when
    # the environment sets a feature flag on top of it.
    path = tmp_path / "features.toml"
    path.write_text("features = true\n")
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig.load(path, env={})
    assert caught.value.field == "features"
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig.load(path, env={f"{ENV_PREFIX}FEATURES__ENABLE_DUAL_WRITE": "1"})
    assert caught.value.field == "features"


def test_missing_toml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as caught:
        RuntimeConfig.load(tmp_path / "missing.toml", env={})
    assert caught.value.field == "toml_path"


def test_toml_path_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig.load(tmp_path, env={})
    assert caught.value.field == "toml_path"


@pytest.mark.parametrize(
    "content",
    [b"mailbox_size = = 3\n", b"[features\nenable_dual_write = true\n", b"\xff\xfe not utf-8"],
    ids=["syntax", "unclosed-table", "not-utf8"],
)
def test_malformed_toml_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig.load(path, env={})
    assert caught.value.field == "toml_path"


def test_config_round_trips_through_a_mapping() -> None:
    config = RuntimeConfig(
        synchronous="NORMAL", mailbox_size=9, features=FeatureFlags(enable_unified_events=True)
    )
    assert RuntimeConfig.from_mapping(msgspec.to_builtins(config)) == config


# -- the config in a runtime ------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("config", ["not a config", {"mailbox_size": 1}, 42])
async def test_open_refuses_what_is_not_a_config(anyio_backend: str, config: object) -> None:
    with pytest.raises(ConfigError) as caught:
        async with Runtime.open(":memory:", config=config):  # type: ignore[arg-type]
            pytest.fail("opened with a bad config")
    assert caught.value.field == "config"


@pytest.mark.anyio
async def test_runtime_applies_its_config(anyio_backend: str, tmp_path: Path) -> None:
    path = tmp_path / "hive.toml"
    path.write_text('synchronous = "NORMAL"\nmailbox_size = 7\nmax_payload_bytes = 64\n')
    config = RuntimeConfig.load(path, env={})
    async with Runtime.open(tmp_path / "hive.db", config=config) as runtime:
        assert runtime.config == config
        stats = await runtime.statistics()
        assert stats.storage.synchronous == "NORMAL"
        assert {name: box.capacity for name, box in stats.mailboxes.items()} == {
            "broadcast": 7,
            "storage": 7,
            "tasks": 7,
            "workers": 7,
            "plans": 7,
            "schedules": 7,
        }
        await runtime.publish("config.small", {"x": "y"})
        with pytest.raises(InvalidInputError) as caught:
            await runtime.publish("config.large", {"x": "y" * 100})
        assert caught.value.field.startswith("data")
        assert [event.type for event in await runtime.read_events()] == ["config.small"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_aiosqlite_driver_is_refused_under_trio(anyio_backend: str, db_path: str) -> None:
    config = RuntimeConfig(storage_driver="aiosqlite")
    with pytest.raises(ConfigError) as caught:
        async with Runtime.open(db_path, config=config):
            pytest.fail("aiosqlite opened under trio")
    assert caught.value.field == "storage_driver"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_aiosqlite_driver_works_under_asyncio(anyio_backend: str, db_path: str) -> None:
    async with Runtime.open(db_path, config=RuntimeConfig(storage_driver="aiosqlite")) as rt:
        event = await rt.publish("driver.aiosqlite", {"n": 1})
        assert await rt.read_events() == [event]
        assert (await rt.statistics()).storage.driver == "aiosqlite"


@pytest.mark.anyio
async def test_thread_driver_works_on_every_backend(anyio_backend: str, db_path: str) -> None:
    async with Runtime.open(db_path, config=RuntimeConfig(storage_driver="thread")) as rt:
        event = await rt.publish("driver.thread", {"n": 1})
        assert await rt.read_events() == [event]
        assert (await rt.statistics()).storage.driver == "thread"


@pytest.mark.anyio
async def test_auto_driver_picks_by_backend(anyio_backend: str, db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        await rt.publish("driver.auto", {})
        driver = (await rt.statistics()).storage.driver
    assert driver == {"asyncio": "aiosqlite", "trio": "thread"}[anyio_backend]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("field", "value"),
    [("synchronous", "OFF"), ("mailbox_size", 0), ("ask_timeout", 0.0), ("max_batch", -1)],
)
async def test_a_config_built_in_code_is_validated_at_open(
    anyio_backend: str, tmp_path: Path, field: str, value: object
) -> None:
    # msgspec does not check constraints when a Struct is built in code.
    config = RuntimeConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as caught:
        async with Runtime.open(tmp_path / "hive.db", config=config):
            pytest.fail("opened with an invalid config")
    assert caught.value.field == field


# -- durations ------------------------------------------------------------------------------

#: Each duration field and its bounds, in seconds: what takes a task from a live worker at
#: least 0.1, a deadline waited for at least 0.01, a retry delay at least 0.001; a day at
#: most.
DURATION_BOUNDS = {
    "lease_timeout": (0.1, 86_400.0),
    "worker_timeout": (0.1, 86_400.0),
    "ask_timeout": (0.01, 86_400.0),
    "busy_timeout": (0.01, 86_400.0),
    "shutdown_timeout": (0.01, 86_400.0),
    "restart_window": (0.01, 86_400.0),
    "retry_backoff": (0.001, 86_400.0),
    "retry_backoff_max": (0.001, 86_400.0),
}


def _out_of_bounds() -> list[Any]:
    cases = []
    for field, (low, high) in DURATION_BOUNDS.items():
        for value in (1e-300, 1e-320, 0.0, low * 0.99, high * 1.01, math.inf, math.nan, "inf"):
            cases.append(pytest.param(field, value, id=f"{field}-{value!r}"))
    return cases


@pytest.mark.parametrize(("field", "value"), _out_of_bounds())
def test_a_duration_out_of_its_bounds_is_refused(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig.load(env={}, **{field: value})
    assert caught.value.field == field
    low, high = DURATION_BOUNDS[field]
    assert f"from {low:g} to {high:g} seconds" in caught.value.reason
    # From the environment (text) too, and in a config built in code when it is used.
    with pytest.raises(ConfigError):
        RuntimeConfig.load(env={f"{ENV_PREFIX}{field.upper()}": str(value)})
    with pytest.raises(ConfigError):
        RuntimeConfig(**{field: value}).validated()  # type: ignore[arg-type]


@pytest.mark.parametrize("field", list(DURATION_BOUNDS))
def test_a_duration_at_its_bounds_is_accepted(field: str) -> None:
    for value in DURATION_BOUNDS[field]:
        assert getattr(RuntimeConfig.load(env={}, **{field: value}), field) == value


def test_max_request_bytes() -> None:
    assert RuntimeConfig().max_request_bytes == 4 * 1024 * 1024
    config = RuntimeConfig.load(env={f"{ENV_PREFIX}MAX_REQUEST_BYTES": "65536"})
    assert config.max_request_bytes == 65536
    for bad in (0, -1, "big", 1.5):
        with pytest.raises(ConfigError) as caught:
            RuntimeConfig.load(env={}, max_request_bytes=bad)
        assert caught.value.field == "max_request_bytes"
