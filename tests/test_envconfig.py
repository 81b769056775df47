"""Service and worker settings read their KVC_* variables with each field's type; unset variables keep defaults."""

from app.deps import Settings
from workers.envconfig import env_values
from workers.worker import WorkerSettings


def test_env_values_parse_by_default_type_and_skip_unset():
    values = env_values(WorkerSettings, {"heartbeat_seconds": "HB", "max_deliveries": "MD", "prefix": "PX"},
                        env={"HB": "0.5", "MD": "7"})
    assert values == {"heartbeat_seconds": 0.5, "max_deliveries": 7}


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("KVC_MAX_INPUT_TOKENS", "1234")
    monkeypatch.setenv("KVC_CHAT_WAIT_SECONDS", "2.5")
    monkeypatch.setenv("KVC_REDIS_PREFIX", "t:")
    monkeypatch.delenv("KVC_MODEL", raising=False)
    settings = Settings.from_env()
    assert (settings.max_input_tokens, settings.chat_wait_seconds, settings.prefix) == (1234, 2.5, "t:")
    assert settings.model == Settings.model
    monkeypatch.setenv("KVC_CLAIM_IDLE_SECONDS", "3")
    monkeypatch.setenv("KVC_REDIS_PREFIX", "w:")
    worker = WorkerSettings.from_env()
    assert (worker.claim_idle_seconds, worker.prefix, worker.max_deliveries) == (3.0, "w:", WorkerSettings.max_deliveries)
