"""Start the server:  python -m ws_server --model DIR --host H --port P  (see configs/server.yaml)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from engine.checkpoint import CheckpointError, ModelDir
from ws_server.app import TTSServer
from ws_server.config import REPO, ServerConfig, add_cli_flags, config_from_args

log = logging.getLogger("ws_server")


def build_engine(cfg: ServerConfig):
    """The real engine for ``cfg.model`` (imported lazily: loading torch takes a while)."""
    from engine.engine import EngineConfig, TTSEngine
    path = Path(cfg.engine_config)
    path = path if path.is_absolute() or path.exists() else REPO / path
    return TTSEngine(EngineConfig.load(path, **cfg.engine_overrides()))


async def serve(cfg: ServerConfig, engine=None) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; returns the exit status."""
    engine = engine if engine is not None else build_engine(cfg)
    server = TTSServer(engine, cfg)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(engine.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if loading.done() and loading.exception() is not None:
        log.error("engine failed to start: %s", loading.exception())
        status = 1
    else:
        if loading.done():
            log.info("engine ready: GET /ready is 200")
        await stopping
        log.info("shutting down (deadline %.0f s)", cfg.shutdown_deadline_s)
    loading.cancel()
    await server.shutdown(0 if status else None)
    await engine.close()
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ws_server", description="CosyVoice2 streaming TTS WebSocket server")
    add_cli_flags(ap)
    cfg = config_from_args(ap.parse_args(argv))
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.DEBUG:   # one line per health probe is noise
        logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        ModelDir(cfg.model_path()).require("llm", "flow", "hift", "campplus", "speech_tokenizer", "tokenizer_dir")
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # uvloop is not available on Windows
        return asyncio.run(serve(cfg))
    return uvloop.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
