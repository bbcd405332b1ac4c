"""Server configuration: defaults < configs/server.yaml (or --config) < COSY_* environment < CLI flags.

Every field of ``ServerConfig`` can be set in the YAML file (same name), in the environment as
``COSY_<NAME>`` (upper case; lists comma-separated, ``COSY_ENGINE`` as inline YAML) and, for the
common ones, by a CLI flag. Engine settings come from ``engine_config`` (configs/engine.yaml) with the
``engine`` map and model/device/llm_backend applied on top.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "server.yaml"
ENV_PREFIX = "COSY_"


@dataclass
class ServerConfig:
    # Network
    host: str = "127.0.0.1"
    port: int = 8765
    # Model / engine
    model: str = "pretrained_models/CosyVoice2-0.5B"
    device: str | None = None             # auto | cpu | cuda | cuda:N (None: the engine config's)
    llm_backend: str | None = None        # torch | vllm | auto (None: the engine config's)
    engine_config: str = "configs/engine.yaml"   # engine YAML (engine/engine.py: EngineConfig)
    engine: dict = field(default_factory=dict)   # EngineConfig overrides, e.g. {fixed_tokens_per_char: 2}
    # Auth: empty = open server (logged loudly at start)
    api_keys: list[str] = field(default_factory=list)
    # Limits
    max_connections: int = 256
    max_contexts_per_connection: int = 8
    max_text_bytes_per_context: int = 200_000
    max_frame_bytes: int = 4 * 1024 * 1024    # voice.register carries audio, so a few MB
    max_voices: int = 1000
    max_errors_per_connection: int = 50
    idle_timeout_s: float = 60.0
    send_queue_bytes: int = 1024 * 1024       # per connection; a full queue pauses that connection's streams
    shutdown_deadline_s: float = 10.0
    # Web demo
    web_demo_dir: str = "web_demo"
    log_level: str = "INFO"

    def model_path(self) -> Path:
        p = Path(self.model)
        return p if p.is_absolute() else (Path.cwd() / p)

    def engine_overrides(self) -> dict:
        """EngineConfig keyword overrides: ``engine`` plus model/device/backend when set."""
        out = dict(self.engine)
        out["model_dir"] = str(self.model_path())
        if self.device:
            out["device"] = self.device
        if self.llm_backend:
            out["llm_backend"] = self.llm_backend
        return out


def _coerce(value: str, hint) -> object:
    if hint is bool:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if hint is int:
        return int(value)
    if hint is float:
        return float(value)
    if typing.get_origin(hint) is list:
        return [v.strip() for v in value.split(",") if v.strip()]
    if hint is dict:
        return yaml.safe_load(value) or {}
    return value


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None,
                overrides: dict[str, object] | None = None) -> ServerConfig:
    """Build the config from the YAML file (default configs/server.yaml if it exists), the
    environment and explicit overrides (None values are ignored). Unknown YAML keys are an error."""
    cfg = ServerConfig()
    hints = typing.get_type_hints(ServerConfig)
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    yaml_path = Path(path) if path else DEFAULT_CONFIG
    if path or yaml_path.exists():
        data = yaml.safe_load(yaml_path.read_text()) or {}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{yaml_path}: unknown setting(s) {', '.join(unknown)}")
        for k, v in data.items():
            if v is not None:
                setattr(cfg, k, v)
    env = os.environ if env is None else env
    for name in names:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            setattr(cfg, name, _coerce(raw, hints[name]))
    for k, v in (overrides or {}).items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


def add_cli_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help=f"YAML config (default {DEFAULT_CONFIG.relative_to(REPO)})")
    ap.add_argument("--model", help="model directory (default pretrained_models/CosyVoice2-0.5B)")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the engine config's)")
    ap.add_argument("--llm-backend", dest="llm_backend", help="torch | vllm | auto (default: the engine config's)")
    ap.add_argument("--engine-config", dest="engine_config", help="engine YAML (default configs/engine.yaml)")
    ap.add_argument("--api-key", dest="api_keys", action="append",
                    help="accepted API key (repeatable); none = open server")
    ap.add_argument("--max-connections", dest="max_connections", type=int)
    ap.add_argument("--idle-timeout", dest="idle_timeout_s", type=float)
    ap.add_argument("--log-level", dest="log_level")


def config_from_args(a: argparse.Namespace) -> ServerConfig:
    keys = ("model", "host", "port", "device", "llm_backend", "engine_config", "api_keys", "max_connections",
            "idle_timeout_s", "log_level")
    return load_config(a.config, overrides={k: getattr(a, k) for k in keys})
